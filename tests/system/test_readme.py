"""The README's examples, executed against a real server, so the docs cannot rot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import HANG_GUARD_S, wait_until

from taskdelta.server.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def readme_block(name: str) -> str:
    """The fenced block right after `<!-- readme-test: NAME -->` in README.md."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- readme-test: {name} -->\n```\w+\n(.*?)```", text, re.S)
    assert m, f"README has no block marked {name!r}"
    return m.group(1)


class ServerProcess:
    def __init__(self, base: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"HF_HUB_OFFLINE": "1"}
        self.log = open(workdir / f"server-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(BIN / "taskdelta"), "serve", "--no-auth", "--base", base, "--port", str(self.port),
             "--data-dir", str(workdir / "data")], env=env, stdout=self.log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert self.proc.poll() is None, (workdir / f"server-{self.port}.log").read_text()
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200

        wait_until(ready, HANG_GUARD_S, "the server to become ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator:
    started: list[ServerProcess] = []

    def start(base: str) -> ServerProcess:
        started.append(ServerProcess(base, tmp_path))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def run_bash(script: str, port: int, cwd: Path) -> str:
    script = script.replace(".venv/bin/", f"{BIN}/").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
                        "TASKDELTA_BASE_URL": f"http://127.0.0.1:{port}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_quickstart_sdk_and_cli_examples(served, tmp_path: Path) -> None:
    srv = served("minilm")
    out = run_bash(readme_block("quickstart"), srv.port, tmp_path)
    assert '"version":1' in out and '"kind":"classify"' in out  # the upload answer
    assert out.count('"label":') == 2  # both classify inputs answered
    assert '"embeddings":' in out and '"name":"demo"' in out

    sdk = readme_block("sdk").replace("127.0.0.1:8000", f"127.0.0.1:{srv.port}")
    done = subprocess.run([sys.executable, "-c", sdk], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("demo 2 ") and lines[0].endswith(" classify")  # a second version
    assert lines[3] == "384"  # minilm's embedding width
    assert lines[-1].startswith("404 ")

    out = run_bash(readme_block("cli"), srv.port, tmp_path)
    assert "demo" in out and "384" in out


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_generate_examples(served, tmp_path: Path) -> None:
    srv = served("smollm2-135m")
    out = run_bash(readme_block("generate"), srv.port, tmp_path)
    assert '"finish_reason":' in out and "data: [DONE]" in out and '"chat.completion"' in out
