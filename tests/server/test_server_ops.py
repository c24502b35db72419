"""Operational behaviour of the server: metrics, readiness, deadlines, quotas, keys, replicas."""

from __future__ import annotations

import json
import logging

import httpx
from support import HANG_GUARD_S, classify_delta, wait_until

from taskdelta.client import hash_api_key
from taskdelta.deltas import dumps
from taskdelta.server.app import create_app
from taskdelta.server.settings import Settings

KEY = {"Authorization": "Bearer key-acme"}


def make_settings(redis_url: str, tmp_path, **over) -> Settings:
    base = dict(redis_url=redis_url, data_dir=tmp_path / "data",
                api_keys="acme:key-acme", version_check_s=0.2)
    return Settings(**(base | over))


def test_metrics_expose_routes_swaps_cache_and_uploads(tiny_bert, redis_proc, tmp_path, live_server):
    with live_server(create_app(make_settings(redis_proc.url, tmp_path), base=tiny_bert)) as srv:
        with httpx.Client(base_url=srv.url, headers=KEY, timeout=30) as c:
            c.put("/v1/tasks/a", content=dumps(classify_delta(tiny_bert, 1)))
            c.put("/v1/tasks/b", content=dumps(classify_delta(tiny_bert, 2)))
            c.put("/v1/tasks/bad", content=b"not a delta")
            for name in ("a", "b", "a"):
                assert c.post(f"/v1/tasks/{name}/classify", json={"texts": ["hi"]}).status_code == 200
            text = c.get("/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['taskdelta_uploads_total{outcome="created"}'] == 2
    assert samples['taskdelta_uploads_total{outcome="rejected"}'] == 1
    assert samples["taskdelta_swaps_total"] >= 3  # a, b, a: three different swap-ins
    assert samples["taskdelta_batch_size_count"] == 3
    assert samples["taskdelta_cache_misses_total"] >= 2
    assert samples["taskdelta_cache_bytes"] > 0
    assert any(k.startswith('taskdelta_http_request_seconds_count{method="POST",'
                            'route="/v1/tasks/{task}/classify",status="200"}') for k in samples)


def test_readyz_follows_redis_and_cached_tasks_keep_serving(tiny_bert, redis_proc, tmp_path,
                                                            live_server):
    s = make_settings(redis_proc.url, tmp_path, version_check_s=60.0)
    with live_server(create_app(s, base=tiny_bert)) as srv:
        with httpx.Client(base_url=srv.url, headers=KEY, timeout=30) as c:
            c.put("/v1/tasks/a", content=dumps(classify_delta(tiny_bert, 1)))
            first = c.post("/v1/tasks/a/classify", json={"texts": ["hi"]}).json()
            assert c.get("/readyz").status_code == 200
            redis_proc.stop()
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["redis"] is False
            assert c.get("/healthz").status_code == 200
            # a cached task keeps serving; what needs Redis fails fast with 503
            assert c.post("/v1/tasks/a/classify", json={"texts": ["hi"]}).json() == first
            r = c.get("/v1/tasks")
            assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
            redis_proc.start()
            wait_until(lambda: c.get("/readyz").status_code == 200, HANG_GUARD_S,
                       "readiness after Redis came back")
            assert [t["name"] for t in c.get("/v1/tasks").json()["tasks"]] == ["a"]


def test_deadline_gives_504(tiny_bert, redis_proc, tmp_path, live_server):
    s = make_settings(redis_proc.url, tmp_path, request_timeout_s=1e-6)
    with live_server(create_app(s, base=tiny_bert)) as srv:
        r = httpx.post(f"{srv.url}/v1/tasks/base/embed", json={"texts": ["x"]}, headers=KEY)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"


def test_tenant_quotas(tiny_bert, redis_proc, tmp_path, live_server):
    s = make_settings(redis_proc.url, tmp_path, max_tasks_per_tenant=2)
    blob = dumps(classify_delta(tiny_bert, 1))
    with live_server(create_app(s, base=tiny_bert)) as srv:
        with httpx.Client(base_url=srv.url, headers=KEY, timeout=30) as c:
            assert c.put("/v1/tasks/a", content=blob).status_code == 201
            assert c.put("/v1/tasks/b", content=blob).status_code == 201
            assert c.put("/v1/tasks/a", content=blob).status_code == 200  # replacing is fine
            r = c.put("/v1/tasks/c", content=blob)
            assert r.status_code == 403 and r.json()["error"]["type"] == "quota_exceeded"
    s = make_settings(redis_proc.url, tmp_path, max_bytes_per_tenant=len(blob) * 2 + 10,
                      api_keys="other:key-other")
    with live_server(create_app(s, base=tiny_bert)) as srv:
        h = {"Authorization": "Bearer key-other"}
        with httpx.Client(base_url=srv.url, headers=h, timeout=30) as c:
            assert c.put("/v1/tasks/a", content=blob).status_code == 201
            assert c.put("/v1/tasks/b", content=blob).status_code == 201
            assert c.put("/v1/tasks/c", content=blob).status_code == 403


def test_upload_size_limit_is_413(tiny_bert, redis_proc, tmp_path, live_server):
    s = make_settings(redis_proc.url, tmp_path, max_delta_bytes=4096)
    with live_server(create_app(s, base=tiny_bert)) as srv:
        r = httpx.put(f"{srv.url}/v1/tasks/a", content=b"\0" * 10_000, headers=KEY)
        assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"


def test_keys_file_holds_digests_and_admin(tiny_bert, redis_proc, tmp_path, live_server):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"tenants": {"acme": [hash_api_key("s3cret")]},
                                "admin": [hash_api_key("root-key")]}))
    s = make_settings(redis_proc.url, tmp_path, api_keys=None, keys_file=keys)
    with live_server(create_app(s, base=tiny_bert)) as srv:
        ok = httpx.get(f"{srv.url}/v1/tasks", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        digest = hash_api_key("s3cret")  # the digest itself is not a key
        assert httpx.get(f"{srv.url}/v1/tasks",
                         headers={"Authorization": f"Bearer {digest}"}).status_code == 401
        assert httpx.get(f"{srv.url}/v1/tasks?all=true",
                         headers={"Authorization": "Bearer root-key"}).status_code == 200


def test_auth_off_is_one_tenant_and_said_loudly(tiny_bert, redis_proc, tmp_path, live_server, caplog):
    s = make_settings(redis_proc.url, tmp_path, auth=False, api_keys=None)
    with caplog.at_level(logging.WARNING, logger="taskdelta.server"):
        with live_server(create_app(s, base=tiny_bert)) as srv:
            assert httpx.get(f"{srv.url}/v1/tasks").status_code == 200
    assert any("AUTH IS OFF" in r.getMessage() for r in caplog.records)


def test_replica_serves_new_version_within_bound(tiny_bert, redis_proc, tmp_path, live_server):
    """Replica B drops its cached delta on A's upload (pub/sub); with the message lost, the
    version re-check still bounds staleness by version_check_s."""
    s = make_settings(redis_proc.url, tmp_path, version_check_s=0.3)
    v1 = classify_delta(tiny_bert, 1, ("old-a", "old-b"))
    v2 = classify_delta(tiny_bert, 2, ("new-a", "new-b"))
    with live_server(create_app(s, base=tiny_bert)) as a, live_server(create_app(s, base=tiny_bert)) as b:
        ca = httpx.Client(base_url=a.url, headers=KEY, timeout=30)
        cb = httpx.Client(base_url=b.url, headers=KEY, timeout=30)

        def labels_from_b() -> set[str]:
            r = cb.post("/v1/tasks/t/classify", json={"texts": ["x"]})
            return set(r.json()["results"][0]["scores"])

        ca.put("/v1/tasks/t", content=dumps(v1))
        assert labels_from_b() == {"old-a", "old-b"}
        ca.put("/v1/tasks/t", content=dumps(v2))
        for stale_ok in (False, True):
            if stale_ok:  # now lose every change message on B
                b.state.registry.invalidate = lambda *_: None
                ca.put("/v1/tasks/t", content=dumps(v1))
            want = {"old-a", "old-b"} if stale_ok else {"new-a", "new-b"}
            wait_until(lambda want=want: labels_from_b() == want, HANG_GUARD_S, f"B to serve {want}")
        ca.delete("/v1/tasks/t")
        wait_until(lambda: cb.post("/v1/tasks/t/classify", json={"texts": ["x"]}).status_code == 404,
                   HANG_GUARD_S, "B to answer 404 after the delete")
        ca.close()
        cb.close()
