"""Processes and load for bench/serve.py: a private redis-server, a server subprocess, and a
closed-loop HTTP load generator (asyncio + httpx) with Zipf task popularity.

Everything listens on 127.0.0.1 only, on free ports; nothing here touches a shared Redis.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import platform
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from taskdelta.server.embedded import free_port, redis_server_binary, wait_for_ping


class RedisServer:
    """A private redis-server on a free loopback port, in memory only (no RDB, no AOF)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="taskdelta-bench-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [redis_server_binary(prefer_bundled=False), "--port", str(self.port), "--bind",
             "127.0.0.1", "--dir", self.dir, "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait_for_ping(("127.0.0.1", self.port), 10, self.proc):
            return self
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def used_memory(self) -> int:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"INFO memory\r\n")
            data = b""
            while b"used_memory:" not in data or not data.endswith(b"\r\n"):
                data += s.recv(65536)
        for line in data.decode().splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
        return 0

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


class ServerProcess:
    """An HTTP server subprocess (the real one or the naive baseline), ready once /readyz is 200."""

    def __init__(self, argv: list[str], port: int, threads: int, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.argv, self.port = argv, port
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(env or {})}
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.started = time.perf_counter()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {' '.join(self.argv)}"
                                   + (f" (log: {self.log})" if self.log else ""))
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    self.ready_s = time.perf_counter() - self.started
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def memory(self) -> dict[str, int]:
        """Resident set size now and at its peak (VmHWM), in bytes."""
        return proc_memory(self.proc.pid)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """A process's resident set size now ("rss") and at its peak ("rss_peak", VmHWM), in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss" if key == "VmRSS" else "rss_peak"] = int(rest.split()[0]) * 1024
    return out


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name: value summed over its label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


def zipf_cum_weights(n: int, s: float = 1.0) -> list[float]:
    """Cumulative weights of Zipf(s) over ranks 1..n (rank 1 the most popular)."""
    total, cum = 0.0, []
    for rank in range(1, n + 1):
        total += rank ** -s
        cum.append(total)
    return cum


def zipf_top_mass(n: int, k: int, s: float = 1.0) -> float:
    """Share of requests that go to the k most popular of n tasks."""
    cum = zipf_cum_weights(n, s)
    return cum[min(k, n) - 1] / cum[-1]


Send = Callable[[httpx.AsyncClient, str], Awaitable[httpx.Response]]
Probe = Callable[[httpx.AsyncClient], Awaitable[dict]]


@dataclass
class LoadResult:
    clients: int
    seconds: float  # the measured window
    completed: int  # 200s that finished inside the window
    errors: Counter = field(default_factory=Counter)  # status code or exception name -> count
    latencies: list[float] = field(default_factory=list)  # s, requests wholly inside the window
    per_task: Counter = field(default_factory=Counter)
    extra: float = 0.0  # summed by `measure` (e.g. generated tokens)
    probes: tuple[dict, dict] = ({}, {})  # the server's counters at the window's start and end

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def touch(url: str, tasks: Sequence[str], send: Send, clients: int) -> None:
    """One request per task, `clients` at a time (fills the server's cache before measuring)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for t in tasks:
        queue.put_nowait(t)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        async def worker() -> None:
            while not queue.empty():
                r = await send(http, queue.get_nowait())
                r.raise_for_status()
        await asyncio.gather(*(worker() for _ in range(clients)))


async def closed_loop(url: str, tasks: Sequence[str], send: Send, clients: int, warmup_s: float,
                      duration_s: float, seed: int = 0, zipf_s: float = 1.0,
                      measure: Callable[[httpx.Response], float] | None = None,
                      probe: Probe | None = None) -> LoadResult:
    """`clients` clients, each sending its next request as soon as its last one is answered, to
    a task drawn from Zipf(zipf_s) over `tasks` (in rank order). Counted: the window after warm-up
    (answers that arrive in it; latencies of requests sent and answered in it). `probe` reads the
    server's counters as the window opens and closes."""
    cum = zipf_cum_weights(len(tasks), zipf_s)
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup_s
    end = start + duration_s
    result = LoadResult(clients=clients, seconds=duration_s, completed=0)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(n: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 100_003 + n)
        while (t0 := loop.time()) < end:
            task = tasks[bisect.bisect_left(cum, rng.random() * cum[-1])]
            try:
                r = await send(http, task)
                outcome: int | str = r.status_code
            except httpx.HTTPError as exc:
                r, outcome = None, type(exc).__name__
            t1 = loop.time()
            if not start <= t1 <= end:
                continue
            if outcome != 200:
                result.errors[outcome] += 1
                continue
            result.completed += 1
            result.per_task[task] += 1
            if measure is not None and r is not None:
                result.extra += measure(r)
            if t0 >= start:
                result.latencies.append(t1 - t0)

    async def probes() -> None:  # on fresh connections: never queued behind the load, never
        await asyncio.sleep(start - loop.time())  # one the server closed as idle meanwhile
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            before = await probe(http)
        await asyncio.sleep(end - loop.time())
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            result.probes = (before, await probe(http))

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await asyncio.gather(*(client(n, http) for n in range(clients)),
                             *([probes()] if probe else []))
    return result


def machine(threads: int) -> dict[str, object]:
    import torch  # noqa: PLC0415

    cpu = platform.processor() or "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2**30, 1),
            "torch": torch.__version__, "python": platform.python_version(),
            "server_torch_threads": threads, "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
