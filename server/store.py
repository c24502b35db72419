"""The delta store: task blobs and their metadata in Redis.

A put writes the blob as chunks under a fresh version's keys, then one Lua script switches the
task's metadata to that version (checking if_match and the tenant's quotas), removes the
superseded version's chunks (after a short grace) and publishes the change. Readers take the
metadata first and then that version's chunks; chunks of a version never change, so a reader
sees one whole version or, if its chunks are already gone, starts again from the metadata.
The store deals only in bytes and strings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from .errors import (
    NotReplicated,
    StoreUnavailable,
    TaskNotFound,
    VersionConflict,
)
from .keys import Keys
from .redis_client import CLUSTER_SCHEMES, connect, unavailable
from .store_scripts import DELETE, SWITCH, PutRequest, opt

log = logging.getLogger("taskdelta.store")
_READ_BATCH_BYTES = 64 * 1024 * 1024  # one MGET asks for about this much
_WRITE_PIECE_BYTES = 1024 * 1024  # one SET or APPEND of a chunk carries at most this much
_WRITE_BATCH_BYTES = 2 * 1024 * 1024  # one pipeline of them carries about this much


@dataclass(frozen=True)
class StoredTask:
    tenant: str
    name: str
    version: int
    info: dict[str, str]  # the API's metadata plus the store's `version` and `chunks`


@dataclass(frozen=True)
class Change:
    tenant: str
    name: str
    version: int | None  # None: the task was deleted


class DeltaStore(Protocol):
    async def put(self, tenant: str, name: str, blob: bytes, info: dict[str, str],
                  if_match: int | None = None, max_tasks: int | None = None,
                  max_bytes: int | None = None) -> StoredTask: ...
    async def get(self, tenant: str, name: str) -> StoredTask: ...
    async def get_blob(self, tenant: str, name: str,
                       version: int | None = None) -> tuple[StoredTask, bytes]: ...
    async def list(self, tenant: str) -> list[StoredTask]: ...
    async def list_all(self) -> list[StoredTask]: ...
    async def delete(self, tenant: str, name: str, if_match: int | None = None) -> None: ...
    async def current_version(self, tenant: str, name: str) -> int | None: ...
    async def usage(self, tenant: str) -> tuple[int, int]: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...
    def changes(self) -> AsyncIterator[Change]: ...


def _change_message(tenant: str, name: str, version: int | None) -> str:
    return json.dumps({"tenant": tenant, "name": name, "version": version})


def _parse_change(data: bytes | str) -> Change | None:
    try:
        msg = json.loads(data)
        version = None if msg["version"] is None else int(msg["version"])
        return Change(str(msg["tenant"]), str(msg["name"]), version)
    except (ValueError, KeyError, TypeError):
        return None  # not ours: another publisher on the channel


def _task_from_meta(tenant: str, name: str, raw: dict[bytes, bytes]) -> StoredTask:
    info = {k.decode(): v.decode() for k, v in raw.items()}
    return StoredTask(tenant, name, int(info["version"]), info)


def _blob_fields(info: dict[str, str], blob: bytes) -> dict[str, str]:
    """The metadata to store: `bytes` and `sha256` always describe the blob actually stored."""
    digest, size = hashlib.sha256(blob).hexdigest(), str(len(blob))
    if info.get("sha256", digest) != digest:
        raise ValueError("info['sha256'] does not match the blob's sha256")
    if info.get("bytes", size) != size:
        raise ValueError(f"info['bytes'] is {info['bytes']}, the blob has {size} bytes")
    return {**info, "sha256": digest, "bytes": size}


class RedisStore:
    """DeltaStore over redis.asyncio; `url` may be redis://, rediss://, unix:// or, for a
    Redis Cluster, redis+cluster:// or rediss+cluster:// (see `connect`). In a cluster every key
    of a tenant shares one hash slot (keys.py), so the scripts run on one node; the change channel
    uses classic pub/sub, which a cluster broadcasts to every node."""

    def __init__(self, url: str, chunk_bytes: int = 32 * 1024 * 1024, *,
                 keys: Keys | None = None, socket_timeout_s: float = 5.0,
                 connect_timeout_s: float = 2.0, pending_ttl_s: int = 3600,
                 superseded_grace_s: float = 2.0, attempts: int = 8,
                 wait_replicas: int = 0, wait_timeout_s: float = 2.0) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        if wait_replicas and url.partition("://")[0] in CLUSTER_SCHEMES:
            raise ValueError("waiting for replicas (TASKDELTA_REDIS_WAIT_REPLICAS) needs one Redis "
                             "primary, not a Redis Cluster URL")
        if wait_replicas and not 0 < wait_timeout_s < socket_timeout_s:
            raise ValueError(f"the replica wait ({wait_timeout_s} s) must be positive and shorter "
                             f"than the socket timeout ({socket_timeout_s} s)")
        # Acknowledge a put only once this many replicas have received it (0: do not wait)
        self._wait_replicas = wait_replicas
        self._wait_timeout_s = wait_timeout_s
        self.chunk_bytes = chunk_bytes
        self.keys = keys or Keys()
        self._pending_ttl_s = pending_ttl_s  # chunks not yet committed expire on their own
        # A replaced version's chunks outlive the switch this long, so a reader that took the
        # old metadata just before it still finds them; 0 deletes them at once.
        self._grace_ms = round(superseded_grace_s * 1000)
        self._attempts = attempts  # retries when a task changes under a read or a switch
        self._durability_checked = False
        self._redis = connect(url, socket_timeout_s, connect_timeout_s)
        self._switch = self._redis.register_script(SWITCH)
        self._delete = self._redis.register_script(DELETE)

    # -- writes ---------------------------------------------------------------------------

    async def put(self, tenant: str, name: str, blob: bytes, info: dict[str, str],
                  if_match: int | None = None, max_tasks: int | None = None,
                  max_bytes: int | None = None) -> StoredTask:
        """Store `blob` as the task's next version. Refused (and nothing changed) when
        `if_match` is not the current version or a quota would be exceeded. Of two puts racing
        without if_match, the one with the higher version wins, whatever order they finish in."""
        fields = _blob_fields(info, blob)
        await self._warn_if_not_durable()
        req = PutRequest(tenant, name, len(blob), if_match, max_tasks, max_bytes)
        with unavailable(f"storing task {name!r}"):
            await self._redis.sadd(self.keys.tenants(), tenant)
            # Refuse before uploading what the switch would refuse anyway.
            status, detail = await self._run_switch(req, fields, 0, [], None, check_only=True)
            if error := req.refusal(status, detail):
                raise error
            version = int(await self._redis.incr(self.keys.seq(tenant, name)))
            chunk_keys = await self._write_chunks(tenant, name, version, blob)
            fields |= {"version": str(version), "chunks": str(len(chunk_keys))}
            status, detail = await self._commit(req, fields, version, chunk_keys)
        if error := req.refusal(status, detail):
            raise error
        if self._wait_replicas:
            await self._wait_for_replicas(req, version)
        return StoredTask(tenant, name, version, fields)

    async def _wait_for_replicas(self, req: PutRequest, version: int) -> None:
        """Return once `wait_replicas` replicas have received everything up to the commit, else
        raise NotReplicated (the commit stands on the primary: the error says so).

        WAIT counts the replicas that acknowledged the last write *of its own connection*, and
        the pool may have run the commit on another one; so a write that always replicates and
        changes nothing (HINCRBY by 0 on the tenant's usage) goes first on the same connection:
        a replica that has it has every earlier write, the commit included."""
        timeout_ms = max(1, round(self._wait_timeout_s * 1000))
        with unavailable(f"waiting for Redis replicas of task {req.name!r}"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(self.keys.usage(req.tenant), "bytes", 0)
                pipe.wait(self._wait_replicas, timeout_ms)
                _, acked = await pipe.execute()
        if int(acked) < self._wait_replicas:
            raise NotReplicated(
                f"task {req.name!r} version {version} was committed on the Redis primary, but only "
                f"{acked} of the {self._wait_replicas} replicas required "
                f"(TASKDELTA_REDIS_WAIT_REPLICAS) confirmed it within {self._wait_timeout_s:g} s: "
                "it is not acknowledged as replicated. The primary serves it until it is replaced "
                "or deleted; if the primary is lost before a replica has it, it is lost. Check "
                "the replicas; an upload again makes a new version", version)

    async def _write_chunks(self, tenant: str, name: str, version: int, blob: bytes) -> list[str]:
        """Each chunk as a SET of its first piece and APPENDs of the rest, a pipeline of about
        `_WRITE_BATCH_BYTES` at a time: the client joins a pipeline's commands into one buffer
        (and the socket transport may buffer it again), so writing a whole blob in one pipeline
        would hold two more copies of it."""
        count = max(1, math.ceil(len(blob) / self.chunk_bytes))
        chunk_keys = self.keys.chunks(tenant, name, version, count)
        writes = list(self._chunk_writes(chunk_keys, memoryview(blob)))
        per_batch = max(1, _WRITE_BATCH_BYTES // _WRITE_PIECE_BYTES)
        for at in range(0, len(writes), per_batch):
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, first, piece in writes[at:at + per_batch]:
                    if first:
                        pipe.set(key, piece, ex=self._pending_ttl_s)
                    else:
                        pipe.append(key, piece)  # keeps the key's TTL
                await pipe.execute()
        return chunk_keys

    def _chunk_writes(self, chunk_keys: list[str],
                      view: memoryview) -> Iterator[tuple[str, bool, memoryview]]:
        """(key, is its first piece, piece) for every piece of every chunk, in order."""
        for i, key in enumerate(chunk_keys):
            chunk = view[i * self.chunk_bytes:(i + 1) * self.chunk_bytes]
            for at in range(0, max(1, len(chunk)), _WRITE_PIECE_BYTES):
                yield key, at == 0, chunk[at:at + _WRITE_PIECE_BYTES]

    async def _commit(self, req: PutRequest, fields: dict[str, str], version: int,
                      chunk_keys: list[str]) -> tuple[str, str]:
        """Switch the task to `version`; re-read the old version if another put moved it."""
        status, detail = "moved", ""
        for _ in range(self._attempts):
            current = await self._current(req.tenant, req.name)
            status, detail = await self._run_switch(req, fields, version, chunk_keys, current)
            if status != "moved":
                return status, detail
        await self._redis.delete(*chunk_keys)
        return status, detail

    async def _run_switch(self, req: PutRequest, fields: dict[str, str], version: int,
                          chunk_keys: list[str], current: tuple[int, int] | None,
                          check_only: bool = False) -> tuple[str, str]:
        k = self.keys
        old_keys = [] if current is None else k.chunks(req.tenant, req.name, *current)
        keys = [k.meta(req.tenant, req.name), k.tasks(req.tenant), k.usage(req.tenant),
                *chunk_keys, *old_keys]
        args = [req.name, version, opt(req.if_match), opt(req.max_tasks),
                opt(req.max_bytes), req.size, len(chunk_keys),
                opt(None if current is None else current[0]), "1" if check_only else "0",
                k.channel(), _change_message(req.tenant, req.name, version), self._grace_ms,
                *(x for pair in fields.items() for x in pair)]
        status, detail = await self._switch(keys=keys, args=args)
        return status.decode(), detail.decode()

    async def delete(self, tenant: str, name: str, if_match: int | None = None) -> None:
        k = self.keys
        with unavailable(f"deleting task {name!r}"):
            for _ in range(self._attempts):
                current = await self._current(tenant, name)
                if current is None:
                    raise TaskNotFound(f"task {name!r} not found")
                keys = [k.meta(tenant, name), k.tasks(tenant), k.usage(tenant),
                        *k.chunks(tenant, name, *current)]
                args = [name, opt(if_match), current[0], k.channel(),
                        _change_message(tenant, name, None)]
                status, detail = (x.decode() for x in await self._delete(keys=keys, args=args))
                if status == "ok":
                    return
                if status == "missing":
                    raise TaskNotFound(f"task {name!r} not found")
                if status == "conflict":
                    raise VersionConflict(f"task {name!r} is at version {detail}, not {if_match}")
        raise StoreUnavailable(f"task {name!r} kept changing while being deleted")

    # -- reads ----------------------------------------------------------------------------

    async def _current(self, tenant: str, name: str) -> tuple[int, int] | None:
        """(version, chunk count) of the task, None when it does not exist."""
        version, chunks = await self._redis.hmget(self.keys.meta(tenant, name),
                                                  ["version", "chunks"])
        return None if version is None else (int(version), int(chunks))

    async def _read_meta(self, tenant: str, name: str) -> StoredTask:
        raw = await self._redis.hgetall(self.keys.meta(tenant, name))
        if not raw:
            raise TaskNotFound(f"task {name!r} not found")
        return _task_from_meta(tenant, name, raw)

    async def get(self, tenant: str, name: str) -> StoredTask:
        with unavailable(f"reading task {name!r}"):
            return await self._read_meta(tenant, name)

    async def get_blob(self, tenant: str, name: str,
                       version: int | None = None) -> tuple[StoredTask, bytes]:
        """The current version and its blob, checked against its sha256. With `version`,
        VersionConflict unless that is still the current one."""
        with unavailable(f"reading task {name!r}"):
            for _ in range(self._attempts):
                task = await self._read_meta(tenant, name)
                if version is not None and task.version != version:
                    raise VersionConflict(f"task {name!r} is at version {task.version}, "
                                          f"not {version}")
                blob = await self._read_chunks(task)
                if blob is not None:
                    break
            else:
                raise StoreUnavailable(f"task {name!r} kept changing while being read")
        if hashlib.sha256(blob).hexdigest() != task.info.get("sha256"):
            raise StoreUnavailable(f"the stored blob of task {name!r} version {task.version} "
                                   "fails its sha256 check")
        return task, blob

    async def _read_chunks(self, task: StoredTask) -> bytes | None:
        """The version's blob, or None if a chunk is gone (the version was replaced)."""
        keys = self.keys.chunks(task.tenant, task.name, task.version, int(task.info["chunks"]))
        batch = max(1, _READ_BATCH_BYTES // self.chunk_bytes)
        parts: list[bytes] = []
        for start in range(0, len(keys), batch):
            got = await self._redis.mget(keys[start:start + batch])
            if any(part is None for part in got):
                return None
            parts.extend(got)
        return b"".join(parts)

    async def list(self, tenant: str) -> list[StoredTask]:
        with unavailable(f"listing the tasks of tenant {tenant!r}"):
            names = sorted(n.decode() for n in await self._redis.smembers(self.keys.tasks(tenant)))
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self.keys.meta(tenant, name))
                metas = await pipe.execute()
        # A task deleted between the two reads has no metadata left: skip it.
        return [_task_from_meta(tenant, n, raw) for n, raw in zip(names, metas, strict=True) if raw]

    async def list_all(self) -> list[StoredTask]:
        with unavailable("listing tenants"):
            tenants = sorted(t.decode() for t in await self._redis.smembers(self.keys.tenants()))
        return [task for tenant in tenants for task in await self.list(tenant)]

    async def current_version(self, tenant: str, name: str) -> int | None:
        with unavailable(f"reading the version of task {name!r}"):
            version = await self._redis.hget(self.keys.meta(tenant, name), "version")
        return None if version is None else int(version)

    async def usage(self, tenant: str) -> tuple[int, int]:
        """(number of tasks, total blob bytes) of the tenant."""
        with unavailable(f"reading the usage of tenant {tenant!r}"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.scard(self.keys.tasks(tenant))
                pipe.hget(self.keys.usage(tenant), "bytes")
                tasks, used = await pipe.execute()
        return int(tasks), int(used or 0)

    # -- plumbing -------------------------------------------------------------------------

    async def changes(self) -> AsyncIterator[Change]:
        """Every put and delete, from any process, as it is committed. Messages published
        while this is not subscribed (e.g. Redis was down) are lost: on StoreUnavailable a
        consumer should drop what it cached and subscribe again.

        In a cluster the subscription is held by the node that owns the channel name's slot;
        classic PUBLISH reaches every node, so that one node hears every change."""
        if isinstance(self._redis, RedisCluster):
            # the cluster's pub/sub picks its node from the slot map, which a client that has
            # sent nothing yet has not loaded (it would fail with a KeyError)
            with unavailable("reading the cluster's slot map"):
                await self._redis.initialize()
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            with unavailable("listening for task changes"):
                await pubsub.subscribe(self.keys.channel())
                async for message in pubsub.listen():
                    if change := _parse_change(message["data"]):
                        yield change
        finally:
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await pubsub.aclose()

    async def durability_gap(self) -> str | None:
        """Why an acknowledged write might not be on disk yet, or None: Redis answers a write
        after fsyncing it only with `appendonly yes` and `appendfsync always`. None too when
        Redis does not let us look (CONFIG disabled, a managed service): nothing is known."""
        try:
            got = await self._redis.config_get("append*")
        except (RedisError, RedisClusterException, OSError):
            return None
        if not isinstance(got, dict) or not isinstance(got.get("appendonly"), str):
            return None  # a cluster answers per node: not checked here
        if got.get("appendonly") != "yes":
            return "Redis runs without an append-only file (appendonly no)"
        if got.get("appendfsync", "always") != "always":
            return f"Redis fsyncs its append-only file {got['appendfsync']!r}, not 'always'"
        return None

    async def _warn_if_not_durable(self) -> None:
        """Once, at the first upload: the promise that an acknowledged upload survives a crash
        holds only when Redis fsyncs every write (SECURITY.md); say so loudly when it does not."""
        if self._durability_checked:
            return
        self._durability_checked = True
        if gap := await self.durability_gap():
            log.warning("acknowledged uploads may be lost if Redis or its host crashes: %s. Run "
                        "Redis with --appendonly yes --appendfsync always", gap)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:  # noqa: BLE001 - a health probe answers, it does not raise
            return False

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()
