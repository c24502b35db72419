"""The server end to end over real HTTP and a real redis-server (issue 3's "done when")."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from support import assert_bit_identical, auth, merged_copy, settings_for, snapshot

from taskdelta.client.types import SamplingParams
from taskdelta.deltas import dumps, random_delta
from taskdelta.server.app import create_app
from taskdelta.server.inference import classify, generate
from taskdelta.server.jobs import ClassifyJob, GenerateJob


def test_classify_matches_offline_merged_model_bitwise(tiny_bert, redis_proc, tmp_path, live_server):
    delta = random_delta(tiny_bert, 0.05, seed=3, kind="classify", labels=["neg", "pos"], scale=0.2)
    texts = ["a fine film", "the worst thing I have seen", "ok"]
    merged, prepared = merged_copy(tiny_bert, delta)
    expected = classify(prepared.head, merged.tokenizer, prepared.labels, [ClassifyJob(tuple(texts))])
    saved = snapshot(tiny_bert)
    with live_server(create_app(settings_for(redis_proc.url, tmp_path), base=tiny_bert)) as srv:
        with httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=30) as c:
            r = c.put("/v1/tasks/sent", content=dumps(delta))
            assert r.status_code == 201, r.text
            assert r.json()["version"] >= 1 and r.json()["kind"] == "classify"
            r = c.post("/v1/tasks/sent/classify", json={"texts": texts})
            assert r.status_code == 200, r.text
            assert r.json()["results"] == expected[0]
            assert "x-request-id" in r.headers
    assert_bit_identical(tiny_bert, saved)


def test_generate_matches_offline_merged_model(tiny_llama, redis_proc, tmp_path, live_server):
    delta = random_delta(tiny_llama, 0.05, seed=4, kind="generate", scale=0.5)
    merged, _ = merged_copy(tiny_llama, delta)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    expected = generate(merged.model, merged.tokenizer, GenerateJob(prompt="hello there", params=params))
    saved = snapshot(tiny_llama)
    with live_server(create_app(settings_for(redis_proc.url, tmp_path), base=tiny_llama)) as srv:
        with httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=30) as c:
            assert c.put("/v1/tasks/gen", content=dumps(delta)).status_code == 201
            r = c.post("/v1/tasks/gen/generate", json={"prompt": "hello there", "max_new_tokens": 12})
            assert r.status_code == 200, r.text
            assert r.json()["text"] == expected.text
            assert r.json()["usage"]["completion_tokens"] == expected.completion_tokens
            base_r = c.post("/v1/tasks/base/generate", json={"prompt": "hello there",
                                                              "max_new_tokens": 12})
            assert base_r.status_code == 200
            # streamed pieces add up to the same text
            with c.stream("POST", "/v1/tasks/gen/generate",
                          json={"prompt": "hello there", "max_new_tokens": 12, "stream": True}) as s:
                lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            import json

            chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
            assert "".join(ch.get("text", "") for ch in chunks) == expected.text
            assert chunks[-1]["finish_reason"] == expected.finish_reason
            r = c.post("/v1/chat/completions", json={"model": "gen", "temperature": 0,
                                                     "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert_bit_identical(tiny_llama, saved)


def test_fifty_tasks_interleaved_no_contamination(tiny_bert, redis_proc, tmp_path, live_server):
    n_tasks, text = 50, "the same sentence for every task"
    deltas = {f"t{i}": random_delta(tiny_bert, 0.02, seed=100 + i, kind="classify",
                                    labels=[f"t{i}-a", f"t{i}-b", f"t{i}-c"], scale=0.3)
              for i in range(n_tasks)}
    expected = {}
    for name, d in deltas.items():
        merged, prepared = merged_copy(tiny_bert, d)
        expected[name] = classify(prepared.head, merged.tokenizer, prepared.labels,
                                  [ClassifyJob((text,))])[0][0]
    saved = snapshot(tiny_bert)
    app = create_app(settings_for(redis_proc.url, tmp_path, cache_bytes=4 * 1024 * 1024), base=tiny_bert)
    with live_server(app) as srv:
        with httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=30) as c:
            for name, d in deltas.items():
                assert c.put(f"/v1/tasks/{name}", content=dumps(d)).status_code == 201

        async def hammer() -> list[tuple[str, dict]]:
            async with httpx.AsyncClient(base_url=srv.url, headers=auth("acme"), timeout=60) as ac:
                order = [f"t{(i * 7) % n_tasks}" for i in range(4 * n_tasks)]

                async def one(name: str) -> tuple[str, dict]:
                    r = await ac.post(f"/v1/tasks/{name}/classify", json={"texts": [text]})
                    assert r.status_code == 200, r.text
                    return name, r.json()["results"][0]

                return await asyncio.gather(*(one(n) for n in order))

        answers = asyncio.run(hammer())
        swaps = srv.state.engine.executor.swapper
        for name, got in answers:
            want = expected[name]
            assert got["label"] == want["label"]
            assert set(got["scores"]) == set(want["scores"])  # the task's own label names
            for label, p in want["scores"].items():
                assert got["scores"][label] == pytest.approx(p, abs=1e-5)
        with httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=30) as c:
            assert c.post("/v1/tasks/base/embed", json={"texts": ["x"]}).status_code == 200
        assert swaps.active is None  # the base request restored the base
        assert_bit_identical(tiny_bert, saved)


def test_restart_server_and_redis_keeps_tasks(tiny_bert, redis_proc, tmp_path, live_server):
    d = random_delta(tiny_bert, 0.01, seed=7, kind="classify", labels=["x", "y"])
    s = settings_for(redis_proc.url, tmp_path)
    with live_server(create_app(s, base=tiny_bert)) as srv:
        with httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=30) as c:
            for name in ("one", "two", "three"):
                assert c.put(f"/v1/tasks/{name}", content=dumps(d)).status_code == 201
            before = c.post("/v1/tasks/two/classify", json={"texts": ["hello"]}).json()
    redis_proc.restart()
    with live_server(create_app(s, base=tiny_bert)) as srv:
        with httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=30) as c:
            names = [t["name"] for t in c.get("/v1/tasks").json()["tasks"]]
            assert names == ["one", "three", "two"]
            after = c.post("/v1/tasks/two/classify", json={"texts": ["hello"]}).json()
            assert after["results"] == before["results"]


def test_bad_delta_isolation_and_errors(tiny_bert, redis_proc, tmp_path, live_server):
    good = random_delta(tiny_bert, 0.01, seed=8, kind="classify", labels=["x", "y"])
    saved = snapshot(tiny_bert)
    with live_server(create_app(settings_for(redis_proc.url, tmp_path), base=tiny_bert)) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            a, b = auth("acme"), auth("beta")
            bad = bytearray(dumps(good))
            r = c.put("/v1/tasks/t", content=bytes(bad[: len(bad) // 2]), headers=a)
            assert r.status_code == 422 and "truncated" in r.json()["error"]["message"]
            assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
            assert c.get("/v1/tasks", headers=a).json()["tasks"] == []
            assert c.put("/v1/tasks/t", content=dumps(good), headers=a).status_code == 201
            # If-Match: stale version -> 409, nothing changes
            r = c.put("/v1/tasks/t", content=dumps(good), headers=a | {"If-Match": '"99"'})
            assert r.status_code == 409
            # another tenant sees nothing of acme's task
            for method, path in (("GET", "/v1/tasks/t"), ("DELETE", "/v1/tasks/t"),
                                 ("POST", "/v1/tasks/t/classify")):
                r = c.request(method, path, headers=b, json={"texts": ["x"]} if method == "POST" else None)
                assert r.status_code == 404, (method, path, r.text)
            assert c.get("/v1/tasks", headers=b).json()["tasks"] == []
            assert c.get("/v1/tasks?all=true", headers=b).status_code == 403
            every = c.get("/v1/tasks?all=true", headers={"Authorization": "Bearer key-admin"})
            assert [(t["tenant"], t["name"]) for t in every.json()["tasks"]] == [("acme", "t")]
            # beta's own task of the same name does not touch acme's
            assert c.put("/v1/tasks/t", content=dumps(good), headers=b).status_code == 201
            assert c.get("/v1/tasks/t", headers=a).json()["version"] == 1
            # no key, wrong key
            assert c.get("/v1/tasks").status_code == 401
            assert c.get("/v1/tasks", headers={"Authorization": "Bearer nope"}).status_code == 401
            # kind mismatch is a 400 that says so
            r = c.post("/v1/tasks/t/embed", json={"texts": ["x"]}, headers=a)
            assert r.status_code == 400 and "classify" in r.json()["error"]["message"]
            r = c.post("/v1/tasks/base/generate", json={"prompt": "x"}, headers=a)
            assert r.status_code == 400 and "cannot generate" in r.json()["error"]["message"]
            assert c.post("/v1/tasks/t/classify", json={"texts": []}, headers=a).status_code == 422
            assert c.post("/v1/tasks/t/classify", json={"texts": ["x"], "oops": 1},
                          headers=a).status_code == 422
    assert_bit_identical(tiny_bert, saved)


def test_overload_answers_429_with_retry_after(tiny_bert, redis_proc, tmp_path, live_server):
    s = settings_for(redis_proc.url, tmp_path, max_queue=2, max_queued_total=2, max_batch=1)
    with live_server(create_app(s, base=tiny_bert)) as srv:
        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, headers=auth("acme"), timeout=60) as ac:
                return await asyncio.gather(*(ac.post("/v1/tasks/base/embed",
                                                      json={"texts": ["word " * 200] * 32})
                                              for _ in range(40)))

        codes = [r.status_code for r in asyncio.run(flood())]
        assert set(codes) <= {200, 429}
        assert 429 in codes and 200 in codes
        limited = next(r for r in asyncio.run(flood()) if r.status_code == 429)
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limited"
