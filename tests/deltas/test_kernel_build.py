"""The kernels' one build helper (deltas/_build.py): sources shipped as package data, built once
per cache folder and reused, and a failed build that is an error where kernels are required
(TASKDELTA_REQUIRE_KERNELS=1, as in `make test` and CI) instead of a warning and the torch twin."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from taskdelta.deltas import Swapper, _build, _kernel, _mixed_kernel
from taskdelta.deltas.errors import SwapError
from taskdelta.deltas.paths import cache_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    """A fresh cache folder and a compiler that does not exist: every build fails."""
    monkeypatch.setenv("TASKDELTA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    _kernel.reset()
    _mixed_kernel.reset()
    yield
    _kernel.reset()  # the next user loads the real kernels again (cache dir restored)
    _mixed_kernel.reset()


def test_a_failed_build_raises_with_the_compilers_error_where_kernels_are_required(no_compiler,
                                                                                  monkeypatch):
    monkeypatch.setenv(_build.REQUIRE_ENV, "1")
    for module in (_kernel, _mixed_kernel):
        with pytest.raises(_build.KernelBuildError, match="no-such-compiler"):
            module.load()


def test_a_failed_build_falls_back_to_the_torch_twin_where_kernels_are_not_required(
        no_compiler, monkeypatch, tiny_bert):
    monkeypatch.delenv(_build.REQUIRE_ENV, raising=False)
    assert _kernel.load() is None and _mixed_kernel.load() is None
    assert _kernel.pick(want_kernel=True) is _kernel.TWIN
    assert _mixed_kernel.pick(want_kernel=True) is _mixed_kernel.TWIN
    assert Swapper(tiny_bert).backend == "torch"
    with pytest.raises(SwapError, match="not available"):
        Swapper(tiny_bert, backend="kernel")


def test_a_built_kernel_is_reused_from_its_cache_folder(tmp_path):
    """Two processes sharing the cache load one build; the key changes with the source, the
    flags and the compiler, so no folder ever mixes builds."""
    code = ("from taskdelta.deltas import _build; "
            "print(_build.build('swap', _build.source('swap')).__file__)")
    env = os.environ | {_build.REQUIRE_ENV: "1"}
    first, second = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    timeout=600, env=env, check=True).stdout.strip()
                     for _ in range(2))
    assert first == second
    assert Path(first).parent.parent == cache_dir() / "kernels"
    assert Path(first).parent.name.startswith("swap-")

    # the key tells builds apart by the source's bytes, its path (a checkout and an installed wheel
    # of the same bytes compile with different command lines: one folder for both made each rebuild
    # what the other had built) and the flags
    a, b = tmp_path / "a" / "k.cpp", tmp_path / "b" / "k.cpp"
    for p, text in ((a, b"source"), (b, b"source")):
        p.parent.mkdir()
        p.write_bytes(text)
    keys = {_build._key(a, ["-O3"]), _build._key(a, ["-O3", "-DX=1"]), _build._key(b, ["-O3"])}
    a.write_bytes(b"other source")
    keys.add(_build._key(a, ["-O3"]))
    assert len(keys) == 4


def test_the_kernel_sources_are_package_data():
    for name in ("swap", "mixed"):
        assert _build.source(name).is_file()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "csrc/*.cpp" in project["tool"]["setuptools"]["package-data"]["taskdelta.deltas"]


@pytest.mark.slow
def test_a_wheel_carries_the_kernel_sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src)
    for folder in project["tool"]["setuptools"]["package-dir"].values():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=600,
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("taskdelta-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"taskdelta/deltas/csrc/swap.cpp", "taskdelta/deltas/csrc/mixed.cpp"} <= set(names)
