"""The sync SDK against httpx.MockTransport: error mapping, the retry rule, request building."""

from __future__ import annotations

import email.utils
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from support import CLASSIFIED, MAPPING, Recorder, error, ok

from taskdelta.client import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    Client,
    DeltaRejectedError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
    TaskDeltaError,
    UnprocessableEntityError,
)
from taskdelta.client.types import ClassifyRequest, EmbedRequest, GenerateRequest

URL = "http://td.test"
Handler = Callable[[httpx.Request], httpx.Response]


def client_for(handler: Handler, **kwargs) -> tuple[Client, list[float]]:
    sleeps: list[float] = []
    client = Client(URL, api_key="key-1",
                    http_client=httpx.Client(transport=httpx.MockTransport(handler)), **kwargs)
    client._sleep = sleeps.append  # record the waits instead of waiting
    client._random = lambda: 0.0   # no jitter unless a test asks for it
    return client, sleeps


# --- error mapping -------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "type_", "cls"), MAPPING)
def test_each_error_status_maps_to_its_class_with_message_and_request_id(status, type_, cls):
    client, _ = client_for(Recorder(error(status, type_, f"m{status}", rid=f"rid-{status}")),
                           max_retries=0)
    with pytest.raises(APIStatusError) as info:
        client.tasks.get("sst2")
    exc = info.value
    assert type(exc) is cls
    assert isinstance(exc, APIError) and isinstance(exc, TaskDeltaError)
    assert (exc.status_code, exc.type, exc.message, exc.request_id) == (
        status, type_, f"m{status}", f"rid-{status}")
    assert exc.body["error"]["message"] == f"m{status}"
    assert exc.response is not None and exc.request is not None


def test_invalid_request_422_is_not_a_delta_rejection():
    client, _ = client_for(Recorder(error(422, "invalid_request")), max_retries=0)
    with pytest.raises(UnprocessableEntityError) as info:
        client.classify("sst2", ["x"])
    assert not isinstance(info.value, DeltaRejectedError)


def test_request_id_comes_from_the_body_when_the_header_is_missing():
    body = {"error": {"type": "not_found", "message": "no task", "request_id": "from-body"}}
    client, _ = client_for(Recorder(httpx.Response(404, json=body)), max_retries=0)
    with pytest.raises(NotFoundError) as info:
        client.tasks.get("nope")
    assert info.value.request_id == "from-body"
    assert str(info.value) == "404 not_found: no task (request id from-body)"


def test_a_non_json_error_page_still_maps_by_status():
    page = httpx.Response(502, text="<html>Bad Gateway</html>", headers={"x-request-id": "lb-1"})
    client, _ = client_for(Recorder(page), max_retries=0)
    with pytest.raises(InternalServerError) as info:
        client.health()
    assert info.value.status_code == 502 and info.value.type is None
    assert "Bad Gateway" in info.value.message and info.value.request_id == "lb-1"


def test_a_success_status_with_a_wrong_body_is_a_validation_error():
    client, _ = client_for(Recorder(ok({"unexpected": True})))
    with pytest.raises(APIResponseValidationError) as info:
        client.tasks.get("sst2")
    assert "TaskInfo" in info.value.message and info.value.request_id == "req-ok"


def test_rate_limit_error_carries_retry_after():
    client, _ = client_for(Recorder(error(429, "rate_limited", headers={"Retry-After": "7"})),
                           max_retries=0)
    with pytest.raises(RateLimitError) as info:
        client.classify("sst2", "x")
    assert info.value.retry_after == 7.0


# --- retries -------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried_with_growing_backoff(status):
    rec = Recorder(error(status), error(status), ok(CLASSIFIED))
    client, sleeps = client_for(rec)
    assert client.classify("sst2", ["great"]).results[0].label == "pos"
    assert len(rec.requests) == 3
    assert sleeps == [0.5, 1.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
def test_other_client_errors_are_not_retried(status):
    rec = Recorder(error(status), ok(CLASSIFIED))
    client, sleeps = client_for(rec, max_retries=5)
    with pytest.raises(APIStatusError):
        client.classify("sst2", ["great"])
    assert len(rec.requests) == 1 and sleeps == []


def test_retries_give_up_after_max_retries_and_raise_the_last_error():
    rec = Recorder(error(503, "unavailable", "still down"))
    client, sleeps = client_for(rec, max_retries=3)
    with pytest.raises(ServiceUnavailableError, match="still down"):
        client.tasks.list()
    assert len(rec.requests) == 4 and len(sleeps) == 3


def test_backoff_doubles_then_caps():
    client, sleeps = client_for(Recorder(error(500)), max_retries=7)
    with pytest.raises(InternalServerError):
        client.health()
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_jitter_shrinks_each_wait_by_at_most_a_quarter():
    client, sleeps = client_for(Recorder(error(500)), max_retries=6)
    client._random = random.Random(1234).random
    with pytest.raises(InternalServerError):
        client.health()
    nominal = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert all(0.75 * n <= s <= n for s, n in zip(sleeps, nominal, strict=True))
    assert sleeps != nominal  # the jitter did move them


@pytest.mark.parametrize(("rand", "factor"), [(0.0, 1.0), (0.5, 0.875), (0.999999, 0.75)])
def test_backoff_jitter_factor(rand, factor):
    assert RetryPolicy().backoff(2, rand) == pytest.approx(2.0 * factor)


@pytest.mark.parametrize(("header", "expected"), [("3", 3.0), ("0.25", 0.25), ("120", 30.0),
                                                  ("0", 0.0), ("soon", 0.5)])
def test_retry_after_is_honoured_and_capped(header, expected):
    rec = Recorder(error(429, "rate_limited", headers={"Retry-After": header}), ok(CLASSIFIED))
    client, sleeps = client_for(rec)
    client.classify("sst2", ["x"])
    assert sleeps == [expected]  # an unreadable header falls back to the backoff (0.5)


def test_retry_after_as_an_http_date():
    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    rec = Recorder(error(503, "unavailable", headers={"Retry-After": when}), ok())
    client, sleeps = client_for(rec)
    client.tasks.get("sst2")
    assert len(sleeps) == 1 and 10.0 < sleeps[0] <= 21.0  # the date has one-second resolution


def test_connection_errors_are_retried():
    rec = Recorder(httpx.ConnectError("refused"), httpx.ReadError("reset"), ok())
    client, sleeps = client_for(rec)
    assert client.tasks.get("sst2").version == 3
    assert len(rec.requests) == 3 and sleeps == [0.5, 1.0]


def test_connection_failure_after_retries_is_an_api_connection_error():
    rec = Recorder(httpx.ConnectError("connection refused"))
    client, sleeps = client_for(rec, max_retries=2)
    with pytest.raises(APIConnectionError) as info:
        client.health()
    assert not isinstance(info.value, APITimeoutError)
    assert "td.test" in info.value.message and "connection refused" in info.value.message
    assert len(rec.requests) == 3 and len(sleeps) == 2


def test_a_timeout_is_an_api_timeout_error_and_is_retried():
    rec = Recorder(httpx.ReadTimeout("slow"))
    client, _ = client_for(rec, max_retries=1)
    with pytest.raises(APITimeoutError):
        client.classify("sst2", ["x"])
    assert len(rec.requests) == 2


def test_per_call_max_retries_overrides_the_client():
    rec = Recorder(error(503))
    client, _ = client_for(rec, max_retries=5)
    with pytest.raises(ServiceUnavailableError):
        client.tasks.list(max_retries=0)
    assert len(rec.requests) == 1

    rec2 = Recorder(error(503), error(503), error(503), ok({"tasks": []}))
    client2, _ = client_for(rec2, max_retries=0)
    assert client2.tasks.list(max_retries=3).tasks == []
    assert len(rec2.requests) == 4


def test_timeout_default_and_per_call_override_reach_the_request():
    rec = Recorder(ok({"status": "ok"}))
    client, _ = client_for(rec, timeout=12.0)
    client.health()
    client.health(timeout=1.5)
    client.health(timeout=None)
    timeouts = [r.extensions["timeout"] for r in rec.requests]
    assert timeouts[0] == httpx.Timeout(12.0).as_dict()
    assert timeouts[1] == httpx.Timeout(1.5).as_dict()
    assert timeouts[2] == httpx.Timeout(None).as_dict()


def test_an_injected_http_client_keeps_its_own_timeout_by_default():
    rec = Recorder(ok({"status": "ok"}))
    http = httpx.Client(transport=httpx.MockTransport(rec), timeout=3.0)
    Client(URL, http_client=http).health()
    assert rec.requests[0].extensions["timeout"] == httpx.Timeout(3.0).as_dict()


# --- uploads: retried only when safe -------------------------------------------------------------

def test_upload_without_if_match_is_not_replayed_after_a_503():
    rec = Recorder(error(503, "unavailable"), ok(status=201))
    client, sleeps = client_for(rec, max_retries=3)
    with pytest.raises(ServiceUnavailableError):
        client.tasks.upload("sst2", b"delta-bytes")
    assert len(rec.requests) == 1 and sleeps == []


def test_upload_without_if_match_is_replayed_after_a_429():
    """A 429 is the server's admission refusing before it reads the body (the upload gate: too
    many uploads in progress), so nothing was applied and sending it again is safe."""
    rec = Recorder(error(429, "rate_limited", headers={"Retry-After": "1"}), ok(status=201))
    client, sleeps = client_for(rec, max_retries=3)
    assert client.tasks.upload("sst2", b"delta-bytes").name == "sst2"
    assert len(rec.requests) == 2 and sleeps == [1.0]
    assert all(r.content == b"delta-bytes" for r in rec.requests)


def test_upload_with_if_match_is_replayed_after_a_503():
    rec = Recorder(error(503, "unavailable"), ok())
    client, sleeps = client_for(rec, max_retries=3)
    assert client.tasks.upload("sst2", b"delta-bytes", if_match=2).version == 3
    assert len(rec.requests) == 2 and sleeps == [0.5]
    assert all(r.headers["if-match"] == "2" for r in rec.requests)
    assert all(r.content == b"delta-bytes" for r in rec.requests)  # the body is sent again whole


@pytest.mark.parametrize(("exc", "replayed"), [
    (httpx.ConnectError("refused"), True), (httpx.ConnectTimeout("slow"), True),
    (httpx.ReadError("reset"), False), (httpx.ReadTimeout("slow"), False),
    (httpx.RemoteProtocolError("eof"), False), (httpx.WriteError("broken pipe"), False)])
def test_upload_without_if_match_is_replayed_only_when_it_was_never_sent(exc, replayed):
    rec = Recorder(exc, ok(status=201))
    client, _ = client_for(rec, max_retries=2)
    if replayed:
        assert client.tasks.upload("sst2", b"d").name == "sst2"
    else:
        with pytest.raises(APIConnectionError):
            client.tasks.upload("sst2", b"d")
    assert len(rec.requests) == (2 if replayed else 1)


def test_delete_follows_the_upload_rule():
    rec = Recorder(error(503), ok({"name": "sst2", "deleted": True}))
    client, _ = client_for(rec)
    with pytest.raises(ServiceUnavailableError):
        client.tasks.delete("sst2")
    assert len(rec.requests) == 1
    assert client.tasks.delete("sst2", if_match=3).deleted
    assert rec.requests[-1].headers["if-match"] == "3" and rec.requests[-1].method == "DELETE"


def test_upload_a_file_streams_it_with_length_type_and_progress(tmp_path: Path):
    data = bytes(range(256)) * 9000  # 2.3 MB: more than one chunk
    path = tmp_path / "t.delta.safetensors"
    path.write_bytes(data)
    rec = Recorder(ok(status=201))
    client, _ = client_for(rec)
    seen: list[tuple[int, int]] = []
    info = client.tasks.upload("my task", path, progress=lambda sent, total: seen.append(
        (sent, total)))
    req = rec.requests[0]
    assert info.name == "sst2"
    assert (req.method, req.url.raw_path) == ("PUT", b"/v1/tasks/my%20task")
    assert req.content == data
    assert req.headers["content-type"] == "application/octet-stream"
    assert req.headers["content-length"] == str(len(data))
    assert "if-match" not in req.headers and req.headers["authorization"] == "Bearer key-1"
    sent = [s for s, _ in seen]
    assert sent[0] == 0 and sent[-1] == len(data) and sent == sorted(sent) and len(sent) > 2
    assert {t for _, t in seen} == {len(data)}


def test_upload_a_task_delta_object_sends_its_file_bytes():
    torch = pytest.importorskip("torch")
    from taskdelta.deltas.format import DeltaMeta, Provenance, SparseTensor, TaskDelta, dumps, loads

    delta = TaskDelta(DeltaMeta(base_fingerprint="fp1", kind="embed",
                                provenance=Provenance(method="test", density=0.1)),
                      {"w": SparseTensor(torch.tensor([1, 4], dtype=torch.int32),
                                         torch.tensor([0.5, -0.25]))})
    rec = Recorder(ok(status=201))
    client, _ = client_for(rec)
    client.tasks.upload("emb", delta)
    sent = loads(rec.requests[0].content)  # (the header's key order is not fixed: compare parsed)
    assert sent.meta == loads(dumps(delta)).meta and sent.meta.checksum
    assert sent.tensors["w"].idx.tolist() == [1, 4]
    assert sent.tensors["w"].val.tolist() == [0.5, -0.25]


def test_upload_refuses_other_objects():
    client, _ = client_for(Recorder(ok()))
    with pytest.raises(TypeError, match="dict"):
        client.tasks.upload("sst2", {"not": "a delta"})


# --- requests ------------------------------------------------------------------------------------

def test_request_bodies_fit_the_wire_contract():
    rec = Recorder(ok(CLASSIFIED), ok({"task": "e", "dim": 2, "embeddings": [[0.0, 1.0]]}),
                   ok({"task": "g", "text": "hi", "finish_reason": "stop",
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}))
    client, _ = client_for(rec)
    client.classify("nli", [("a premise", "a hypothesis"), "plain"])
    client.embed("e", "one text", normalize=False)
    client.generate("g", messages=[{"role": "user", "content": "hi"}], max_new_tokens=5, seed=3,
                    stop=["\n"])
    bodies = [json.loads(r.content) for r in rec.requests]
    assert ClassifyRequest.model_validate(bodies[0]).texts == [("a premise", "a hypothesis"),
                                                               "plain"]
    assert EmbedRequest.model_validate(bodies[1]) == EmbedRequest(texts=["one text"],
                                                                  normalize=False)
    gen = GenerateRequest.model_validate(bodies[2])
    assert (gen.max_new_tokens, gen.seed, gen.stop, gen.stream, gen.prompt) == (5, 3, ["\n"],
                                                                                False, None)
    assert [r.url.path for r in rec.requests] == [
        "/v1/tasks/nli/classify", "/v1/tasks/e/embed", "/v1/tasks/g/generate"]


def test_generate_needs_exactly_one_of_prompt_and_messages():
    client, _ = client_for(Recorder(ok()))
    with pytest.raises(ValueError, match="exactly one"):
        client.generate("g")
    with pytest.raises(ValueError, match="exactly one"):
        client.generate("g", "p", messages=[{"role": "user", "content": "x"}])


def test_task_names_are_escaped_into_one_path_segment():
    rec = Recorder(ok())
    client, _ = client_for(rec)
    client.tasks.get("a/b?c")
    assert rec.requests[0].url.raw_path == b"/v1/tasks/a%2Fb%3Fc"


def test_ready_returns_not_ready_on_503_without_retrying():
    body = {"ready": False, "model_loaded": True, "redis": False, "base": "minilm"}
    rec = Recorder(httpx.Response(503, json=body))
    client, _ = client_for(rec, max_retries=3)
    ready = client.ready()
    assert (ready.ready, ready.redis, ready.base) == (False, False, "minilm")
    assert len(rec.requests) == 1


def test_ready_raises_on_a_503_that_is_an_error():
    client, _ = client_for(Recorder(error(503, "unavailable", "draining")), max_retries=0)
    with pytest.raises(ServiceUnavailableError, match="draining"):
        client.ready()


def test_env_fallbacks_for_url_and_key(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TASKDELTA_BASE_URL", "http://from-env:9001/")
    monkeypatch.setenv("TASKDELTA_API_KEY", "env-key")
    rec = Recorder(ok({"status": "ok"}))
    client = Client(http_client=httpx.Client(transport=httpx.MockTransport(rec)))
    client.health()
    assert str(rec.requests[0].url) == "http://from-env:9001/healthz"
    assert rec.requests[0].headers["authorization"] == "Bearer env-key"
    # arguments win over the environment
    Client("http://arg:1", api_key="arg-key",
           http_client=httpx.Client(transport=httpx.MockTransport(rec))).health()
    assert str(rec.requests[1].url) == "http://arg:1/healthz"
    assert rec.requests[1].headers["authorization"] == "Bearer arg-key"


def test_defaults_without_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TASKDELTA_BASE_URL", raising=False)
    monkeypatch.delenv("TASKDELTA_API_KEY", raising=False)
    rec = Recorder(ok({"status": "ok"}))
    Client(http_client=httpx.Client(transport=httpx.MockTransport(rec))).health()
    assert str(rec.requests[0].url) == "http://127.0.0.1:8000/healthz"
    assert "authorization" not in rec.requests[0].headers


def test_context_manager_closes_its_own_http_client_but_not_an_injected_one():
    with Client(URL) as own:
        pass
    assert own._http.is_closed
    http = httpx.Client(transport=httpx.MockTransport(Recorder(ok())))
    with Client(URL, http_client=http):
        pass
    assert not http.is_closed


def test_the_client_package_never_imports_torch():
    code = ("import sys, taskdelta.client, taskdelta.client.cli; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_task_info_of_a_kind_this_sdk_does_not_know_still_parses() -> None:
    """A newer server may serve a kind added after this SDK (as regress was): its task list must
    still parse, like any other field the SDK does not know."""
    from taskdelta.client.types import TaskInfo

    info = TaskInfo.model_validate({"name": "t", "kind": "rerank", "version": 1, "nnz": 1, "density": 0.1,
                                    "bytes": 8, "sha256": "ab", "base_fingerprint": "sha256:x",
                                    "created_at": 0.0, "new_field": 1})
    assert info.kind == "rerank"
