"""Connecting to Redis (one server or a cluster), and Redis failures as the API's StoreUnavailable."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisClusterException, RedisError

from .errors import StoreUnavailable

log = logging.getLogger("taskdelta.store")
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


@contextlib.contextmanager
def unavailable(doing: str) -> Iterator[None]:
    """Turn any Redis connection, timeout or server error into StoreUnavailable."""
    try:
        yield
    except (RedisError, RedisClusterException, OSError) as e:
        # The client sees what failed, never the driver's text (it names socket paths, hosts,
        # ports); the log keeps it.
        log.warning("Redis failed while %s: %r", doing, e)
        raise StoreUnavailable(f"the task store (Redis) failed while {doing}") from e


def connect(url: str, socket_timeout_s: float = 5.0,
            connect_timeout_s: float = 2.0) -> aioredis.Redis | RedisCluster:
    """A client for one Redis (redis://, rediss://, unix://) or for a Redis Cluster
    (redis+cluster://, rediss+cluster://; seed nodes comma-separated, the rest are discovered).

    One immediate retry on a broken connection (a pooled socket Redis closed when it restarted;
    in a cluster, a node that failed over), none on a timeout: a hung Redis fails within one
    socket timeout. The store's scripts are safe to repeat (a switch already applied answers ok).
    """
    options = {"socket_timeout": socket_timeout_s, "socket_connect_timeout": connect_timeout_s,
               "retry": Retry(NoBackoff(), 1, supported_errors=(ConnectionError,))}
    scheme, _, rest = url.partition("://")
    if scheme not in CLUSTER_SCHEMES:
        return aioredis.Redis.from_url(url, **options)
    userinfo, at, location = rest.rpartition("@")
    hosts = re.split(r"[/?]", location, maxsplit=1)[0]
    first, *others = hosts.split(",")
    seeds = [ClusterNode(host, int(port or 6379))
             for host, _, port in (seed.rpartition(":") for seed in others)]
    plain = f"{CLUSTER_SCHEMES[scheme]}://{userinfo}{at}{first}{location[len(hosts):]}"
    return RedisCluster.from_url(plain, startup_nodes=seeds, **options)
