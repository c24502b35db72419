"""Security: tenant isolation on every route, API keys held only as digests and compared in
constant time over every entry, request body limits, and no key or delta bytes in any log.
SECURITY.md lists the threat model these tests stand for."""

from __future__ import annotations

import base64
import hashlib
import logging
import pickle
import threading

import httpx
import pytest
import uvicorn
from support import rss_bytes

from taskdelta.deltas import dumps, random_delta
from taskdelta.server import auth
from taskdelta.server.app import create_app
from taskdelta.server.auth import KeyRing
from taskdelta.server.errors import Unauthorized
from taskdelta.server.settings import Settings

KEYS = {"acme": "sk-acme-7f3a9c1e5b", "beta": "sk-beta-2d8e6f0a4c"}
ADMIN = "sk-admin-9b1c3e5d7f"


def settings_for(redis_url: str, tmp_path, **over) -> Settings:
    base = dict(redis_url=redis_url, data_dir=tmp_path / "data",
                api_keys=",".join(f"{t}:{k}" for t, k in KEYS.items()), admin_key=ADMIN)
    return Settings(**(base | over))


def auth_for(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


# --- tenant isolation -----------------------------------------------------------------------------

def test_tenants_are_isolated_on_list_get_run_overwrite_and_delete(tiny_bert, redis_proc, tmp_path,
                                                                     live_server):
    mine = dumps(random_delta(tiny_bert, 0.001, seed=1, kind="classify", labels=["acme-a", "acme-b"]))
    theirs = dumps(random_delta(tiny_bert, 0.001, seed=2, kind="classify", labels=["beta-a", "beta-b"]))
    emb = dumps(random_delta(tiny_bert, 0.001, seed=3, kind="embed"))
    with live_server(create_app(settings_for(redis_proc.url, tmp_path), base=tiny_bert)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        a, b = auth_for("acme"), auth_for("beta")
        assert c.put("/v1/tasks/t", content=mine, headers=a).status_code == 201
        assert c.put("/v1/tasks/emb", content=emb, headers=a).status_code == 201
        acme_t = c.get("/v1/tasks/t", headers=a).json()
        acme_out = c.post("/v1/tasks/t/classify", json={"texts": ["probe"]}, headers=a).json()

        def not_found_for_beta(method: str, path: str, **kw) -> dict:
            r = c.request(method, path, headers=b | kw.pop("headers", {}), **kw)
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            return r.json()["error"]

        # list / get / run / delete: acme's tasks do not exist for beta
        assert c.get("/v1/tasks", headers=b).json()["tasks"] == []
        not_found_for_beta("GET", "/v1/tasks/t")
        not_found_for_beta("POST", "/v1/tasks/t/classify", json={"texts": ["x"]})
        not_found_for_beta("POST", "/v1/tasks/emb/embed", json={"texts": ["x"]})
        not_found_for_beta("POST", "/v1/tasks/t/generate", json={"prompt": "x"})
        not_found_for_beta("POST", "/v1/completions", json={"model": "t", "prompt": "x"})
        not_found_for_beta("POST", "/v1/chat/completions",
                           json={"model": "t", "messages": [{"role": "user", "content": "x"}]})
        not_found_for_beta("DELETE", "/v1/tasks/t")
        not_found_for_beta("DELETE", "/v1/tasks/t", headers={"If-Match": f'"{acme_t["version"]}"'})
        # ... and a 404 says no more about a task another tenant has than about one nobody has
        there = not_found_for_beta("GET", "/v1/tasks/t")["message"]
        nowhere = not_found_for_beta("GET", "/v1/tasks/u")["message"]
        assert there.replace("'t'", "'u'") == nowhere
        # overwrite: conditional on acme's version -> refused; unconditional -> beta's own task
        r = c.put("/v1/tasks/t", content=theirs, headers=b | {"If-Match": f'"{acme_t["version"]}"'})
        assert r.status_code == 409
        assert c.put("/v1/tasks/t", content=theirs, headers=b).status_code == 201
        assert c.get("/v1/tasks/t", headers=a).json() == acme_t  # acme's untouched
        # the same task name serves each tenant its own delta, however requests interleave
        for _ in range(5):
            ra = c.post("/v1/tasks/t/classify", json={"texts": ["probe"]}, headers=a).json()
            rb = c.post("/v1/tasks/t/classify", json={"texts": ["probe"]}, headers=b).json()
            assert ra == acme_out
            assert set(rb["results"][0]["scores"]) == {"beta-a", "beta-b"}
        # beta deletes its own "t": acme's stays
        assert c.delete("/v1/tasks/t", headers=b).status_code == 200
        assert c.get("/v1/tasks/t", headers=a).json() == acme_t
        assert [t["name"] for t in c.get("/v1/tasks", headers=a).json()["tasks"]] == ["emb", "t"]
        # only the admin sees across tenants; a tenant asking is refused
        assert c.get("/v1/tasks?all=true", headers=b).status_code == 403
        every = c.get("/v1/tasks?all=true", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert sorted((t["tenant"], t["name"]) for t in every["tasks"]) == [("acme", "emb"),
                                                                           ("acme", "t")]
        # no key, a wrong key, another scheme, a key's digest: 401 on every tenant route
        sha = hashlib.sha256(KEYS["acme"].encode()).hexdigest()
        for bad in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEYS['acme']}"},
                    {"Authorization": f"Bearer sha256:{sha}"}, {"Authorization": KEYS["acme"]}):
            for method, path in (("GET", "/v1/tasks"), ("GET", "/v1/tasks/t"),
                                 ("PUT", "/v1/tasks/t"), ("DELETE", "/v1/tasks/t"),
                                 ("POST", "/v1/tasks/t/classify")):
                r = c.request(method, path, headers=bad, json={"texts": ["x"]}
                              if method == "POST" else None)
                assert r.status_code == 401, (bad, method, path)


# --- keys: digests only, constant-time comparison -------------------------------------------------

def keyring() -> KeyRing:
    return KeyRing.from_settings(Settings(api_keys=",".join(f"{t}:{k}" for t, k in KEYS.items()),
                                          admin_key=ADMIN))


def test_keyring_holds_only_digests_of_the_keys(tiny_bert, redis_proc, tmp_path, live_server):
    with live_server(create_app(settings_for(redis_proc.url, tmp_path), base=tiny_bert)) as srv:
        running = srv.state.keys
    for ring in (keyring(), running):
        assert len(ring._entries) == 3
        dumped = pickle.dumps(ring)  # everything the object holds, reachable attributes included
        text = repr(vars(ring))
        for key in (*KEYS.values(), ADMIN):
            assert key.encode() not in dumped and key not in text
            digest = hashlib.sha256(key.encode()).digest()
            assert digest in [d for d, _ in ring._entries]  # a digest, and nothing else
        for digest, _ in ring._entries:
            assert isinstance(digest, bytes) and len(digest) == 32


def test_keys_are_compared_in_constant_time_against_every_entry(monkeypatch):
    ring = keyring()
    calls: list[tuple[int, int]] = []
    real = auth.hmac.compare_digest

    def counting(x: bytes, y: bytes) -> bool:
        calls.append((len(x), len(y)))
        return real(x, y)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    first, last = KEYS["acme"], ADMIN
    for key, tenant in ((first, "acme"), (last, "admin"), ("wrong", None), ("w" * 500, None)):
        calls.clear()
        if tenant is None:
            with pytest.raises(Unauthorized):
                ring.authenticate(key)
        else:
            assert ring.authenticate(key).name == tenant
        # every entry compared, whichever matches (no early exit), always digest against digest
        assert calls == [(32, 32)] * len(ring._entries), (key, calls)


# --- body size limits -----------------------------------------------------------------------------

def test_json_bodies_are_limited_declared_or_streamed(tiny_bert, redis_proc, tmp_path, live_server):
    """Uploads have max_delta_bytes (see test_hostile_deltas); every other body max_request_bytes:
    refused with 413 once declared or read past, never buffered whole."""
    limit = 64 * 1024
    s = settings_for(redis_proc.url, tmp_path, max_request_bytes=limit)
    with live_server(create_app(s, base=tiny_bert)) as srv, \
            httpx.Client(base_url=srv.url, headers=auth_for("acme"), timeout=60) as c:
        ok = c.post("/v1/tasks/base/embed", json={"texts": ["x" * (limit // 4)] * 2})  # texts <= 20k
        assert ok.status_code == 200
        declared = c.post("/v1/tasks/base/embed", json={"texts": ["x" * limit]})
        assert declared.status_code == 413, declared.text
        assert declared.json()["error"]["type"] == "payload_too_large"
        assert "limit" in declared.json()["error"]["message"]
        sent, piece = [0], b" " * (1024 * 1024)

        def endless_json():  # 4 GiB of whitespace before a JSON value that never comes
            yield b'{"texts": ["x"]'
            while sent[0] < 4 * 1024**3:
                sent[0] += len(piece)
                yield piece

        before = rss_bytes()
        streamed = c.post("/v1/tasks/base/embed", content=endless_json(),
                          headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413, streamed.text
        assert sent[0] < 1024**3  # the server stopped reading long before the end
        assert rss_bytes() - before < 256 * 1024 * 1024
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/tasks/x/classify"):
            r = c.post(path, content=b"{" + b" " * (2 * limit), headers={"Content-Type": "application/json"})
            assert r.status_code == 413, path
        assert c.post("/v1/tasks/base/embed", json={"texts": ["x"] * 257}).status_code == 422
        assert c.get("/readyz").status_code == 200


# --- nothing secret in the logs -------------------------------------------------------------------

class CapturedServer:
    """The app under uvicorn at debug level with access logs, every log record kept."""

    def __init__(self, app, port: int) -> None:
        self.records: list[str] = []
        self.handler = logging.Handler(logging.DEBUG)
        self.handler.emit = lambda rec: self.records.append(self.handler.format(rec))
        self.handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="debug",
                                access_log=True, lifespan="on")
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> CapturedServer:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive()
            threading.Event().wait(0.02)
        # uvicorn configured its loggers on start: attach to every logger there is, and the root
        for name in ["", *logging.root.manager.loggerDict]:
            logger = logging.getLogger(name)
            logger.addHandler(self.handler)
        self.levels = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}
        logging.getLogger().setLevel(logging.DEBUG)
        for name in ("taskdelta", "redis", "httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        for name in ["", *logging.root.manager.loggerDict]:
            logging.getLogger(name).removeHandler(self.handler)
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        logging.getLogger().setLevel(logging.WARNING)


def test_no_key_or_delta_bytes_in_any_log(tiny_bert, redis_proc, tmp_path, capfd):
    from taskdelta.server.embedded import free_port

    canary = "canary-5f0d2b8e91"
    good = random_delta(tiny_bert, 0.001, seed=4, kind="classify", labels=["p", "q"])
    body = dumps(good.__class__(meta=good.meta.model_copy(update={"provenance": good.meta.provenance.
                                model_copy(update={"note": canary})}), tensors=good.tensors,
                                heads=good.heads))
    assert canary.encode() in body
    wrong_key = "sk-wrong-0e4c8a2f6b"
    bad = body[:len(body) // 2] + canary.encode() * 4  # refused: truncated, canary inside
    app = create_app(settings_for(redis_proc.url, tmp_path, max_delta_bytes=len(body) * 2), base=tiny_bert)
    with CapturedServer(app, free_port()) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        a = auth_for("acme")
        assert c.get("/v1/tasks", headers={"Authorization": f"Bearer {wrong_key}"}).status_code == 401
        assert c.put("/v1/tasks/logged", content=body,
                     headers={"Authorization": f"Bearer {wrong_key}"}).status_code == 401
        assert c.put("/v1/tasks/logged", content=bad, headers=a).status_code == 422
        assert c.put("/v1/tasks/logged", content=body, headers=a).status_code == 201
        assert c.put("/v1/tasks/toolarge", content=body * 3, headers=a).status_code == 413
        assert c.post("/v1/tasks/logged/classify", json={"texts": ["hi"]}, headers=a).status_code == 200
        assert c.get("/v1/tasks/logged", headers=a).status_code == 200
        assert c.get("/v1/tasks?all=true", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
        assert c.delete("/v1/tasks/logged", headers=a).status_code == 200
    out, err = capfd.readouterr()
    logs = "\n".join(srv.records) + out + err
    assert "PUT /v1/tasks/logged" in logs and " 401" in logs  # the run was logged, access log too
    secrets = [*KEYS.values(), ADMIN, wrong_key, canary]
    for chunk in (body[8:40], body[-32:], bad[-32:]):  # the raw bytes, however rendered
        secrets += [chunk.hex(), base64.b64encode(chunk).decode(), repr(chunk)[2:-1]]
    found = [s for s in secrets if s in logs]
    assert not found, found
