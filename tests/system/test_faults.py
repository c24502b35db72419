"""Faults: Redis stopped (and killed) under load, the server killed mid-upload, and an exception
half-way through a swap.

- Redis away: what needs Redis answers 503 (with Retry-After) and does not hang, tasks already
  cached keep serving (their version re-checks, due every 0.2 s here, fall in the outage), /readyz
  says so; when Redis is back the service recovers within seconds; no acknowledged upload is lost.
- Server SIGKILLed while an upload streams in, or while it is being stored: no half-visible delta
  (the task is absent or whole), and what a dead upload left behind expires on its own.
- A swap that fails part-way leaves the base bit-identical and the engine serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import torch
from conftest import free_port

from taskdelta.deltas import SparseTensor, Swapper, TaskDelta, dumps, prepare, random_delta
from taskdelta.server.app import create_app
from taskdelta.server.cache import DeltaCache
from taskdelta.server.engine import Engine
from taskdelta.server.jobs import EmbedJob
from taskdelta.server.keys import Keys
from taskdelta.server.settings import Settings

KEY = "fault-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S = 30.0  # the server's request deadline here: "fast" means far below it


def snapshot(base) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in base.params.items()}


def assert_bit_identical(base, saved) -> None:
    for n, p in base.params.items():
        assert torch.equal(p.view(torch.int32), saved[n].view(torch.int32)), n


# --- Redis stopped under load ---------------------------------------------------------------------

@dataclass
class Record:
    kind: str
    status: int  # 0: no HTTP answer
    started: float
    ended: float
    retry_after: str | None = None


@dataclass
class Load:
    """Clients of four kinds hammering the server until `stop` is set."""

    url: str
    bodies: list[bytes]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    records: list[Record] = field(default_factory=list)
    acked: dict[str, str] = field(default_factory=dict)  # task -> sha256 of the acked body
    uploads: int = 0

    async def client(self, kind: str, n: int) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers=AUTH, timeout=60) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                started = time.monotonic()
                try:
                    r = await self.request(c, kind, n, i)
                    status, retry = r.status_code, r.headers.get("retry-after")
                except httpx.HTTPError:
                    status, retry = 0, None
                self.records.append(Record(kind, status, started, time.monotonic(), retry))
                await asyncio.sleep(0.01)

    async def request(self, c: httpx.AsyncClient, kind: str, n: int, i: int) -> httpx.Response:
        if kind == "cached":
            return await c.post("/v1/tasks/hot/classify", json={"texts": ["served from cache"]})
        if kind == "uncached":  # a cache miss: the engine must ask the store (404 when it can)
            return await c.post("/v1/tasks/ghost/classify", json={"texts": ["needs redis"]})
        if kind == "meta":
            return await c.get("/v1/tasks/hot")
        if kind == "list":
            return await c.get("/v1/tasks")
        name, body = f"up-{n}-{i}", self.bodies[i % len(self.bodies)]
        self.uploads += 1
        r = await c.put(f"/v1/tasks/{name}", content=body)
        if r.status_code == 201:
            self.acked[name] = hashlib.sha256(body).hexdigest()
        return r


@dataclass
class Outage:
    how: str
    down_at: float = 0.0  # Redis had exited
    restart_at: float = 0.0  # its restart began
    up_at: float = 0.0  # it answered again
    ready_again_s: float = 0.0
    readyz_down: list[tuple[int, bool]] = field(default_factory=list)


async def outage(redis_proc, how: str, url: str, hold_s: float = 1.5) -> Outage:
    o = Outage(how)
    if how == "SIGTERM":
        await asyncio.to_thread(redis_proc.stop)
    else:  # no shutdown at all: only what was fsynced before each acknowledgement survives
        redis_proc.proc.kill()
        await asyncio.to_thread(redis_proc.proc.wait)
        redis_proc.proc = None
    o.down_at = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        while time.monotonic() - o.down_at < hold_s:
            r = await c.get("/readyz")
            o.readyz_down.append((r.status_code, r.json()["redis"]))
            await asyncio.sleep(0.2)
        o.restart_at = time.monotonic()
        await asyncio.to_thread(redis_proc.start)
        o.up_at = time.monotonic()
        while (await c.get("/readyz")).status_code != 200:
            assert time.monotonic() - o.up_at < 20, "no recovery 20 s after Redis came back"
            await asyncio.sleep(0.05)
        o.ready_again_s = time.monotonic() - o.up_at
    return o


def test_redis_outages_under_load_fail_fast_keep_cached_tasks_and_lose_no_ack(
        tiny_bert, redis_proc, tmp_path, live_server):
    s = Settings(redis_url=redis_proc.url, data_dir=tmp_path / "data", api_keys=f"acme:{KEY}",
                 max_wait_ms=1.0, version_check_s=0.2, request_timeout_s=TIMEOUT_S)
    bodies = [dumps(random_delta(tiny_bert, 0.0005, seed=i, kind="classify", labels=["a", "b"]))
              for i in range(3)]
    with live_server(create_app(s, base=tiny_bert)) as srv:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            assert c.put("/v1/tasks/hot", content=bodies[0]).status_code == 201
            assert c.post("/v1/tasks/hot/classify", json={"texts": ["x"]}).status_code == 200

        async def scenario() -> tuple[Load, list[Outage]]:
            load = Load(srv.url, bodies)
            kinds = ["cached"] * 4 + ["uncached", "meta", "list"] * 2 + ["upload"] * 3
            workers = [asyncio.create_task(load.client(k, n)) for n, k in enumerate(kinds)]
            outages = []
            for how in ("SIGTERM", "SIGKILL"):
                await asyncio.sleep(1.0)
                outages.append(await outage(redis_proc, how, srv.url))
            await asyncio.sleep(1.5)  # service after the last recovery
            load.stop.set()
            await asyncio.gather(*workers)
            return load, outages

        load, outages = asyncio.run(scenario())
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            listed = {t["name"]: t for t in c.get("/v1/tasks").json()["tasks"]}
            for name in listed:  # whatever is listed is whole: it serves
                assert c.post(f"/v1/tasks/{name}/classify", json={"texts": ["x"]}).status_code == 200

    by_kind = {k: Counter(r.status for r in load.records if r.kind == k)
               for k in ("cached", "uncached", "meta", "list", "upload")}
    print(f"\nredis outages {[(o.how, round(o.ready_again_s, 2)) for o in outages]}; "
          f"statuses {by_kind}; uploads sent {load.uploads}, acked {len(load.acked)}, "
          f"found {sum(n in listed for n in load.acked)}")
    # cached tasks kept serving through both outages
    assert set(by_kind["cached"]) == {200}, by_kind
    # everything else: answered, and only as it would be without a fault, or 503
    for kind, ok in (("uncached", 404), ("meta", 200), ("list", 200), ("upload", 201)):
        assert set(by_kind[kind]) <= {ok, 503}, by_kind
    for o in outages:
        assert o.readyz_down and all(r == (503, False) for r in o.readyz_down), o
        inside = [r for r in load.records if r.kind != "cached"
                  and o.down_at < r.started and r.ended < o.restart_at]
        assert inside, f"no request fell inside the {o.how} outage"
        assert {r.status for r in inside} == {503}, Counter(r.status for r in inside)
        assert all(r.retry_after is not None for r in inside)
        # failing fast: not one waited anywhere near its deadline
        assert max(r.ended - r.started for r in inside) < TIMEOUT_S / 4
        # and the service came back: each kind succeeded again after this outage
        for kind, ok in (("uncached", 404), ("meta", 200), ("list", 200), ("upload", 201)):
            assert any(r.kind == kind and r.status == ok and r.started > o.up_at
                       for r in load.records), (o.how, kind)
    # no acknowledged upload lost: each is listed, with the bytes that were acknowledged
    assert load.acked
    missing = sorted(set(load.acked) - set(listed))
    assert not missing, f"{len(missing)} acknowledged uploads lost: {missing[:10]}"
    for name, sha in load.acked.items():
        assert listed[name]["sha256"] == sha, name


# --- server killed mid-upload --------------------------------------------------------------------

class ServerProcess:
    """`python -m taskdelta.server` as a child process, SIGKILLable."""

    def __init__(self, base_dir, redis_url: str, data_dir) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"TASKDELTA_API_KEYS": f"acme:{KEY}", "TASKDELTA_CHUNK_BYTES": "1024",
                            "TASKDELTA_DATA_DIR": str(data_dir), "TASKDELTA_MAX_WAIT_MS": "1"}
        self.log = Path(data_dir) / "server.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "taskdelta.server", "--base", str(base_dir), "--device", "cpu",
                 "--redis-url", redis_url, "--port", str(self.port), "--log-level", "warning"],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"the server exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the server process did not start"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def task_keys(r: redis.Redis, name: str) -> list[bytes]:
    return sorted(r.scan_iter(match=f"td:{{t:acme}}:task:{name}:*", count=1000))


def visible_state(r: redis.Redis, name: str, body: bytes) -> str:
    """'absent' or 'whole'; anything else (metadata without all its chunks, or other bytes) fails."""
    keys = Keys()
    meta = {k.decode(): v.decode() for k, v in r.hgetall(keys.meta("acme", name)).items()}
    listed = r.sismember(keys.tasks("acme"), name)
    if not meta:
        assert not listed, "listed without metadata"
        # a dead upload's chunks are pending: they expire on their own
        for key in task_keys(r, name):
            if b":blob:" in key:
                assert r.pttl(key) > 0, f"{key!r} would stay forever"
        return "absent"
    assert listed, "metadata without being listed"
    chunks = r.mget(keys.chunks("acme", name, int(meta["version"]), int(meta["chunks"])))
    assert all(c is not None for c in chunks), "metadata points at missing chunks"
    blob = b"".join(chunks)
    assert hashlib.sha256(blob).hexdigest() == meta["sha256"] == hashlib.sha256(body).hexdigest()
    assert all(r.pttl(k) == -1 for k in keys.chunks("acme", name, int(meta["version"]),
                                                    int(meta["chunks"])))
    return "whole"


def kill_when(server: ServerProcess, r: redis.Redis, name: str, marker: str, body: bytes) -> None:
    """Upload `body` in a thread and SIGKILL the server as soon as a key containing `marker`
    appears in Redis for the task."""
    answers: list[object] = []

    def upload() -> None:
        try:
            r = httpx.put(f"{server.url}/v1/tasks/{name}", content=body, headers=AUTH, timeout=60)
            answers.append((r.status_code, r.text[:300]))
        except httpx.HTTPError as exc:
            answers.append(exc)

    t = threading.Thread(target=upload)
    t.start()
    deadline = time.monotonic() + 60
    while not any(marker.encode() in k for k in task_keys(r, name)):
        assert time.monotonic() < deadline and t.is_alive(), \
            f"finished before the kill: {answers} {server.log.read_text()[-3000:]}"
        time.sleep(0.0005)
    server.kill()
    t.join(timeout=30)


@pytest.mark.slow
def test_server_killed_mid_upload_leaves_no_half_visible_delta(tiny_bert, tiny_bert_dir, redis_proc,
                                                               tmp_path, live_server):
    # ~4 MB, stored as ~4,000 chunks of 1 KiB: storing it takes long enough to be killed in
    body = dumps(random_delta(tiny_bert, 0.5, seed=9, kind="embed"))
    r = redis.Redis.from_url(redis_proc.url)
    outcomes = {}

    # 1. killed while the body streams in: the server holds half of it in memory only
    server = ServerProcess(tiny_bert_dir, redis_proc.url, tmp_path / "d1")
    half, sent_half, killed = len(body) // 2, threading.Event(), threading.Event()

    def stream():
        yield body[:half]
        sent_half.set()
        killed.wait(30)
        yield body[half:]

    answers: list[object] = []

    def upload() -> None:
        try:
            answers.append(httpx.put(f"{server.url}/v1/tasks/big", content=stream(), headers=AUTH,
                                     timeout=60))
        except httpx.HTTPError as exc:
            answers.append(exc)

    t = threading.Thread(target=upload)
    t.start()
    assert sent_half.wait(30)
    time.sleep(0.3)  # let the server read what was sent
    server.kill()
    killed.set()
    t.join(timeout=30)
    assert len(answers) == 1 and isinstance(answers[0], httpx.HTTPError), answers  # never acked
    assert task_keys(r, "big") == []  # nothing at all reached Redis
    outcomes["mid-stream"] = visible_state(r, "big", body)

    # 2. killed once its first chunks were written (before or after the switch to them)
    server = ServerProcess(tiny_bert_dir, redis_proc.url, tmp_path / "d2")
    kill_when(server, r, "big", ":blob:", body)
    outcomes["chunks written"] = visible_state(r, "big", body)
    print(f"\nSIGKILL mid-upload outcomes: {outcomes}")

    # a fresh server (in this process): the task is absent or whole, and uploading it again works
    s = Settings(redis_url=redis_proc.url, data_dir=tmp_path / "d3", api_keys=f"acme:{KEY}",
                 chunk_bytes=1024)
    with live_server(create_app(s, base=tiny_bert)) as srv, \
            httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
        names = [t["name"] for t in c.get("/v1/tasks").json()["tasks"]]
        assert names == (["big"] if outcomes["chunks written"] == "whole" else [])
        assert c.put("/v1/tasks/big", content=body).status_code in (200, 201)
        assert c.post("/v1/tasks/big/embed", json={"texts": ["x"]}).status_code == 200
    assert visible_state(r, "big", body) == "whole"
    assert outcomes["mid-stream"] == "absent"


# --- an exception half-way through a swap ---------------------------------------------------------

def with_bad_index(base, delta: TaskDelta, k: int) -> TaskDelta:
    """The delta with its k-th tensor's last index one past the end: the swap fails there, after
    the entries before it (k tensors' worth, in the order they are written) may have been written."""
    name = list(delta.tensors)[k]
    sp = delta.tensors[name]
    idx = sp.idx.clone()
    idx[-1] = base.params[name].numel()
    return TaskDelta(meta=delta.meta, tensors=delta.tensors | {name: SparseTensor(idx, sp.val)},
                     heads=delta.heads)


def swap_fixture(base):
    """An engine (execute needs no store), a task, a second task swapped in, and what each served."""
    engine = Engine(base, store=None, cache=DeltaCache(1 << 24))
    jobs = [EmbedJob(texts=("the same sentence",))]
    delta = random_delta(base, 0.01, seed=3, kind="embed", scale=0.5)
    task = prepare(delta, base, "task")
    other = prepare(random_delta(base, 0.01, seed=2, kind="embed", scale=0.5), base, "other")
    return engine, jobs, delta, task, other


def still_serving(engine: Engine, base, jobs, task, outputs, saved) -> None:
    assert engine.swapper.active is None
    assert_bit_identical(base, saved)  # not one weight of either task left behind
    assert engine.execute("t/task", task, jobs) == outputs["task"]  # serving exactly as before
    assert engine.execute("t/base", None, jobs) == outputs["base"]
    engine.restore_base()
    assert_bit_identical(base, saved)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_bad_index_half_way_through_a_swap_leaves_the_base_restored(tiny_bert, where):
    engine, jobs, delta, task, other = swap_fixture(tiny_bert)
    saved = snapshot(tiny_bert)
    outputs = {"base": engine.execute("t/base", None, jobs), "task": engine.execute("t/task", task, jobs)}
    engine.execute("t/other", other, jobs)  # a task is swapped in when the failing swap starts
    k = {"first": 0, "middle": len(delta.tensors) // 2, "last": len(delta.tensors) - 1}[where]
    bad = prepare(with_bad_index(tiny_bert, delta, k), tiny_bert, "bad")  # as if never validated
    with pytest.raises(IndexError, match="out of range"):
        engine.execute("t/bad", bad, jobs)
    still_serving(engine, tiny_bert, jobs, task, outputs, saved)


def test_write_failing_after_it_landed_leaves_the_base_restored(tiny_bert, monkeypatch):
    """The index-op swap (any device): the write lands in full, then raises (a device error)."""
    engine, jobs, _, task, other = swap_fixture(tiny_bert)
    engine.swapper = Swapper(tiny_bert, backend="torch")
    saved = snapshot(tiny_bert)
    outputs = {"base": engine.execute("t/base", None, jobs), "task": engine.execute("t/task", task, jobs)}
    engine.execute("t/other", other, jobs)
    engine.execute("t/base", None, jobs)  # restored: the injected failure hits the apply below
    real, armed = torch.Tensor.index_copy_, [True]

    def index_copy_(self, dim, index, source):
        out = real(self, dim, index, source)
        if armed[0] and index.numel() > 1000:  # a weight write, not some small bookkeeping
            armed[0] = False
            raise RuntimeError("injected: the device failed after the write")
        return out

    monkeypatch.setattr(torch.Tensor, "index_copy_", index_copy_)
    with pytest.raises(RuntimeError, match="injected"):
        engine.execute("t/task", task, jobs)
    assert not armed[0]
    monkeypatch.undo()
    still_serving(engine, tiny_bert, jobs, task, outputs, saved)
