"""The Redis delta store, against a real redis-server (the `redis_proc` fixture) and the
embedded one: whole versions only, atomic replace, if_match, quotas, tenants, change feed,
persistence and failing fast when Redis is away."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from support import HANG_GUARD_S

from taskdelta.server import store as store_module
from taskdelta.server.embedded import EmbeddedRedis
from taskdelta.server.errors import (
    QuotaExceeded,
    StoreUnavailable,
    TaskNotFound,
    VersionConflict,
)
from taskdelta.server.keys import Keys
from taskdelta.server.store import Change, RedisStore, StoredTask


def info(**extra: str) -> dict[str, str]:
    return {"kind": "classify", "labels": '["neg", "pos"]', "nnz": "10", "density": "0.01",
            "base_fingerprint": "sha256:abc", "created_at": "1700000000.0",
            "provenance": "{}", **extra}


def stamped(mark: int, words: int = 64) -> bytes:
    """A blob that says which write made it: `mark` repeated as 4-byte words."""
    return mark.to_bytes(4, "big") * words


def mark_of(blob: bytes) -> int:
    """The mark of a stamped blob; fails if it mixes bytes of two writes."""
    words = {blob[i:i + 4] for i in range(0, len(blob), 4)}
    assert len(words) == 1, f"blob mixes {len(words)} writes"
    return int.from_bytes(words.pop(), "big")


@pytest.fixture
async def store(redis_proc) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_proc.url, chunk_bytes=64)
    yield s
    await s.close()


@pytest.fixture
async def raw(redis_proc) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_proc.url)
    yield r
    await r.aclose()


async def keys_like(r: aioredis.Redis, pattern: str) -> set[str]:
    return {k.decode() async for k in r.scan_iter(match=pattern)}


# -- keys -------------------------------------------------------------------------------------

def test_tenant_keys_share_one_hash_tag() -> None:
    k = Keys()
    tenant_keys = [k.meta("acme", "sst2"), k.seq("acme", "sst2"), k.chunk("acme", "sst2", 3, 0),
                   k.tasks("acme"), k.usage("acme")]
    assert all(key.startswith("td:{t:acme}:") for key in tenant_keys)
    assert k.tasks("acme") != k.tasks("acme2")
    assert "{" not in k.tenants() and "{" not in k.channel()


@pytest.mark.parametrize("bad", ["", "a:b", "a{b", "a}b", "a b"])
def test_keys_refuse_names_that_could_escape_their_slot(bad: str) -> None:
    with pytest.raises(ValueError):
        Keys().meta(bad, "task")
    with pytest.raises(ValueError):
        Keys().meta("tenant", bad)


# -- round trip -------------------------------------------------------------------------------

async def test_put_get_list_delete_round_trip(store: RedisStore) -> None:
    blob = os.urandom(300)
    put = await store.put("acme", "sst2", blob, info())
    assert put.version == 1
    assert put.info["sha256"] == hashlib.sha256(blob).hexdigest()
    assert put.info["bytes"] == "300" and put.info["chunks"] == "5"
    await store.put("acme", "cola", b"x" * 10, info(kind="embed"))

    got = await store.get("acme", "sst2")
    assert got == put
    task, data = await store.get_blob("acme", "sst2")
    assert (task, data) == (put, blob)
    assert [t.name for t in await store.list("acme")] == ["cola", "sst2"]
    assert await store.current_version("acme", "sst2") == 1
    assert await store.usage("acme") == (2, 310)

    await store.delete("acme", "sst2")
    with pytest.raises(TaskNotFound):
        await store.get("acme", "sst2")
    with pytest.raises(TaskNotFound):
        await store.get_blob("acme", "sst2")
    with pytest.raises(TaskNotFound):
        await store.delete("acme", "sst2")
    assert await store.current_version("acme", "sst2") is None
    assert [t.name for t in await store.list("acme")] == ["cola"]
    assert await store.usage("acme") == (1, 10)


async def test_versions_keep_rising_after_delete(store: RedisStore) -> None:
    """A recreated task never reuses a version, so a cache keyed by version cannot go stale."""
    await store.put("acme", "t", b"one", info())
    await store.delete("acme", "t")
    assert (await store.put("acme", "t", b"two", info())).version == 2


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 1000])
async def test_chunked_blob_reassembles_exactly(redis_proc, raw: aioredis.Redis,
                                                size: int) -> None:
    s = RedisStore(redis_proc.url, chunk_bytes=64)
    try:
        blob = os.urandom(size)
        put = await s.put("acme", "t", blob, info())
        chunks = await keys_like(raw, "td:{t:acme}:task:t:blob:*")
        assert len(chunks) == int(put.info["chunks"]) == max(1, -(-size // 64))
        assert (await s.get_blob("acme", "t"))[1] == blob
    finally:
        await s.close()


async def test_committed_chunks_do_not_expire(store: RedisStore, raw: aioredis.Redis) -> None:
    await store.put("acme", "t", os.urandom(200), info())
    for key in await keys_like(raw, "td:{t:acme}:task:t:blob:*"):
        assert await raw.ttl(key) == -1, key


async def test_replace_removes_the_superseded_chunks(redis_proc, raw: aioredis.Redis) -> None:
    s = RedisStore(redis_proc.url, chunk_bytes=64, superseded_grace_s=0)
    try:
        await s.put("acme", "t", stamped(1, 100), info())
        second = await s.put("acme", "t", stamped(2, 30), info())
        assert second.version == 2
        chunks = await keys_like(raw, "td:{t:acme}:task:t:blob:*")
        assert chunks == set(Keys().chunks("acme", "t", 2, int(second.info["chunks"])))
        assert mark_of((await s.get_blob("acme", "t"))[1]) == 2
        assert await s.usage("acme") == (1, 120)

        await s.delete("acme", "t")
        assert await keys_like(raw, "td:{t:acme}:task:t:blob:*") == set()
        assert await s.usage("acme") == (0, 0)
    finally:
        await s.close()


async def test_superseded_chunks_expire_after_the_grace(store: RedisStore,
                                                       raw: aioredis.Redis) -> None:
    first = await store.put("acme", "t", stamped(1, 100), info())
    second = await store.put("acme", "t", stamped(2, 30), info())
    k = Keys()
    for key in k.chunks("acme", "t", 1, int(first.info["chunks"])):
        assert 0 < await raw.pttl(key) <= 2000, key
    for key in k.chunks("acme", "t", 2, int(second.info["chunks"])):
        assert await raw.pttl(key) == -1, key
    await store.delete("acme", "t")  # a delete does not wait
    assert await keys_like(raw, "td:{t:acme}:task:t:blob:2:*") == set()


async def test_info_must_describe_the_blob(store: RedisStore) -> None:
    with pytest.raises(ValueError, match="sha256"):
        await store.put("acme", "t", b"abc", info(sha256="0" * 64))
    with pytest.raises(ValueError, match="bytes"):
        await store.put("acme", "t", b"abc", info(bytes="4"))
    with pytest.raises(TaskNotFound):
        await store.get("acme", "t")


async def test_corrupted_chunk_fails_the_checksum(store: RedisStore,
                                                  raw: aioredis.Redis) -> None:
    put = await store.put("acme", "t", os.urandom(200), info())
    await raw.set(Keys().chunk("acme", "t", put.version, 1), os.urandom(64))
    with pytest.raises(StoreUnavailable, match="sha256"):
        await store.get_blob("acme", "t")


# -- versions and concurrency -----------------------------------------------------------------

async def test_if_match_mismatch_conflicts_and_changes_nothing(store: RedisStore,
                                                               raw: aioredis.Redis) -> None:
    with pytest.raises(VersionConflict, match="does not exist"):
        await store.put("acme", "t", b"new", info(), if_match=1)
    assert await store.usage("acme") == (0, 0)

    first = await store.put("acme", "t", stamped(1), info())
    before = set(await keys_like(raw, "td:*"))
    with pytest.raises(VersionConflict, match="at version 1, not 7"):
        await store.put("acme", "t", stamped(2), info(), if_match=7)
    with pytest.raises(VersionConflict):
        await store.delete("acme", "t", if_match=7)
    assert await keys_like(raw, "td:*") == before
    assert await store.get_blob("acme", "t") == (first, stamped(1))

    second = await store.put("acme", "t", stamped(3), info(), if_match=1)
    assert second.version > first.version
    await store.delete("acme", "t", if_match=second.version)
    assert await store.current_version("acme", "t") is None


async def test_concurrent_puts_with_the_same_if_match_let_exactly_one_win(
        store: RedisStore) -> None:
    await store.put("acme", "t", stamped(0), info())
    results = await asyncio.gather(
        *(store.put("acme", "t", stamped(i), info(), if_match=1) for i in range(1, 9)),
        return_exceptions=True)
    winners = [r for r in results if isinstance(r, StoredTask)]
    assert len(winners) == 1
    assert all(isinstance(r, VersionConflict) for r in results if r is not winners[0])
    task, blob = await store.get_blob("acme", "t")
    assert task == winners[0] and mark_of(blob) == results.index(winners[0]) + 1


async def test_replace_drops_metadata_fields_of_the_old_version(store: RedisStore) -> None:
    await store.put("acme", "t", b"1", info(note="only in version 1"))
    assert (await store.get("acme", "t")).info["note"] == "only in version 1"
    await store.put("acme", "t", b"2", info())
    assert "note" not in (await store.get("acme", "t")).info


async def test_an_older_put_committing_late_never_replaces_a_newer_one(
        store: RedisStore, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Last writer wins by version: put A takes version 2, put B takes 3 and commits first;
    A's late commit must leave version 3 in place and remove A's chunks."""
    write_chunks = store._write_chunks
    overtaken: list[StoredTask] = []

    async def overtaken_while_uploading(tenant: str, name: str, version: int, blob: bytes):
        written = await write_chunks(tenant, name, version, blob)
        if not overtaken:
            overtaken.append(StoredTask(tenant, name, version, {}))
            overtaken.append(await store.put("acme", "t", stamped(3), info()))
        return written

    await store.put("acme", "t", stamped(1), info())
    monkeypatch.setattr(store, "_write_chunks", overtaken_while_uploading)
    late = await store.put("acme", "t", stamped(2), info())
    assert (late.version, overtaken[1].version) == (2, 3)
    task, blob = await store.get_blob("acme", "t")
    assert task.version == 3 and mark_of(blob) == 3
    assert await keys_like(raw, "td:{t:acme}:task:t:blob:2:*") == set()
    assert await store.usage("acme") == (1, len(stamped(3)))


async def test_chunks_that_expired_before_the_commit_are_refused(
        store: RedisStore, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncommitted chunks carry a TTL (so a crashed upload leaves nothing behind); if one is
    gone at commit time the put fails whole and the old version stays."""
    first = await store.put("acme", "t", stamped(1, 100), info())
    write_chunks = store._write_chunks

    async def one_expires(tenant: str, name: str, version: int, blob: bytes):
        written = await write_chunks(tenant, name, version, blob)
        assert all([await raw.ttl(key) > 0 for key in written])
        await raw.delete(written[-1])
        return written

    monkeypatch.setattr(store, "_write_chunks", one_expires)
    with pytest.raises(StoreUnavailable, match="took too long"):
        await store.put("acme", "t", stamped(2, 100), info())
    assert await store.get_blob("acme", "t") == (first, stamped(1, 100))
    assert await keys_like(raw, "td:{t:acme}:task:t:blob:*") == set(
        Keys().chunks("acme", "t", 1, int(first.info["chunks"])))


async def test_get_blob_of_a_replaced_version_conflicts(store: RedisStore) -> None:
    await store.put("acme", "t", stamped(1), info())
    await store.put("acme", "t", stamped(2), info())
    assert mark_of((await store.get_blob("acme", "t", version=2))[1]) == 2
    with pytest.raises(VersionConflict):
        await store.get_blob("acme", "t", version=1)


@pytest.mark.parametrize(("grace_s", "expected"), [(0, 2), (2.0, 1)])
async def test_a_read_overtaken_by_a_replace_returns_one_whole_version(
        redis_proc, monkeypatch: pytest.MonkeyPatch, grace_s: float, expected: int) -> None:
    """The reader holds version 1's metadata when version 2 lands. Within the grace it still
    reads version 1 whole; without one, version 1's chunks are gone and it reads version 2."""
    reader = RedisStore(redis_proc.url, chunk_bytes=64)
    writer = RedisStore(redis_proc.url, chunk_bytes=64, superseded_grace_s=grace_s)
    try:
        await writer.put("acme", "t", stamped(1, 200), info())
        read_chunks = reader._read_chunks
        raced: list[StoredTask] = []

        async def replaced_under_the_reader(task: StoredTask) -> bytes | None:
            if not raced:
                raced.append(await writer.put("acme", "t", stamped(2, 200), info()))
            return await read_chunks(task)

        monkeypatch.setattr(reader, "_read_chunks", replaced_under_the_reader)
        task, blob = await reader.get_blob("acme", "t")
        assert raced and raced[0].version == 2
        assert task.version == mark_of(blob) == expected
    finally:
        await reader.close()
        await writer.close()


@pytest.mark.parametrize("grace_s", [0, 2.0])
async def test_readers_never_see_half_a_delta_during_replaces(
        redis_proc, monkeypatch: pytest.MonkeyPatch, grace_s: float) -> None:
    """Each blob is stamped with its write's mark, and so is its metadata: a reader must get
    one whole write, with that write's metadata, however the replaces interleave. Without a
    grace a reader may also give up cleanly (StoreUnavailable) when every retry is overtaken;
    with the default grace it never needs to."""
    monkeypatch.setattr(store_module, "_READ_BATCH_BYTES", 256)  # several MGETs per read
    writer = RedisStore(redis_proc.url, chunk_bytes=64, superseded_grace_s=grace_s)
    readers = [RedisStore(redis_proc.url, chunk_bytes=64) for _ in range(3)]
    writes = 60
    seen: list[int] = []
    gave_up: list[StoreUnavailable] = []
    try:
        await writer.put("acme", "t", stamped(0, 300), info(provenance="0"))

        async def write() -> None:
            for mark in range(1, writes + 1):
                await writer.put("acme", "t", stamped(mark, 300), info(provenance=str(mark)))

        async def read(r: RedisStore) -> None:
            while not done.is_set():
                try:
                    task, blob = await r.get_blob("acme", "t")
                except StoreUnavailable as e:
                    assert "kept changing" in e.message
                    gave_up.append(e)
                    continue
                assert mark_of(blob) == int(task.info["provenance"])
                seen.append(mark_of(blob))

        done = asyncio.Event()
        reading = [asyncio.create_task(read(r)) for r in readers]
        await asyncio.wait_for(write(), HANG_GUARD_S)
        done.set()
        await asyncio.wait_for(asyncio.gather(*reading), HANG_GUARD_S)
        assert len(set(seen)) > 2, "the readers never overlapped the writes"
        assert len(gave_up) < len(seen)
        if grace_s:
            assert gave_up == []
        assert mark_of((await readers[0].get_blob("acme", "t"))[1]) == writes
    finally:
        for s in (writer, *readers):
            await s.close()


# -- quotas and tenants -----------------------------------------------------------------------

async def test_task_count_quota(store: RedisStore, raw: aioredis.Redis) -> None:
    await store.put("acme", "a", b"1", info(), max_tasks=2)
    await store.put("acme", "b", b"2", info(), max_tasks=2)
    with pytest.raises(QuotaExceeded, match="already has 2 tasks, the limit is 2"):
        await store.put("acme", "c", b"3", info(), max_tasks=2)
    # Replacing an existing task does not add one.
    assert (await store.put("acme", "b", b"22", info(), max_tasks=2)).version == 2
    assert await store.usage("acme") == (2, 3)
    assert await keys_like(raw, "td:{t:acme}:task:c:blob:*") == set()
    with pytest.raises(TaskNotFound):
        await store.get("acme", "c")


async def test_bytes_quota_counts_the_replaced_version_as_freed(store: RedisStore,
                                                                raw: aioredis.Redis) -> None:
    await store.put("acme", "a", b"x" * 600, info(), max_bytes=1000)
    with pytest.raises(QuotaExceeded, match="to 1001 bytes, the limit is 1000"):
        await store.put("acme", "b", b"y" * 401, info(), max_bytes=1000)
    # 600 -> 1000 replaces in place: 1000 bytes in all, within the limit.
    await store.put("acme", "a", b"z" * 1000, info(), max_bytes=1000)
    assert await store.usage("acme") == (1, 1000)
    with pytest.raises(QuotaExceeded):
        await store.put("acme", "a", b"z" * 1001, info(), max_bytes=1000)
    assert (await store.get_blob("acme", "a"))[1] == b"z" * 1000
    assert await keys_like(raw, "td:{t:acme}:task:b:blob:*") == set()


async def test_quota_refused_after_upload_leaves_no_chunks(
        store: RedisStore, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another put can take the last slot while this one uploads: the switch itself refuses
    and deletes the chunks it would have committed."""
    check = store._run_switch
    raced: list[str] = []

    async def racing_check(*args, check_only: bool = False, **kwargs):
        result = await check(*args, check_only=check_only, **kwargs)
        if check_only and not raced:
            raced.append("other")
            await store.put("acme", "other", b"o", info())
        return result

    monkeypatch.setattr(store, "_run_switch", racing_check)
    with pytest.raises(QuotaExceeded):
        await store.put("acme", "t", os.urandom(500), info(), max_tasks=1)
    assert raced
    assert await keys_like(raw, "td:{t:acme}:task:t:blob:*") == set()
    with pytest.raises(TaskNotFound):
        await store.get("acme", "t")
    assert await store.usage("acme") == (1, 1)


async def test_tenants_are_isolated(store: RedisStore) -> None:
    await store.put("a", "secret", b"a's delta", info())
    await store.put("b", "other", b"b's delta", info())
    with pytest.raises(TaskNotFound):
        await store.get("b", "secret")
    with pytest.raises(TaskNotFound):
        await store.get_blob("b", "secret")
    with pytest.raises(TaskNotFound):
        await store.delete("b", "secret")
    assert [t.name for t in await store.list("b")] == ["other"]
    assert await store.usage("b") == (1, 9)
    assert (await store.get_blob("a", "secret"))[1] == b"a's delta"
    everything = await store.list_all()
    assert [(t.tenant, t.name) for t in everything] == [("a", "secret"), ("b", "other")]


# -- change feed ------------------------------------------------------------------------------

async def test_changes_are_published_for_put_and_delete(store: RedisStore,
                                                        raw: aioredis.Redis) -> None:
    received: list[Change] = []

    async def follow() -> None:
        async for change in store.changes():
            received.append(change)
            if len(received) == 3:
                return

    following = asyncio.create_task(follow())
    while not (await raw.pubsub_numsub(Keys().channel()))[0][1]:
        await asyncio.sleep(0.01)
    await store.put("acme", "t", b"1", info())
    await store.put("acme", "t", b"2", info())
    await store.delete("acme", "t")
    await asyncio.wait_for(following, HANG_GUARD_S)
    assert received == [Change("acme", "t", 1), Change("acme", "t", 2), Change("acme", "t", None)]


async def test_refused_writes_publish_nothing(store: RedisStore, raw: aioredis.Redis) -> None:
    pubsub = raw.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(Keys().channel())
    await store.put("acme", "t", b"1", info())
    with pytest.raises(VersionConflict):
        await store.put("acme", "t", b"2", info(), if_match=5)
    await store.put("acme", "u", b"3", info())
    messages = []

    async def receive_two() -> None:
        while len(messages) < 2:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None:  # None: nothing yet, or the subscribe confirmation
                messages.append(store_module._parse_change(message["data"]))

    await asyncio.wait_for(receive_two(), HANG_GUARD_S)
    assert messages == [Change("acme", "t", 1), Change("acme", "u", 1)]
    await pubsub.aclose()


# -- persistence and failure ------------------------------------------------------------------

async def test_data_survives_a_redis_restart(redis_proc, store: RedisStore) -> None:
    blob = os.urandom(500)
    put = await store.put("acme", "t", blob, info())
    redis_proc.restart()
    # The same store: its pooled connections died with the old process, and so did the
    # server's script cache.
    assert await store.get_blob("acme", "t") == (put, blob)
    assert (await store.put("acme", "u", b"after", info())).version == 1
    fresh = RedisStore(redis_proc.url, chunk_bytes=64)
    try:
        assert await fresh.get_blob("acme", "t") == (put, blob)
        assert await fresh.usage("acme") == (2, 505)
    finally:
        await fresh.close()


async def test_stopped_redis_fails_fast_and_recovers(redis_proc) -> None:
    s = RedisStore(redis_proc.url, connect_timeout_s=1.0, socket_timeout_s=1.0)
    try:
        await s.put("acme", "t", b"kept", info())
        redis_proc.stop()
        assert await asyncio.wait_for(s.ping(), HANG_GUARD_S) is False
        calls = [lambda: s.get("acme", "t"), lambda: s.get_blob("acme", "t"),
                 lambda: s.list("acme"), lambda: s.list_all(),
                 lambda: s.put("acme", "u", b"x", info()), lambda: s.delete("acme", "t"),
                 lambda: s.current_version("acme", "t"), lambda: s.usage("acme")]
        for call in calls:
            with pytest.raises(StoreUnavailable, match="Redis"):
                await asyncio.wait_for(call(), HANG_GUARD_S)
        redis_proc.start()
        assert await s.ping() is True
        assert (await s.get_blob("acme", "t"))[1] == b"kept"
    finally:
        await s.close()


async def test_hung_redis_times_out_as_store_unavailable(redis_proc) -> None:
    s = RedisStore(redis_proc.url, socket_timeout_s=0.5)
    try:
        await s.put("acme", "t", b"kept", info())
        os.kill(redis_proc.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(s.get("acme", "t"), HANG_GUARD_S)
            assert await asyncio.wait_for(s.ping(), HANG_GUARD_S) is False
        finally:
            os.kill(redis_proc.proc.pid, signal.SIGCONT)
        assert (await s.get_blob("acme", "t"))[1] == b"kept"
    finally:
        await s.close()


async def test_change_feed_ends_with_store_unavailable_when_redis_stops(redis_proc,
                                                                      store: RedisStore) -> None:
    async def follow() -> None:
        async for _ in store.changes():
            pass

    following = asyncio.create_task(follow())
    probe = aioredis.Redis.from_url(redis_proc.url)
    while not (await probe.pubsub_numsub(Keys().channel()))[0][1]:
        await asyncio.sleep(0.01)
    await probe.aclose()
    redis_proc.stop()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(following, HANG_GUARD_S)


# -- embedded Redis ---------------------------------------------------------------------------

async def test_embedded_redis_keeps_acknowledged_writes_across_reopen(tmp_path) -> None:
    blob = os.urandom(3000)
    with EmbeddedRedis(tmp_path) as embedded:
        assert embedded.url.startswith("unix://")
        s = RedisStore(embedded.url, chunk_bytes=1024)
        put = await s.put("acme", "t", blob, info())
        await s.close()
    assert not embedded.running

    with EmbeddedRedis(tmp_path) as reopened:
        s = RedisStore(reopened.url)
        try:
            assert await s.get_blob("acme", "t") == (put, blob)
            assert [t.name for t in await s.list_all()] == ["t"]
        finally:
            await s.close()


def test_embedded_redis_refuses_a_data_dir_in_use(tmp_path) -> None:
    with EmbeddedRedis(tmp_path), pytest.raises(RuntimeError, match="in use"):
        EmbeddedRedis(tmp_path)
