"""Uploads are bounded (issue 14, item 5): how many run at once (429 with Retry-After beyond), the
bytes of uploads in progress count against the tenant's quota before their bodies are read, and
one upload's peak memory in the server is at most twice its body."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import auth, settings_for

from taskdelta.deltas import dumps, random_delta
from taskdelta.server.app import create_app
from taskdelta.server.embedded import free_port

WAIT_S = 30


class StalledUpload:
    """A PUT whose body stops after its first chunk until `release()`: an upload in progress."""

    def __init__(self, url: str, path: str, headers: dict[str, str], declared: int) -> None:
        self.go = threading.Event()
        self.status: int | None = None
        first = b"\0" * 1024

        def body() -> Iterator[bytes]:
            yield first
            self.go.wait(WAIT_S)
            # the rest is never sent: the connection is closed by release()

        def run() -> None:
            try:
                with httpx.Client(timeout=WAIT_S) as c:
                    self.status = c.put(url + path, content=body(), headers=headers | {
                        "Content-Length": str(declared)}).status_code
            except Exception:  # noqa: BLE001 - cut off short of its declared length, on purpose
                self.status = 0

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.go.set()
        self.thread.join(WAIT_S)


def wait_for(condition, what: str) -> None:
    """Poll a server-side condition (the gate's count) until it holds: there is no event to await
    across the HTTP boundary."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def in_progress(srv) -> int:
    gate = getattr(srv.app.state, "upload_gate", None)
    return 0 if gate is None else gate.in_progress


def test_concurrent_uploads_are_bounded_per_tenant_and_in_total(tiny_bert, redis_proc, tmp_path,
                                                                live_server):
    s = settings_for(redis_proc.url, tmp_path, max_concurrent_uploads=2, max_uploads_per_tenant=1)
    data = dumps(random_delta(tiny_bert, 0.001, seed=1, kind="embed"))
    with live_server(create_app(s, base=tiny_bert)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        first = StalledUpload(srv.url, "/v1/tasks/slow", auth("acme"), 10**6)
        wait_for(lambda: in_progress(srv) == 1, "the first upload to be admitted")
        r = c.put("/v1/tasks/other", content=data, headers=auth("acme"))
        assert r.status_code == 429 and r.headers["Retry-After"] == "1", r.text
        assert "tenant 'acme' has 1 uploads in progress" in r.json()["error"]["message"]
        second = StalledUpload(srv.url, "/v1/tasks/slow", auth("beta"), 10**6)
        wait_for(lambda: in_progress(srv) == 2, "the second upload to be admitted")
        r = c.put("/v1/tasks/t", content=data, headers={"Authorization": "Bearer key-admin"})
        assert r.status_code == 429 and "2 uploads are in progress" in r.json()["error"]["message"]
        first.release()
        second.release()
        wait_for(lambda: in_progress(srv) == 0, "the stalled uploads to end")
        assert c.put("/v1/tasks/other", content=data, headers=auth("acme")).status_code == 201


def test_uploads_in_progress_count_against_the_quota(tiny_bert, redis_proc, tmp_path,
                                                     live_server):
    """The quota leaves room for one delta: while another upload of that size is in progress,
    the delta is refused (403) before its body is read; once that upload ends, it is stored."""
    data = dumps(random_delta(tiny_bert, 0.001, seed=1, kind="embed"))
    s = settings_for(redis_proc.url, tmp_path, max_bytes_per_tenant=len(data) * 3 // 2)
    with live_server(create_app(s, base=tiny_bert)) as srv, \
            httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=30) as c:
        stalled = StalledUpload(srv.url, "/v1/tasks/big", auth("acme"), len(data))
        wait_for(lambda: in_progress(srv) == 1, "the first upload to be admitted")
        r = c.put("/v1/tasks/t", content=data)
        assert r.status_code == 403, r.text
        assert "in progress" in r.json()["error"]["message"]
        assert c.put("/v1/tasks/t", content=data, headers=auth("beta")).status_code == 201
        stalled.release()
        wait_for(lambda: in_progress(srv) == 0, "the stalled upload to end")
        assert c.put("/v1/tasks/t", content=data).status_code == 201


# --- peak memory of one upload --------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_bert_dir(tmp_path_factory, tokenizer_dir: Path) -> Path:
    """A 2-layer BERT with a 256-wide hidden size (~9.6 M parameters): deltas of tens of MB."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=1024, max_position_embeddings=128)
    cfg.architectures = ["BertModel"]
    out = tmp_path_factory.mktemp("wide-bert")
    BertModel(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("encoding", ["plain", "compact"])
def test_one_upload_peaks_at_most_twice_its_body(wide_bert_dir, redis_proc, tmp_path, encoding):
    """The server in a child process: its peak RSS (VmHWM, reset just before) grows by at most
    twice the body while it reads, checks and stores one upload of tens of MB. (Before: the body
    was copied on reading, copied again for parsing and the tensors copied out of that.)"""
    from taskdelta.deltas import load_base

    base = load_base(wide_bert_dir, device="cpu")
    data = dumps(random_delta(base, 0.5, seed=1, kind="embed"), encoding=encoding)
    small = dumps(random_delta(base, 0.001, seed=2, kind="embed"), encoding=encoding)
    del base
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskdelta.server", "--base", str(wide_bert_dir), "--port",
             str(port), "--redis-url", redis_proc.url, "--no-auth", "--log-level", "warning"],
            env=os.environ | {"HF_HUB_OFFLINE": "1", "TASKDELTA_DEVICE": "cpu",
                              # freed memory goes back at once, so the baseline is honest
                              "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"},
            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(url, proc), "the server to start")
        with httpx.Client(base_url=url, timeout=120) as c:
            assert c.put("/v1/tasks/warm", content=small).status_code == 201  # lazy imports
            before = memory_kb(proc.pid)["VmRSS"]
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            r = c.put("/v1/tasks/big", content=data)
            assert r.status_code == 201, r.text
            growth = (memory_kb(proc.pid)["VmHWM"] - before) * 1024
        figures = f"{encoding}: body {len(data) / 2**20:.1f} MiB, peak growth {growth / 2**20:.1f} MiB"
        print(figures)  # -s shows the measured ratio
        assert growth <= 2 * len(data), figures
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ready(url: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, "the server exited"
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
