"""The store and the server on a real 3-node Redis Cluster (redis-server processes), configured by
a `redis+cluster://` URL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import HANG_GUARD_S, wait_until
from support_topology import RedisClusterProcesses, ServerProcess

from taskdelta.deltas import dumps, random_delta
from taskdelta.server.app import create_app
from taskdelta.server.keys import Keys
from taskdelta.server.settings import Settings
from taskdelta.server.store import Change, RedisStore

pytestmark = pytest.mark.slow
KEY = {"Authorization": "Bearer key-acme"}
INFO = {"kind": "classify", "labels": '["a", "b"]', "nnz": "1", "density": "0.1",
        "base_fingerprint": "sha256:x", "created_at": "0", "provenance": "{}"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    c = RedisClusterProcesses(tmp_path / "cluster")
    c.start()
    yield c
    c.stop()


def tenants_on_distinct_nodes(cluster: RedisClusterProcesses, count: int) -> dict[str, int]:
    """Tenant names whose hash slots live on `count` different nodes -> their node's port."""
    found: dict[int, str] = {}
    for i in range(1000):
        port = cluster.owner_of(Keys().tasks(f"tenant{i}"))
        found.setdefault(port, f"tenant{i}")
        if len(found) == count:
            return {tenant: port for port, tenant in found.items()}
    raise AssertionError("could not spread tenants over the nodes")


async def test_store_round_trip_and_change_feed_across_cluster_nodes(cluster) -> None:
    """A tenant's keys share one slot, so the Lua switch, chunked MGETs and deletes work on a
    cluster; changes committed on any node reach a subscriber held by one node."""
    tenants = tenants_on_distinct_nodes(cluster, 3)
    store = RedisStore(cluster.url, chunk_bytes=64)
    listener = RedisStore(cluster.url)
    received: list[Change] = []

    async def follow() -> None:
        async for change in listener.changes():
            received.append(change)
            if len(received) == 2 * len(tenants):
                return

    following = asyncio.create_task(follow())
    try:
        for _ in range(HANG_GUARD_S * 10):  # the subscription is up once its node counts it
            if any(n[1] for n in (cluster.node(p).pubsub_numsub(Keys().channel())[0]
                                  for p in cluster.ports)):
                break
            await asyncio.sleep(0.1)
        for i, tenant in enumerate(tenants):
            blob = bytes(range(256)) * 4 + bytes([i])  # 17 chunks of 64 bytes
            stored = await store.put(tenant, "t", blob, INFO)
            _, got = await store.get_blob(tenant, "t")
            assert got == blob
            assert [t.name for t in await store.list(tenant)] == ["t"]
            assert await store.usage(tenant) == (1, len(blob))
            assert await store.current_version(tenant, "t") == stored.version
        # every key of a tenant sits on the node that owns its hash tag
        for tenant, port in tenants.items():
            for other in cluster.ports:
                keys = cluster.node(other).keys(f"td:{{t:{tenant}}}:*")
                assert (len(keys) > 0) == (other == port), (tenant, other, keys)
        everything = await store.list_all()
        assert sorted(t.tenant for t in everything) == sorted(tenants)
        for tenant in tenants:
            await store.delete(tenant, "t")
            assert await store.current_version(tenant, "t") is None
        await asyncio.wait_for(following, HANG_GUARD_S)
        assert sorted((c.tenant, c.version is None) for c in received) == sorted(
            (t, deleted) for t in tenants for deleted in (False, True))
        assert await store.ping()
    finally:
        following.cancel()
        await store.close()
        await listener.close()


def test_servers_on_a_cluster_serve_and_see_each_others_changes(
        cluster, tiny_bert, tiny_bert_dir, tmp_path, live_server) -> None:
    """A server process configured with TASKDELTA_REDIS_URL=redis+cluster://... serves uploads;
    a second replica on the same cluster (version_check_s=600) sees its changes by pub/sub."""
    process = ServerProcess("cluster-server", tiny_bert_dir, cluster.url, tmp_path,
                            {"TASKDELTA_API_KEYS": "acme:key-acme"})
    try:
        process.wait_ready()
        other = create_app(Settings(redis_url=cluster.url, data_dir=tmp_path / "other",
                                    api_keys="acme:key-acme", version_check_s=600),
                           base=tiny_bert)
        v1 = random_delta(tiny_bert, 0.01, seed=1, kind="classify", labels=["old-a", "old-b"])
        v2 = random_delta(tiny_bert, 0.01, seed=2, kind="classify", labels=["new-a", "new-b"])
        with (live_server(other) as o,
              httpx.Client(base_url=process.url, headers=KEY, timeout=60) as cp,
              httpx.Client(base_url=o.url, headers=KEY, timeout=60) as co):

            def labels(client: httpx.Client) -> set[str]:
                r = client.post("/v1/tasks/t/classify", json={"texts": ["x"]})
                assert r.status_code == 200, r.text
                return set(r.json()["results"][0]["scores"])

            assert cp.get("/readyz").json()["redis"] is True
            assert cp.put("/v1/tasks/t", content=dumps(v1)).status_code == 201
            assert labels(cp) == labels(co) == {"old-a", "old-b"}
            assert cp.put("/v1/tasks/t", content=dumps(v2)).status_code == 200
            assert labels(cp) == {"new-a", "new-b"}
            wait_until(lambda: labels(co) == {"new-a", "new-b"}, HANG_GUARD_S,
                       "the other replica to hear the change through the cluster")
            assert [t["name"] for t in co.get("/v1/tasks").json()["tasks"]] == ["t"]
            assert cp.delete("/v1/tasks/t").status_code == 200
            wait_until(lambda: co.post("/v1/tasks/t/classify", json={"texts": ["x"]}).status_code
                       == 404, HANG_GUARD_S, "the other replica to answer 404")
            assert cp.get("/v1/tasks/t").status_code == 404
    finally:
        process.stop()
