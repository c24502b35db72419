"""Builds and caches the compiled kernels (the `.cpp` files in `csrc/`): one helper for all.

`build(name, source, flags)` compiles `source` with `torch.utils.cpp_extension.load` (a C++
compiler and `ninja`) into `$TASKDELTA_CACHE_DIR/kernels/<name>-<key>/`, the key a hash of the
source's bytes and path, the flags, the compiler, the torch and Python versions and torch's
folder, so later processes only load it and a shared cache folder never mixes builds. A file lock
keeps two processes from building one folder at once (and, being released when its process dies,
never leaves a stale lock behind, as torch's own lock file can).

Where the build fails, `build` logs a warning and returns None (the callers then use their torch
twins), unless `TASKDELTA_REQUIRE_KERNELS=1`: then it raises `KernelBuildError` with the
compiler's output, so that a kernel that stops compiling fails CI instead of being skipped.
`TASKDELTA_KERNEL_CFLAGS` adds flags to every build (the AddressSanitizer test builds with it).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shlex
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from .paths import cache_dir

log = logging.getLogger("taskdelta.kernels")
REQUIRE_ENV = "TASKDELTA_REQUIRE_KERNELS"
CFLAGS_ENV = "TASKDELTA_KERNEL_CFLAGS"
SOURCES = Path(__file__).resolve().parent / "csrc"

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}  # build folder -> module, for this process


class KernelBuildError(RuntimeError):
    """A kernel did not build while `TASKDELTA_REQUIRE_KERNELS=1`."""


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def source(name: str) -> Path:
    """The path of a kernel's source, `csrc/<name>.cpp` (package data)."""
    return SOURCES / f"{name}.cpp"


def build(name: str, path: Path, flags: Sequence[str] = ()) -> ModuleType | None:
    """The kernel module compiled from `path` with `-O3` and `flags`, built on first use (in this
    process or any other sharing the cache); None, warned, where it cannot be built."""
    extra = shlex.split(os.environ.get(CFLAGS_ENV, ""))
    cflags = ["-O3", *flags, *extra]
    ldflags = [f for f in extra if f.startswith("-fsanitize")]  # a sanitizer needs its runtime
    try:
        folder = cache_dir() / "kernels" / f"{name}-{_key(path, cflags)}"
        with _lock:
            if str(folder) not in _loaded:
                _loaded[str(folder)] = _compile(name, path, folder, cflags, ldflags)
            return _loaded[str(folder)]
    except Exception as exc:  # no compiler, no ninja, no headers, a read-only cache: all the same
        if required():
            raise KernelBuildError(f"cannot build the {name} kernel from {path} ({REQUIRE_ENV} is "
                                   f"set): {type(exc).__name__}: {exc}") from exc
        lines = str(exc).strip().splitlines()
        log.warning("cannot build the %s kernel (%s: %s); using its torch twin instead, which is "
                    "correct but slower", name, type(exc).__name__, lines[-1] if lines else "")
        return None


def _key(path: Path, cflags: Sequence[str]) -> str:
    text = path.read_bytes()
    # where the source and torch are, too: ninja's command line holds the source's path and
    # torch's include folders, so two installs of the same bytes (a checkout and a wheel in another
    # venv) sharing one folder rebuilt what the other had just built (a minute per server start)
    parts = [text, *(f.encode() for f in cflags), os.environ.get("CXX", "c++").encode(),
             torch.__version__.encode(), sys.version.encode(), platform.machine().encode(),
             str(path.resolve()).encode(), os.path.dirname(torch.__file__).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _compile(name: str, path: Path, folder: Path, cflags: list[str],
             ldflags: list[str]) -> ModuleType:
    from torch.utils.cpp_extension import load

    folder.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder / "build.lock"):
        stale = folder / "lock"  # torch's own lock file, left behind by a process that died:
        stale.unlink(missing_ok=True)  # nobody else builds here while we hold ours
        return load(name=f"taskdelta_{name}_{folder.name.rsplit('-', 1)[1]}", sources=[str(path)],
                    extra_cflags=cflags, extra_ldflags=ldflags, build_directory=str(folder),
                    verbose=False)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
