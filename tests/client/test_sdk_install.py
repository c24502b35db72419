"""`pip install taskdelta` with no extras, in a fresh virtual environment: the SDK and the client
commands work without torch, and the torch commands say which extra to install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def copy_sources(dest: Path) -> Path:
    """What the build needs (pyproject, readme, the package folders), so the build's egg-info
    and build/ land in the copy, not in the working tree."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dest.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", dest)
    readme = project["project"].get("readme")
    if isinstance(readme, str) and (ROOT / readme).exists():
        shutil.copy2(ROOT / readme, dest)
    for folder in project["tool"]["setuptools"]["package-dir"].values():
        shutil.copytree(ROOT / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bare-install")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                           str(copy_sources(tmp / "src"))],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return venv


def run_in(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, env=env,
                          cwd=venv.parent)  # not the repo root: imports must come from the venv


def test_the_sdk_imports_without_torch(bare_venv: Path):
    code = ("import sys, taskdelta.client as c, taskdelta.client.cli; "
            "assert c.__file__.startswith(sys.prefix), c.__file__; "
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules); "
            "c.Client('http://x:1').close(); print('ok')")
    done = run_in(bare_venv, str(bare_venv / "bin" / "python"), "-c", code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_torch_is_not_installed(bare_venv: Path):
    done = run_in(bare_venv, str(bare_venv / "bin" / "python"), "-c", "import torch")
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr


def test_the_command_runs(bare_venv: Path):
    done = run_in(bare_venv, str(bare_venv / "bin" / "taskdelta"), "--help")
    assert done.returncode == 0, done.stderr
    assert "tasks" in done.stdout and "classify" in done.stdout


def test_a_torch_command_names_the_server_extra(bare_venv: Path):
    done = run_in(bare_venv, str(bare_venv / "bin" / "taskdelta"), "delta", "inspect", "x")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "taskdelta[server]" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
