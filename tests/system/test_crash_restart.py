"""A crashed server restarts on its data directory and serves every task it had (issue 14, item 8):
the embedded redis-server dies with its parent, and a start that finds an orphan takes over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from taskdelta.deltas import dumps, random_delta
from taskdelta.server.embedded import EmbeddedRedis, free_port

START_TIMEOUT_S = 120


class EmbeddedServer:
    """`python -m taskdelta.server` with no Redis URL (so the embedded one) on `data_dir`."""

    def __init__(self, base_dir: Path, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "taskdelta.server", "--base", str(base_dir), "--port",
                 str(self.port), "--data-dir", str(data_dir), "--no-auth", "--log-level", "warning"],
                env=os.environ | {"HF_HUB_OFFLINE": "1", "TASKDELTA_DEVICE": "cpu"},
                stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited:\n{self.log_path.read_text()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def redis_pid(data_dir: Path) -> int:
    return int((data_dir / "redis" / "redis.pid").read_text().split()[0])


def gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


def hammer(url: str, tasks: list[str], stop: threading.Event, statuses: list[int]) -> None:
    """Classify requests round the tasks until `stop`; a cut connection is recorded as 0."""
    with httpx.Client(base_url=url, timeout=10) as c:
        i = 0
        while not stop.is_set():
            try:
                r = c.post(f"/v1/tasks/{tasks[i % len(tasks)]}/classify", json={"texts": ["x"]})
                statuses.append(r.status_code)
            except httpx.TransportError:
                statuses.append(0)
                return
            i += 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL and /proc semantics")
def test_server_killed_under_load_restarts_on_its_data_dir_and_serves_every_task(
        tiny_bert, tiny_bert_dir, tmp_path):
    data_dir = tmp_path / "data"
    server = EmbeddedServer(tiny_bert_dir, data_dir, tmp_path / "server.log")
    tasks = [f"t{i}" for i in range(4)]
    versions: dict[str, int] = {}
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for i, name in enumerate(tasks):
                body = dumps(random_delta(tiny_bert, 0.001, seed=i, kind="classify",
                                          labels=["a", "b"]))
                r = c.put(f"/v1/tasks/{name}", content=body)
                assert r.status_code == 201, r.text
                versions[name] = r.json()["version"]
        child = redis_pid(data_dir)  # the embedded redis-server, which must not outlive the server
        stop, statuses = threading.Event(), []
        load = [threading.Thread(target=hammer, args=(server.url, tasks, stop, statuses))
                for _ in range(3)]
        for t in load:
            t.start()
        while len(statuses) < 20:  # under load when it dies
            time.sleep(0.01)
        server.kill()
        stop.set()
        for t in load:
            t.join(timeout=30)
        assert 200 in statuses
        restarted = EmbeddedServer(tiny_bert_dir, data_dir, tmp_path / "server.log")
        try:
            restarted.wait_ready()  # the old redis-server did not keep the data dir's lock
            assert gone(child)
            with httpx.Client(base_url=restarted.url, timeout=30) as c:
                for name in tasks:
                    r = c.post(f"/v1/tasks/{name}/classify", json={"texts": ["x"]})
                    assert r.status_code == 200, (name, r.text)
                    assert r.json()["version"] == versions[name]
        finally:
            restarted.stop()
    finally:
        server.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL and /proc semantics")
def test_a_start_takes_over_an_orphaned_redis_and_keeps_its_data(tmp_path):
    """An orphan (its server killed where nothing stopped the child): the next start stops it and
    takes the directory over, with the data; a directory whose server lives is still refused."""
    code = ("import sys, time; from taskdelta.server.embedded import EmbeddedRedis; "
            "import redis; e = EmbeddedRedis(sys.argv[1], die_with_parent=False); "
            "redis.Redis.from_url(e.url).set('k', 'v'); print('ready', flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert owner.stdout.readline().strip() == "ready"
        orphan = redis_pid(tmp_path)
        with pytest.raises(RuntimeError, match="in use"):  # its server is alive: refused
            EmbeddedRedis(tmp_path)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
    assert not gone(orphan)  # an orphan now, holding the lock
    with EmbeddedRedis(tmp_path) as embedded:
        assert gone(orphan)
        assert redis.Redis.from_url(embedded.url).get("k") == b"v"
