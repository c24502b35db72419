"""What an acknowledged upload means beyond the compose Redis (SECURITY.md, *Durability*): the
embedded Redis fsyncs every write as compose's does, and with TASKDELTA_REDIS_WAIT_REPLICAS=n an
upload is acknowledged only once Redis `WAIT` reports n replicas have it; fewer within the
timeout is a 503 that says the version was committed on the primary, not that nothing happened.

Real redis-server processes: the test's primary (conftest's redis_proc) and a replica started with
`--replicaof` on a free port."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from support import HANG_GUARD_S, auth, redis_binary, settings_for, wait_until

from taskdelta.deltas import dumps, random_delta
from taskdelta.server.app import create_app
from taskdelta.server.embedded import EmbeddedRedis, free_port, wait_for_ping
from taskdelta.server.errors import NotReplicated
from taskdelta.server.keys import Keys
from taskdelta.server.store import RedisStore


class Replica:
    """A redis-server replicating `primary_port`, stoppable."""

    def __init__(self, data_dir: Path, primary_port: int) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(data_dir), "--replicaof", "127.0.0.1", str(primary_port), "--save", "",
             "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for_ping(("127.0.0.1", self.port), HANG_GUARD_S, self.proc)
        self.client = redis.Redis(port=self.port)

    def in_sync(self) -> bool:
        return self.client.info("replication").get("master_link_status") == "up"

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def replica(redis_proc, tmp_path) -> Iterator[Replica]:
    r = Replica(tmp_path / "replica", redis_proc.port)
    try:
        wait_until(r.in_sync, HANG_GUARD_S, "the replica to sync with the primary")
        yield r
    finally:
        r.stop()


@pytest.fixture
def delta(tiny_bert) -> bytes:
    return dumps(random_delta(tiny_bert, 0.001, seed=1, kind="embed"))


def test_an_upload_is_acknowledged_once_its_replica_has_it(tiny_bert, redis_proc, replica, delta,
                                                           tmp_path, live_server):
    s = settings_for(redis_proc.url, tmp_path, redis_wait_replicas=1, redis_wait_timeout_s=2.0)
    with live_server(create_app(s, base=tiny_bert)) as srv, \
            httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=HANG_GUARD_S) as c:
        for version in (1, 2):
            r = c.put("/v1/tasks/t", content=delta)
            assert r.status_code in (200, 201), r.text
            assert r.json()["version"] == version
            # acknowledged: the replica holds the committed version already
            assert replica.client.hget(Keys().meta("acme", "t"), "version") == str(version).encode()


def test_with_the_replica_stopped_an_upload_is_a_503_that_names_the_version_on_the_primary(
        tiny_bert, redis_proc, replica, delta, tmp_path, live_server):
    s = settings_for(redis_proc.url, tmp_path, redis_wait_replicas=1, redis_wait_timeout_s=0.5)
    with live_server(create_app(s, base=tiny_bert)) as srv, \
            httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=HANG_GUARD_S) as c:
        assert c.put("/v1/tasks/t", content=delta).status_code == 201
        replica.stop()
        r = c.put("/v1/tasks/t", content=delta)
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "1"
        message = r.json()["error"]["message"]
        assert "version 2 was committed on the Redis primary" in message, message
        assert "only 0 of the 1 replicas" in message and "not acknowledged" in message, message
        # what the message says is what happened: the primary has version 2 and serves it
        got = c.get("/v1/tasks/t")
        assert got.status_code == 200 and got.json()["version"] == 2
        assert c.post("/v1/tasks/t/embed", json={"texts": ["x"]}).json()["version"] == 2


async def test_the_store_counts_the_replicas_it_was_asked_for(redis_proc, replica):
    """One replica: WAIT 1 acknowledges, WAIT 2 cannot (deterministic, whatever the timing)."""
    info = {"kind": "embed", "labels": "[]", "nnz": "1", "density": "0.1",
            "base_fingerprint": "fp", "created_at": "0", "provenance": "{}"}
    one = RedisStore(redis_proc.url, wait_replicas=1, wait_timeout_s=2.0)
    two = RedisStore(redis_proc.url, wait_replicas=2, wait_timeout_s=0.2)
    try:
        assert (await one.put("acme", "a", b"x" * 5000, info)).version == 1
        with pytest.raises(NotReplicated, match="only 1 of the 2 replicas") as refused:
            await two.put("acme", "a", b"y" * 5000, info)
        assert refused.value.version == 2
        assert (await one.get("acme", "a")).version == 2  # committed on the primary
    finally:
        await one.close()
        await two.close()


def test_replica_waits_are_refused_where_they_cannot_hold():
    with pytest.raises(ValueError, match="Redis Cluster"):
        RedisStore("redis+cluster://127.0.0.1:1", wait_replicas=1)
    with pytest.raises(ValueError, match="shorter than the socket timeout"):
        RedisStore("redis://127.0.0.1:1", wait_replicas=1, wait_timeout_s=5.0)


async def test_replica_waits_with_the_embedded_redis_stop_the_server_at_start(tiny_bert, tmp_path):
    """The embedded Redis has no replicas: asking to wait for one is a startup error that says so,
    not a server whose every upload is a 503 (and no embedded Redis is left running)."""
    s = settings_for(None, tmp_path, redis_wait_replicas=1, redis_wait_timeout_s=2.0)
    app = create_app(s, base=tiny_bert)
    with pytest.raises(ValueError, match="needs TASKDELTA_REDIS_URL: the embedded Redis has no replicas"):
        async with app.router.lifespan_context(app):
            pass
    assert not any((tmp_path / "data").glob("**/*.aof*"))


async def test_the_embedded_redis_fsyncs_every_write(tmp_path):
    """The default deployment (no TASKDELTA_REDIS_URL) keeps the compose promise: Redis answers a
    write after its append-only file is fsynced."""
    with EmbeddedRedis(tmp_path / "data") as embedded:
        client = redis.Redis.from_url(embedded.url)
        try:
            got = client.config_get("append*")
        finally:
            client.close()
        assert got["appendonly"] == "yes" and got["appendfsync"] == "always", got
        store = RedisStore(embedded.url)
        try:
            assert await store.durability_gap() is None  # so the store does not warn
        finally:
            await store.close()
