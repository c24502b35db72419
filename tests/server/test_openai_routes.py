"""The compatibility routes' HTTP contract over raw HTTP (issue 15): each route family answers
errors in its own dialect, and /docs works with no network (no CDN)."""

from __future__ import annotations

import re

import httpx
import pytest
from support import auth

from taskdelta.server.http_errors import dialect_of

NATIVE = {"type", "message", "request_id"}
OPENAI = {"message", "type", "param", "code"}


@pytest.mark.parametrize(("path", "dialect"), [
    ("/v1/chat/completions", "openai"), ("/v1/completions", "openai"),
    ("/v1/embeddings", "openai"), ("/v1/models", "openai"), ("/v1/models/x", "openai"),
    ("/generate", "lorax"), ("/generate_stream", "lorax"), ("/", "lorax"),
    ("/v1/tasks/x/generate", "native"), ("/v1/tasks", "native"), ("/healthz", "native"),
    ("/v1/completionsx", "native"), ("/v1/chat/completions/x", "native"),
])
def test_dialect_by_path(path, dialect):
    assert dialect_of(path) == dialect


def test_error_bodies_follow_each_routes_dialect(tiny_llama, serve):
    with serve(tiny_llama) as srv, httpx.Client(base_url=srv.url, headers=auth("acme"),
                                                timeout=30) as c:
        bad = c.post("/v1/chat/completions", json={"model": "base", "messages": [], "n": 0})
        assert bad.status_code == 400  # OpenAI and vLLM answer 400 for an invalid body
        assert set(bad.json()["error"]) == OPENAI and bad.json()["error"]["param"] in {"messages", "n"}
        extra = c.post("/v1/completions", json={"model": "base", "prompt": "x", "suffix": "y"})
        assert extra.status_code == 400 and extra.json()["error"]["param"] == "suffix"
        assert "not supported" in extra.json()["error"]["message"]
        missing = c.get("/v1/models/nope")
        assert missing.status_code == 404 and set(missing.json()["error"]) == OPENAI
        native = c.post("/v1/tasks/base/generate", json={"prompt": "x", "max_new_tokens": 0})
        assert native.status_code == 422 and set(native.json()["error"]) == NATIVE
        tgi = c.post("/generate", json={"inputs": "x", "parameters": {"top_k": 3}})
        assert tgi.status_code == 422
        assert tgi.json()["error_type"] == "validation" and "top_k" in tgi.json()["error"]
        gone = c.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "nope"}})
        assert gone.status_code == 404 and "nope" in gone.json()["error"]


def test_docs_load_their_assets_from_this_server(tiny_llama, serve):
    """Every script and stylesheet /docs and /redoc reference is served here (no CDN)."""
    with serve(tiny_llama) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for page in ("/docs", "/redoc"):
            html = c.get(page)
            assert html.status_code == 200
            urls = re.findall(r"""(?:src|href)=["']([^"']+\.(?:js|css))["']""", html.text)
            urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html.text)
            assert urls and not [u for u in urls if u.startswith(("http:", "https:", "//"))]
            for url in urls:
                assert c.get(url).status_code == 200, url
