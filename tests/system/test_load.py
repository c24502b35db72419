"""Load: 1,000 concurrent clients on loopback, each on its own connection, against the server
running in this process (so its scheduler can be sampled directly); the clients run in a child
process, so they neither share the server's interpreter lock nor count in its memory. Every
answer is a 200 or a 429 (with Retry-After); the scheduler's queues, sampled continuously from
another thread, never pass their limits; memory stays bounded (a second wave of 1,000 clients
grows nothing lasting).

Run as a script, this file is the client side: `python test_load.py URL` prints JSON.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

KEY = "load-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLIENTS, REQUESTS_EACH = 1000, 2
TASKS = {"c0": "classify", "c1": "classify", "e0": "embed", "base": "embed"}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Sampler:
    """Samples the scheduler's queue depths (and this process' RSS) as often as it gets to run."""

    scheduler: object
    keys: list[str]
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
            self.per_task = max(self.per_task, *(self.scheduler.depth(k) for k in self.keys))
            if self.samples % 10 == 0:
                self.rss = max(self.rss, rss_bytes())
            self.samples += 1

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def wave(url: str) -> dict:
    """CLIENTS clients at once, each with its own connection making REQUESTS_EACH requests.
    Plain HTTP/1.1 over asyncio streams: a pooled client's bookkeeping grows with the number of
    connections, and would measure itself rather than the server."""
    host, port = url.removeprefix("http://").split(":")
    statuses: Counter = Counter()
    problems: list[str] = []
    go = asyncio.Event()

    async def client(n: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        await go.wait()
        try:
            for i in range(REQUESTS_EACH):
                task = list(TASKS)[(n + i) % len(TASKS)]
                body = json.dumps({"texts": [f"client {n} {i}"]}).encode()
                writer.write(f"POST /v1/tasks/{task}/{TASKS[task]} HTTP/1.1\r\nHost: {host}\r\n"
                             f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
                status = int((await reader.readline()).split()[1])
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers["content-length"]))
                statuses[status] += 1
                if status == 429 and int(headers.get("retry-after", "0")) < 1:
                    problems.append(f"client {n}: 429 without Retry-After")
                if headers.get("connection") == "close":
                    problems.append(f"client {n}: the server closed the connection")
                    return
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            problems.append(f"client {n}: {exc!r}")
        finally:
            writer.close()

    clients = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
    await asyncio.sleep(0.5)  # all connected, then all at once
    go.set()
    await asyncio.gather(*clients)
    return {"statuses": {str(k): v for k, v in statuses.items()}, "problems": problems}


def run_wave(url: str) -> tuple[Counter, list[str]]:
    """One wave of clients, from a child process."""
    out = subprocess.run([sys.executable, __file__, url], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    result = json.loads(out.splitlines()[-1])
    return Counter({int(k): v for k, v in result["statuses"].items()}), result["problems"]


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
                 max_batch=16, max_wait_ms=2.0, max_queue=48, max_queued_total=128,
                 request_timeout_s=120.0)
    with BigServer(live_server, create_app(s, base=tiny_bert)) as srv:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            for i, (task, kind) in enumerate(TASKS.items()):
                if task != "base":
                    d = random_delta(tiny_bert, 0.001, seed=i, kind=kind,
                                     labels=["a", "b"] if kind == "classify" else None)
                    assert c.put(f"/v1/tasks/{task}", content=dumps(d)).status_code == 201
        scheduler = srv.state.scheduler
        started = time.perf_counter()
        before = rss_bytes()
        with Sampler(scheduler, [f"acme/{t}" for t in TASKS]) as first:
            statuses, problems = run_wave(srv.url)
        after_first = rss_bytes()
        with Sampler(scheduler, [f"acme/{t}" for t in TASKS]) as second:
            statuses2, problems2 = run_wave(srv.url)
        after_second = rss_bytes()
        elapsed = time.perf_counter() - started
        assert scheduler.total_depth == 0  # everything answered: nothing left queued

    total = statuses + statuses2
    print(f"\nload: {2 * CLIENTS} clients in two waves, {sum(total.values())} requests in "
          f"{elapsed:.0f} s: {dict(total)}; max queued {max(first.total, second.total)} "
          f"(limit {s.max_queued_total}), max per task {max(first.per_task, second.per_task)} "
          f"(limit {s.max_queue}), {first.samples + second.samples} samples; RSS MiB before "
          f"{before >> 20}, peak {max(first.rss, second.rss) >> 20}, after waves "
          f"{after_first >> 20} / {after_second >> 20}")
    assert not problems + problems2, (problems + problems2)[:10]
    assert sum(total.values()) == 2 * CLIENTS * REQUESTS_EACH
    assert set(total) <= {200, 429}, total
    assert total[200] > 0 and total[429] > 0, total  # served, and overload reached
    for run in (first, second):
        assert run.samples > 100
        assert run.total <= s.max_queued_total and run.per_task <= s.max_queue
    assert max(first.total, second.total) >= s.max_queue  # the queues did fill up
    # bounded memory: the first wave's peak is modest, the second wave grows nothing lasting
    assert max(first.rss, second.rss) - before < 512 * 1024 * 1024
    assert after_second - after_first < 64 * 1024 * 1024


if __name__ == "__main__":
    print(json.dumps(asyncio.run(wave(sys.argv[1]))))
