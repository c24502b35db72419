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
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import torch
from support import HANG_GUARD_S, assert_bit_identical, snapshot
from support_topology import ServerProcess

from taskdelta.deltas import SparseTensor, Swapper, TaskDelta, dumps, prepare, random_delta
from taskdelta.server.app import create_app
from taskdelta.server.executor import EncodePart, Executor
from taskdelta.server.jobs import EmbedJob
from taskdelta.server.keys import Keys
from taskdelta.server.settings import Settings

KEY = "fault-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S = 30.0  # the server's request deadline here
VERSION_CHECK_S = 0.2  # how often a cached task's version is re-checked against Redis


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


# what each kind of client answers when nothing is wrong
NORMAL = {"cached": 200, "uncached": 404, "meta": 200, "list": 200, "upload": 201}
NEED_REDIS = ("uncached", "meta", "list", "upload")


@dataclass
class Outage:
    how: str
    down_at: float = 0.0  # Redis had exited
    restart_at: float = 0.0  # its restart began
    up_at: float = 0.0  # it answered again
    readyz_down: list[tuple[int, bool]] = field(default_factory=list)


async def until(condition, what: str) -> None:
    """Wait (polling the clients' records) until `condition()` holds; the guard only turns a hang
    into a failure, it states nothing about speed."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


def answered(load: Load, kind: str, status: int, since: float) -> bool:
    return any(r.kind == kind and r.status == status and r.started > since for r in load.records)


def since(load: Load, t: float) -> dict[str, Counter]:
    """Statuses per kind of the requests started after `t` (for failure messages)."""
    return {k: Counter(r.status for r in load.records if r.kind == k and r.started > t) for k in NORMAL}


async def outage(redis_proc, how: str, url: str, load: Load) -> Outage:
    """Redis goes away and stays away until /readyz has said so, every client that needs Redis
    has been answered 503 while it was away (so each was answered without Redis, not held until
    it came back), and a cached task was served after its version re-check fell due in the
    outage. Then Redis restarts and the service must become ready again."""
    o = Outage(how)
    if how == "SIGTERM":
        await asyncio.to_thread(redis_proc.stop)
    else:  # no shutdown at all: only what was fsynced before each acknowledgement survives
        redis_proc.proc.kill()
        await asyncio.to_thread(redis_proc.proc.wait)
        redis_proc.proc = None
    o.down_at = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        recheck_due = o.down_at + VERSION_CHECK_S
        while not (o.readyz_down and all(answered(load, k, 503, o.down_at) for k in NEED_REDIS)
                   and answered(load, "cached", 200, recheck_due)):
            assert not answered(load, "cached", 503, o.down_at), ("a cached task was refused", how,
                                                                   since(load, o.down_at))
            assert time.monotonic() - o.down_at < HANG_GUARD_S, (how, since(load, o.down_at))
            r = await c.get("/readyz")
            o.readyz_down.append((r.status_code, r.json()["redis"]))
            await asyncio.sleep(0.05)
        o.restart_at = time.monotonic()
        await asyncio.to_thread(redis_proc.start)
        o.up_at = time.monotonic()
        while (await c.get("/readyz")).status_code != 200:
            assert time.monotonic() - o.up_at < HANG_GUARD_S, "never ready after Redis came back"
            await asyncio.sleep(0.05)
    return o


def test_redis_outages_under_load_fail_fast_keep_cached_tasks_and_lose_no_ack(
        tiny_bert, redis_proc, tmp_path, live_server):
    # the three upload clients are one tenant's: the per-tenant upload gate admits all three, so an
    # upload's answer says what Redis did (201 or 503), not that the gate was full (429)
    s = Settings(redis_url=redis_proc.url, data_dir=tmp_path / "data", api_keys=f"acme:{KEY}",
                 version_check_s=VERSION_CHECK_S, request_timeout_s=TIMEOUT_S,
                 max_uploads_per_tenant=3)
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
            outages: list[Outage] = []
            for how in ("SIGTERM", "SIGKILL", None):
                # every kind is served normally again (before the first outage, and after each)
                since = outages[-1].up_at if outages else 0.0
                await until(lambda since=since: all(answered(load, k, ok, since)
                                                    for k, ok in NORMAL.items()),
                            f"each kind served normally after {outages[-1].how if outages else 'start'}")
                if how is not None:
                    outages.append(await outage(redis_proc, how, srv.url, load))
            load.stop.set()
            await asyncio.gather(*workers)
            return load, outages

        load, outages = asyncio.run(scenario())
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            listed = {t["name"]: t for t in c.get("/v1/tasks").json()["tasks"]}
            for name in listed:  # whatever is listed is whole: it serves
                assert c.post(f"/v1/tasks/{name}/classify", json={"texts": ["x"]}).status_code == 200

    by_kind = {k: Counter(r.status for r in load.records if r.kind == k) for k in NORMAL}
    print(f"\nredis outages {[o.how for o in outages]}; statuses {by_kind}; "
          f"uploads sent {load.uploads}, acked {len(load.acked)}, "
          f"found {sum(n in listed for n in load.acked)}")
    # cached tasks kept serving through both outages
    assert set(by_kind["cached"]) == {200}, by_kind
    # everything else: answered, and only as it would be without a fault, or 503 (never 504: no
    # request waited for its deadline, nor for Redis to return)
    for kind in NEED_REDIS:
        assert set(by_kind[kind]) <= {NORMAL[kind], 503}, by_kind
    for o in outages:
        assert o.readyz_down and all(r == (503, False) for r in o.readyz_down), o
        inside = [r for r in load.records if r.kind != "cached"
                  and o.down_at < r.started and r.ended < o.restart_at]
        assert {r.status for r in inside} == {503}, Counter(r.status for r in inside)
        assert all(r.retry_after is not None for r in inside)
    # no acknowledged upload lost: each is listed, with the bytes that were acknowledged
    assert load.acked
    missing = sorted(set(load.acked) - set(listed))
    assert not missing, f"{len(missing)} acknowledged uploads lost: {missing[:10]}"
    for name, sha in load.acked.items():
        assert listed[name]["sha256"] == sha, name


# --- server killed mid-upload --------------------------------------------------------------------

def start_server(base_dir: Path, redis_url: str, workdir: Path) -> ServerProcess:
    """`python -m taskdelta.server` as a child process (SIGKILLable), storing in 1 KiB chunks."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess("server", base_dir, redis_url, workdir,
                           env={"TASKDELTA_API_KEYS": f"acme:{KEY}", "TASKDELTA_CHUNK_BYTES": "1024"})
    server.wait_ready()
    return server


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
            f"finished before the kill: {answers} {server.log()[-3000:]}"
        time.sleep(0.0005)
    server.kill()
    server.stop()
    t.join(timeout=30)


@pytest.mark.slow
def test_server_killed_mid_upload_leaves_no_half_visible_delta(tiny_bert, tiny_bert_dir, redis_proc,
                                                               tmp_path, live_server):
    # ~4 MB, stored as ~4,000 chunks of 1 KiB: storing it takes long enough to be killed in
    body = dumps(random_delta(tiny_bert, 0.5, seed=9, kind="embed"))
    r = redis.Redis.from_url(redis_proc.url)
    outcomes = {}

    # 1. killed while the body streams in: the server holds half of it in memory only
    server = start_server(tiny_bert_dir, redis_proc.url, tmp_path / "d1")
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
    time.sleep(0.3)  # most likely the server has read the half by now; what follows holds either way
    server.kill()
    server.stop()
    killed.set()
    t.join(timeout=30)
    assert len(answers) == 1 and isinstance(answers[0], httpx.HTTPError), answers  # never acked
    assert task_keys(r, "big") == []  # nothing at all reached Redis
    outcomes["mid-stream"] = visible_state(r, "big", body)

    # 2. killed once its first chunks were written (before or after the switch to them)
    server = start_server(tiny_bert_dir, redis_proc.url, tmp_path / "d2")
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


class Runner:
    """One task's micro-batch at a time through the executor (the only code that writes weights)."""

    def __init__(self, base) -> None:
        self.executor = Executor(base)

    @property
    def swapper(self) -> Swapper:
        return self.executor.swapper

    @swapper.setter
    def swapper(self, swapper: Swapper) -> None:
        self.executor.swapper = swapper

    def execute(self, key: str, prepared, jobs: list) -> list:
        return self.executor.encode([EncodePart(key, prepared, (), jobs)])[0]

    def restore_base(self) -> None:
        self.executor.restore_base()


def swap_fixture(base):
    """A runner, a task, a second task swapped in, and what each served."""
    engine = Runner(base)
    jobs = [EmbedJob(texts=("the same sentence",))]
    delta = random_delta(base, 0.01, seed=3, kind="embed", scale=0.5)
    task = prepare(delta, base, "task")
    other = prepare(random_delta(base, 0.01, seed=2, kind="embed", scale=0.5), base, "other")
    return engine, jobs, delta, task, other


def still_serving(engine: Runner, base, jobs, task, outputs, saved) -> None:
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
