"""Load: 1,000 concurrent clients on loopback, each on its own connection, against the server
running in this process (so its scheduler can be sampled directly); the clients run in a child
process (tests/support_load.py), so they neither share the server's interpreter lock nor count in
its memory. The server's worker is held inside the model until the first 429, so the queues fill
up by construction. Every answer is a 200 or a 429 (with Retry-After); the scheduler's queues,
sampled from another thread, never pass their limits; memory stays bounded (a second wave of
1,000 clients grows nothing lasting).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
from support import HANG_GUARD_S, ROOT, HeldWorker, rss_bytes
from support_load import CLIENTS, FIRST_429, KEY, REQUESTS_EACH, TASKS

AUTH = {"Authorization": f"Bearer {KEY}"}
CLIENT = ROOT / "tests" / "support_load.py"


@dataclass
class Sampler:
    """Samples the scheduler's queue depths (and this process' RSS) as often as it gets to run."""

    scheduler: object
    total: int = 0
    per_task: int = 0
    rss: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.total = max(self.total, self.scheduler.total_depth)
            self.per_task = max(self.per_task, 0, *(self.scheduler.depth(k)
                                                    for k in self.scheduler.queued_tasks()))
            if self.samples % 10 == 0:
                self.rss = max(self.rss, rss_bytes())
            self.samples += 1

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Wave:
    statuses: Counter
    problems: list[str]
    full_when_released: bool  # a queue bound was reached while the worker was held


def run_wave(url: str, scheduler, limits: tuple[int, int], worker: HeldWorker) -> Wave:
    """One wave of clients from a child process, the worker held until the first 429 arrives."""
    max_queued_total, max_queue = limits
    worker.hold()
    child = subprocess.Popen([sys.executable, str(CLIENT), url], stdout=subprocess.PIPE, text=True)
    lines = iter(child.stdout.readline, "")
    try:
        assert next(lines).strip() == FIRST_429, "the wave ended without a 429"
        full = scheduler.total_depth == max_queued_total or any(
            scheduler.depth(k) == max_queue for k in scheduler.queued_tasks())
        worker.release()
        result = json.loads(list(lines)[-1])
    finally:
        worker.release()
        assert child.wait(timeout=HANG_GUARD_S) == 0
    statuses = Counter({int(k): v for k, v in result["statuses"].items()})
    return Wave(statuses, result["problems"], full)


class BigServer:
    """A live server (see conftest) whose uvicorn accepts a thousand connections at once and keeps
    idle ones open while the wave lasts (a client reusing a connection the server just closed
    for idleness would see a spurious read error)."""

    def __init__(self, live_server, app) -> None:
        import uvicorn

        self.live = live_server(app)
        self.live.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=self.live.port, log_level="warning", lifespan="on",
            backlog=4096, timeout_keep_alive=300))

    def __enter__(self):
        return self.live.__enter__()

    def __exit__(self, *exc) -> None:
        self.live.__exit__(*exc)


@pytest.mark.slow
def test_thousand_concurrent_clients_get_only_200_or_429_within_queue_limits(
        tiny_bert, redis_proc, tmp_path, live_server):
    from taskdelta.deltas import dumps, random_delta
    from taskdelta.server.app import create_app
    from taskdelta.server.settings import Settings

    s = Settings(redis_url=redis_proc.url, data_dir=tmp_path / "data", api_keys=f"acme:{KEY}",
                 max_batch=16, max_queue=48, max_queued_total=128,
                 request_timeout_s=120.0)
    limits = (s.max_queued_total, s.max_queue)
    with BigServer(live_server, create_app(s, base=tiny_bert)) as srv:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            for i, (task, kind) in enumerate(TASKS.items()):
                if task != "base":
                    d = random_delta(tiny_bert, 0.001, seed=i, kind=kind,
                                     labels=["a", "b"] if kind == "classify" else None)
                    assert c.put(f"/v1/tasks/{task}", content=dumps(d)).status_code == 201
        scheduler = srv.state.scheduler
        with HeldWorker(tiny_bert, HANG_GUARD_S) as worker:
            before = rss_bytes()
            with Sampler(scheduler) as first:
                one = run_wave(srv.url, scheduler, limits, worker)
            after_first = rss_bytes()
            with Sampler(scheduler) as second:
                two = run_wave(srv.url, scheduler, limits, worker)
            after_second = rss_bytes()
        assert scheduler.total_depth == 0  # everything answered: nothing left queued

    total = one.statuses + two.statuses
    print(f"\nload: {2 * CLIENTS} clients in two waves, {sum(total.values())} requests: "
          f"{dict(total)}; max queued {max(first.total, second.total)} "
          f"(limit {s.max_queued_total}), max per task {max(first.per_task, second.per_task)} "
          f"(limit {s.max_queue}); RSS MiB before {before >> 20}, peak "
          f"{max(first.rss, second.rss) >> 20}, after waves {after_first >> 20} / {after_second >> 20}")
    assert not one.problems + two.problems, (one.problems + two.problems)[:10]
    assert sum(total.values()) == 2 * CLIENTS * REQUESTS_EACH
    assert set(total) <= {200, 429}, total
    for wave in (one, two):  # served, and overload reached (the worker was held until a 429)
        assert wave.statuses[200] > 0 and wave.statuses[429] > 0, wave.statuses
        assert wave.full_when_released  # the 429s came from a full queue
    for run in (first, second):  # sampled: a sample can only under-state the depth
        assert run.total <= s.max_queued_total and run.per_task <= s.max_queue
    # bounded memory: the first wave's peak is modest, the second wave grows nothing lasting
    assert max(first.rss, second.rss) - before < 512 * 1024 * 1024
    assert after_second - after_first < 64 * 1024 * 1024
