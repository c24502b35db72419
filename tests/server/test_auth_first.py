"""The API key is checked before a request body is read or parsed (issue 14, item 6): an anonymous
caller cannot make the server buffer or parse anything."""

from __future__ import annotations

import socket

import httpx
import pytest
from support import auth, settings_for

from taskdelta.server.app import create_app


@pytest.fixture
def served(tiny_bert, redis_proc, tmp_path, live_server):
    with live_server(create_app(settings_for(redis_proc.url, tmp_path), base=tiny_bert)) as srv:
        yield srv


def test_an_anonymous_request_with_a_broken_body_gets_401_not_a_parse_error(served):
    """Before: the body was parsed first, so a bad one answered 422 to anyone (on the LoRAX
    routes, outside /v1/, until later still). The 401 comes in the route's error dialect."""
    kind = {"native": lambda b: b["error"]["type"], "openai": lambda b: b["error"]["code"],
            "lorax": lambda b: b["error_type"]}
    with httpx.Client(base_url=served.url, timeout=30) as c:
        for path, dialect in [("/v1/tasks/base/embed", "native"), ("/v1/tasks/x/classify", "native"),
                              ("/v1/completions", "openai"), ("/v1/chat/completions", "openai"),
                              ("/generate", "lorax"), ("/generate_stream", "lorax"),
                              ("/", "lorax")]:
            r = c.post(path, content=b"{" * 1000, headers={"Content-Type": "application/json"})
            assert r.status_code == 401, (path, r.text)
            assert kind[dialect](r.json()) == "unauthorized", (path, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer"
        r = c.post("/v1/tasks/base/embed", json={"texts": ["x"]},
                   headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert c.post("/v1/tasks/base/embed", json={"texts": ["x"]},
                      headers=auth("acme")).status_code == 200
        assert c.get("/healthz").status_code == 200  # not a tenant route


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_an_anonymous_8_mb_body_is_refused_before_it_is_read(served, method):
    """Headers declare 8 MB and only 1 KB follows: the 401 comes at once, with the connection
    closed, while the server is still owed almost all of the body. Before, the server waited for
    (and would have buffered and parsed) the whole body before looking at the key."""
    path = "/v1/tasks/base/embed" if method == "POST" else "/v1/tasks/t"
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {8 * 1024 * 1024}\r\n\r\n".encode() + b" " * 1024)
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = s.recv(4096)  # a timeout here is the failure: the server waits for the body
            assert piece, answer
            answer += piece
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 401"), answer
    assert b"connection: close" in rest.lower()
