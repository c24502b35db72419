"""The client commands of `taskdelta`, each against a MockTransport-backed Client."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from support import CLASSIFIED, STORY, TASK, assert_one_line_error, sse
from typer.testing import CliRunner

from taskdelta.client import Client, cli
from taskdelta.client.types import TaskInfo, TaskList

Route = httpx.Response | Callable[[httpx.Request], httpx.Response]


class FakeServer:
    """Routes (method, path) to canned answers; records requests and how the client was made."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[httpx.Request] = []
        self.made_with: list[tuple[str | None, str | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        route = self.routes.get((request.method, request.url.path))
        if route is None:
            return httpx.Response(404, json={"error": {"type": "not_found",
                                                       "message": "no such route"}})
        return route(request) if callable(route) else route

    def make_client(self, base_url: str | None, api_key: str | None) -> Client:
        self.made_with.append((base_url, api_key))
        client = Client(base_url, api_key=api_key, max_retries=1,
                        http_client=httpx.Client(transport=httpx.MockTransport(self)))
        client._sleep = lambda _s: None
        return client


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer()
    monkeypatch.setattr(cli, "make_client", fake.make_client)
    monkeypatch.delenv("TASKDELTA_BASE_URL", raising=False)
    monkeypatch.delenv("TASKDELTA_API_KEY", raising=False)
    return fake


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli.app, list(args), env=env)


def err(status: int, type_: str, message: str, rid: str = "req-42") -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": type_, "message": message,
                                                  "request_id": rid}},
                          headers={"x-request-id": rid})


# --- tasks ---------------------------------------------------------------------------------------

def test_tasks_list_prints_a_table_and_json(server: FakeServer):
    other = {**TASK, "name": "imdb", "version": 1}
    server.routes[("GET", "/v1/tasks")] = httpx.Response(200, json={"tasks": [TASK, other]})
    table = run("tasks", "list")
    assert table.exit_code == 0, table.output
    assert "sst2" in table.stdout and "imdb" in table.stdout and "0.5000%" in table.stdout
    as_json = run("tasks", "list", "--json")
    assert TaskList.model_validate_json(as_json.stdout).tasks[1].name == "imdb"


def test_tasks_list_empty(server: FakeServer):
    server.routes[("GET", "/v1/tasks")] = httpx.Response(200, json={"tasks": []})
    result = run("tasks", "list")
    assert result.exit_code == 0 and result.stdout.strip() == "no tasks"


def test_tasks_show(server: FakeServer):
    server.routes[("GET", "/v1/tasks/sst2")] = httpx.Response(200, json=TASK)
    result = run("tasks", "show", "sst2")
    assert result.exit_code == 0, result.output
    assert "neg, pos" in result.stdout and "provenance.method" in result.stdout
    assert TaskInfo.model_validate_json(run("tasks", "show", "sst2", "--json").stdout).version == 3


def test_a_missing_task_is_one_error_line_and_exit_1(server: FakeServer):
    server.routes[("GET", "/v1/tasks/gone")] = err(404, "not_found", "task 'gone' not found")
    result = run("tasks", "show", "gone")
    assert_one_line_error(result, "404", "not_found", "task 'gone' not found", "req-42")
    assert result.stdout == ""


def test_tasks_upload_sends_the_file_with_if_match(server: FakeServer, tmp_path: Path):
    data = b"\x01\x02" * 1_500_000
    file = tmp_path / "sst2.safetensors"
    file.write_bytes(data)
    server.routes[("PUT", "/v1/tasks/sst2")] = httpx.Response(200, json={**TASK, "version": 4})
    result = run("tasks", "upload", "sst2", str(file), "--if-match", "3")
    assert result.exit_code == 0, result.output
    assert "uploaded sst2: version 4" in result.stdout
    req = server.requests[0]
    assert req.content == data and req.headers["if-match"] == "3"


def test_tasks_upload_rejected_delta(server: FakeServer, tmp_path: Path):
    file = tmp_path / "bad.safetensors"
    file.write_bytes(b"junk")
    server.routes[("PUT", "/v1/tasks/sst2")] = err(422, "delta_rejected",
                                                  "base fingerprint differs", rid="r-up")
    result = run("tasks", "upload", "sst2", str(file))
    assert_one_line_error(result, "422", "delta_rejected", "fingerprint differs", "r-up")


def test_tasks_upload_a_missing_file_is_a_usage_error(server: FakeServer, tmp_path: Path):
    result = run("tasks", "upload", "sst2", str(tmp_path / "nope"))
    assert result.exit_code == 2 and server.requests == []


def test_tasks_delete(server: FakeServer):
    server.routes[("DELETE", "/v1/tasks/sst2")] = httpx.Response(
        200, json={"name": "sst2", "deleted": True})
    result = run("tasks", "delete", "sst2", "--if-match", "5")
    assert result.exit_code == 0 and result.stdout.strip() == "deleted sst2"
    assert server.requests[0].headers["if-match"] == "5"


def test_conflict_on_delete(server: FakeServer):
    server.routes[("DELETE", "/v1/tasks/sst2")] = err(409, "conflict", "task is at version 6")
    assert_one_line_error(run("tasks", "delete", "sst2", "--if-match", "5"), "409", "conflict")


# --- inference -----------------------------------------------------------------------------------

def test_classify_pairs(server: FakeServer):
    two = {**CLASSIFIED, "results": CLASSIFIED["results"] * 2}
    server.routes[("POST", "/v1/tasks/nli/classify")] = httpx.Response(200, json=two)
    result = run("classify", "nli", "p1", "h1", "p2", "h2", "--pair")
    assert result.exit_code == 0, result.output
    assert json.loads(server.requests[0].content) == {"texts": [["p1", "h1"], ["p2", "h2"]]}
    assert "pos" in result.stdout and "0.900" in result.stdout


def test_classify_json_and_odd_pairs(server: FakeServer):
    server.routes[("POST", "/v1/tasks/sst2/classify")] = httpx.Response(200, json=CLASSIFIED)
    result = run("classify", "sst2", "a fine film", "--json")
    assert json.loads(result.stdout)["results"][0]["label"] == "pos"
    assert json.loads(server.requests[0].content) == {"texts": ["a fine film"]}
    odd = run("classify", "nli", "a", "b", "c", "--pair")
    assert odd.exit_code == 2 and len(server.requests) == 1


def test_score_pairs_table_and_json(server: FakeServer):
    scored = {"task": "sts", "version": 2, "scores": [4.25, 0.5]}
    server.routes[("POST", "/v1/tasks/sts/score")] = httpx.Response(200, json=scored)
    result = run("score", "sts", "p1", "h1", "p2", "h2", "--pair")
    assert result.exit_code == 0, result.output
    assert json.loads(server.requests[0].content) == {"texts": [["p1", "h1"], ["p2", "h2"]]}
    assert "4.2500" in result.stdout and "0.5000" in result.stdout and "p1 || h1" in result.stdout
    assert json.loads(run("score", "sts", "x", "--json").stdout)["scores"] == [4.25, 0.5]
    odd = run("score", "sts", "a", "b", "c", "--pair")
    assert odd.exit_code == 2 and len(server.requests) == 2


def test_generate_streams_to_stdout(server: FakeServer):
    server.routes[("POST", "/v1/tasks/poet/generate")] = httpx.Response(
        200, content=STORY, headers={"content-type": "text/event-stream"})
    result = run("generate", "poet", "Tell me", "--max-new-tokens", "4", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Once upon a time\n"
    assert "length" in result.stderr and "4 tokens" in result.stderr
    body = json.loads(server.requests[0].content)
    assert (body["stream"], body["max_new_tokens"], body["seed"]) == (True, 4, 1)


def test_generate_no_stream(server: FakeServer):
    answer = {"task": "poet", "text": "roses", "finish_reason": "stop",
              "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
    server.routes[("POST", "/v1/tasks/poet/generate")] = httpx.Response(200, json=answer)
    result = run("generate", "poet", "Tell me", "--no-stream")
    assert result.exit_code == 0 and result.stdout == "roses\n"
    assert json.loads(server.requests[0].content)["stream"] is False
    as_json = run("generate", "poet", "Tell me", "--no-stream", "--json")
    assert json.loads(as_json.stdout)["usage"]["total_tokens"] == 3


def test_generate_error_mid_stream_is_one_line_after_the_text(server: FakeServer):
    body = sse({"text": "Once"}, error={"type": "timeout", "message": "deadline passed",
                                        "request_id": "r-s"}, done=False)
    server.routes[("POST", "/v1/tasks/poet/generate")] = httpx.Response(200, content=body)
    result = run("generate", "poet", "x")
    assert result.stdout == "Once\n"
    assert_one_line_error(result, "504", "timeout", "deadline passed", "r-s")


def test_embed(server: FakeServer):
    vecs = {"task": "e", "dim": 8, "embeddings": [[0.125] * 8, [-0.5] * 8]}
    server.routes[("POST", "/v1/tasks/e/embed")] = httpx.Response(200, json=vecs)
    result = run("embed", "e", "one", "two")
    assert result.exit_code == 0, result.output
    assert "2 embeddings, dim 8" in result.stdout and "+0.1250" in result.stdout
    assert json.loads(server.requests[0].content) == {"texts": ["one", "two"], "normalize": True}
    assert json.loads(run("embed", "e", "x", "--json").stdout)["dim"] == 8


# --- service, options, errors --------------------------------------------------------------------

def test_health_ready_and_not_ready(server: FakeServer):
    server.routes[("GET", "/healthz")] = httpx.Response(200, json={"status": "ok"})
    server.routes[("GET", "/readyz")] = httpx.Response(
        200, json={"ready": True, "model_loaded": True, "redis": True, "base": "minilm"})
    ready = run("health")
    assert ready.exit_code == 0 and "ready: base minilm" in ready.stdout
    server.routes[("GET", "/readyz")] = httpx.Response(
        503, json={"ready": False, "model_loaded": True, "redis": False})
    not_ready = run("health")
    assert not_ready.exit_code == 1 and "NOT ready" in not_ready.stdout
    assert "redis down" in not_ready.stdout


def test_global_options_and_env_reach_the_client(server: FakeServer):
    server.routes[("GET", "/v1/tasks")] = httpx.Response(200, json={"tasks": []})
    run("--url", "http://cli:1", "--api-key", "k1", "tasks", "list")
    run("tasks", "list", env={"TASKDELTA_BASE_URL": "http://env:2", "TASKDELTA_API_KEY": "k2"})
    run("tasks", "list")
    assert server.made_with == [("http://cli:1", "k1"), ("http://env:2", "k2"), (None, None)]
    assert [str(r.url) for r in server.requests] == [
        "http://cli:1/v1/tasks", "http://env:2/v1/tasks", "http://127.0.0.1:8000/v1/tasks"]
    assert server.requests[0].headers["authorization"] == "Bearer k1"
    assert "authorization" not in server.requests[2].headers


def test_a_server_that_cannot_be_reached_is_one_line(monkeypatch: pytest.MonkeyPatch):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused")

    def make(base_url: str | None, api_key: str | None) -> Client:
        client = Client("http://down:9", max_retries=2,
                        http_client=httpx.Client(transport=httpx.MockTransport(refuse)))
        client._sleep = lambda _s: None
        return client

    monkeypatch.setattr(cli, "make_client", make)
    assert_one_line_error(run("tasks", "list"), "cannot reach http://down:9",
                          "Connection refused")


def test_a_rate_limit_after_retries_is_one_line(server: FakeServer):
    server.routes[("POST", "/v1/tasks/sst2/classify")] = err(429, "rate_limited", "queue full")
    result = run("classify", "sst2", "x")
    assert_one_line_error(result, "429", "rate_limited", "queue full", "req-42")
    assert len(server.requests) == 2  # the client's one retry happened first


def test_main_names_the_server_extra_when_a_lazy_command_cannot_load(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    assert set(cli.LAZY) == {"delta", "serve"}
    monkeypatch.setitem(cli.LAZY, "serve", ("taskdelta._no_such_module", "pip install x[y]"))
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--port", "1"])
    assert info.value.code == 2
    line = capsys.readouterr().err.strip()
    assert "`taskdelta serve` needs the server extra" in line and "pip install x[y]" in line


def test_help_lists_the_client_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("tasks", "classify", "score", "generate", "embed", "health", "delta", "serve"):
        assert command in result.stdout
