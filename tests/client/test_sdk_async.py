"""AsyncClient against httpx.MockTransport: the same mapping and retry rule as the sync client."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from support import CLASSIFIED, MAPPING, TASK, Recorder, error, ok

from taskdelta.client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    ConflictError,
    DeltaRejectedError,
    PermissionDeniedError,
    ServiceUnavailableError,
)


def async_client_for(rec: Recorder, **kwargs) -> tuple[AsyncClient, list[float]]:
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    client = AsyncClient("http://td.test", api_key="key-a",
                         http_client=httpx.AsyncClient(transport=httpx.MockTransport(rec)),
                         **kwargs)
    client._sleep = record
    client._random = lambda: 0.0
    return client, sleeps


@pytest.mark.parametrize(("status", "type_", "cls"), MAPPING)
async def test_async_errors_map_like_sync(status, type_, cls):
    client, _ = async_client_for(Recorder(error(status, type_, "nope", rid="r-a")),
                                 max_retries=0)
    with pytest.raises(cls) as info:
        await client.tasks.get("sst2")
    assert type(info.value) is cls
    assert (info.value.status_code, info.value.request_id, info.value.message) == (
        status, "r-a", "nope")


async def test_async_retries_5xx_429_and_connection_errors_with_backoff():
    rec = Recorder(httpx.ConnectError("refused"), error(429), error(502), ok(CLASSIFIED))
    client, sleeps = async_client_for(rec, max_retries=3)
    result = await client.classify("sst2", ["great"])
    assert result.results[0].label == "pos"
    assert sleeps == [0.5, 1.0, 2.0] and len(rec.requests) == 4


async def test_async_no_retry_on_403():
    rec = Recorder(error(403, "forbidden"))
    client, sleeps = async_client_for(rec, max_retries=3)
    with pytest.raises(PermissionDeniedError):
        await client.embed("e", ["x"])
    assert len(rec.requests) == 1 and sleeps == []


async def test_async_gives_up_with_a_connection_error_or_timeout():
    client, sleeps = async_client_for(Recorder(httpx.ConnectError("refused")), max_retries=1)
    with pytest.raises(APIConnectionError):
        await client.health()
    assert sleeps == [0.5]
    client2, _ = async_client_for(Recorder(httpx.PoolTimeout("pool")), max_retries=0)
    with pytest.raises(APITimeoutError):
        await client2.health()


async def test_async_per_call_overrides():
    rec = Recorder(error(503))
    client, _ = async_client_for(rec, max_retries=4)
    with pytest.raises(ServiceUnavailableError):
        await client.tasks.list(max_retries=1, timeout=2.0)
    assert len(rec.requests) == 2
    assert rec.requests[0].extensions["timeout"] == httpx.Timeout(2.0).as_dict()


async def test_async_upload_rule_and_body(tmp_path: Path):
    path = tmp_path / "d.safetensors"
    path.write_bytes(b"x" * 3_000_000)
    rec = Recorder(error(503))
    client, _ = async_client_for(rec, max_retries=3)
    with pytest.raises(ServiceUnavailableError):
        await client.tasks.upload("sst2", path)
    assert len(rec.requests) == 1  # no If-Match: not replayed

    rec2 = Recorder(error(503), error(409, "conflict", "version is 4"))
    client2, sleeps = async_client_for(rec2, max_retries=3)
    with pytest.raises(ConflictError, match="version is 4"):
        await client2.tasks.upload("sst2", path, if_match=3)
    assert len(rec2.requests) == 2 and sleeps == [0.5]
    assert all(r.content == path.read_bytes() for r in rec2.requests)
    assert rec2.requests[0].headers["content-length"] == "3000000"


async def test_async_upload_rejected_delta():
    rec = Recorder(error(422, "delta_rejected", "fingerprint differs"))
    client, _ = async_client_for(rec)
    with pytest.raises(DeltaRejectedError, match="fingerprint differs"):
        await client.tasks.upload("sst2", b"bytes")


async def test_async_endpoints_and_bodies():
    gen = {"task": "g", "text": "hi", "finish_reason": "stop",
           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    rec = Recorder(ok({"tasks": [TASK]}), ok(TASK), ok({"name": "sst2", "deleted": True}),
                   ok(gen), ok({"status": "ok"}),
                   ok({"ready": True, "model_loaded": True, "redis": True}))
    async with async_client_for(rec)[0] as client:
        assert [t.name for t in (await client.tasks.list()).tasks] == ["sst2"]
        assert (await client.tasks.get("sst2")).labels == ["neg", "pos"]
        assert (await client.tasks.delete("sst2", if_match=3)).deleted
        assert (await client.generate("g", "hello", temperature=0.7)).text == "hi"
        assert (await client.health()).status == "ok"
        assert (await client.ready()).ready
    methods = [(r.method, r.url.path) for r in rec.requests]
    assert methods == [("GET", "/v1/tasks"), ("GET", "/v1/tasks/sst2"),
                       ("DELETE", "/v1/tasks/sst2"), ("POST", "/v1/tasks/g/generate"),
                       ("GET", "/healthz"), ("GET", "/readyz")]
    assert json.loads(rec.requests[3].content)["temperature"] == 0.7
    assert all(r.headers["authorization"] == "Bearer key-a" for r in rec.requests)


async def test_async_env_fallbacks(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TASKDELTA_BASE_URL", "http://env-host:7000")
    monkeypatch.setenv("TASKDELTA_API_KEY", "k-env")
    rec = Recorder(ok({"status": "ok"}))
    client = AsyncClient(http_client=httpx.AsyncClient(transport=httpx.MockTransport(rec)))
    await client.health()
    assert str(rec.requests[0].url) == "http://env-host:7000/healthz"
    assert rec.requests[0].headers["authorization"] == "Bearer k-env"
