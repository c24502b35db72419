"""The decoded-delta cache is shared fairly by tenants, and a delta too large for it is fetched and
decoded once per request, not once per lookup (issue 14, item 10)."""

from __future__ import annotations

import httpx

from taskdelta.deltas import dumps, random_delta
from taskdelta.server.app import create_app
from taskdelta.server.cache import CacheEntry, DeltaCache
from taskdelta.server.settings import Settings


def fill(cache: DeltaCache, tenant: str, names: range, nbytes: int = 10) -> None:
    for i in names:
        cache.put((tenant, f"t{i}"), CacheEntry(version=1, value=object(), nbytes=nbytes))


def held(cache: DeltaCache, tenant: str, names: range) -> list[int]:
    return [i for i in names if cache.get((tenant, f"t{i}")) is not None]


def test_a_tenant_streaming_large_deltas_does_not_evict_one_within_its_share():
    """Tenant b holds 30 of 100 bytes; tenant a then cycles through 20 deltas. A plain LRU evicts
    b's (the oldest); the fair cache evicts a's own, since a is over its half and b is not."""
    cache = DeltaCache(capacity_bytes=100)
    fill(cache, "b", range(3))
    fill(cache, "a", range(20))
    assert held(cache, "b", range(3)) == [0, 1, 2]
    assert cache.tenant_bytes("a") == 70 and cache.nbytes == 100
    assert held(cache, "a", range(20)) == list(range(13, 20))  # a's most recent, LRU within a


def test_a_tenant_alone_may_use_the_whole_cache_and_yields_when_others_arrive():
    cache = DeltaCache(capacity_bytes=100)
    fill(cache, "a", range(10))
    assert len(cache) == 10  # no share is reserved for tenants that are not there
    fill(cache, "b", range(5))
    assert held(cache, "b", range(5)) == list(range(5))  # b got its share from a
    assert cache.tenant_bytes("a") == 50 and cache.tenant_bytes("b") == 50
    fill(cache, "b", range(5, 7))  # b past its share now evicts its own least recent first
    assert cache.tenant_bytes("a") == 50 and held(cache, "b", range(7)) == [2, 3, 4, 5, 6]


def test_growing_an_entry_evicts_its_tenant_over_share_first():
    cache = DeltaCache(capacity_bytes=100)
    fill(cache, "b", range(4))
    value = object()
    cache.put(("a", "big"), CacheEntry(version=1, value=value, nbytes=50))
    fill(cache, "a", range(1))
    cache.grow(("a", "big"), value, 20)  # a: 80 of 100, over its half
    assert held(cache, "b", range(4)) == [0, 1, 2, 3]
    assert cache.nbytes <= 100


def test_a_delta_larger_than_the_cache_is_held_for_a_moment_only():
    cache = DeltaCache(capacity_bytes=100, oversize_hold_s=3600)
    big = CacheEntry(version=1, value=object(), nbytes=1000)
    cache.put(("a", "huge"), big)
    assert cache.get(("a", "huge")) is big  # the same request's next lookup finds it
    assert cache.nbytes == 0 and len(cache) == 0  # never counted in the bound
    cache.invalidate(("a", "huge"))
    assert cache.get(("a", "huge")) is None
    expired = DeltaCache(capacity_bytes=100, oversize_hold_s=0)
    expired.put(("a", "huge"), big)
    assert expired.get(("a", "huge")) is None  # past its hold: fetched again by the next request


def test_an_oversized_delta_is_fetched_once_per_request(tiny_bert, redis_proc, tmp_path,
                                                        live_server):
    """A cache smaller than the delta: resolving the task and running it share one read and one
    decode (a plain cache read it twice per request); requests within the hold share it too."""
    s = Settings(redis_url=redis_proc.url, data_dir=tmp_path / "data", auth=False,
                 cache_bytes=1024)
    data = dumps(random_delta(tiny_bert, 0.01, seed=1, kind="classify", labels=["a", "b"]))
    with live_server(create_app(s, base=tiny_bert)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.put("/v1/tasks/big", content=data).status_code == 201
        store = srv.state.store
        reads: list[str] = []
        original = store.get_blob

        async def counting(tenant, name, version=None):
            reads.append(name)
            return await original(tenant, name, version)

        store.get_blob = counting
        for _ in range(3):
            assert c.post("/v1/tasks/big/classify", json={"texts": ["x"]}).status_code == 200
        assert reads == ["big"]
