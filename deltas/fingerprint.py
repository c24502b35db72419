"""The base fingerprint: a hash over tensor names, shapes, dtypes and bytes of a model folder.

It identifies the weights a delta was made against, independent of the dtype the server loads them
in. Hashing a few hundred MB takes a second, so the result is cached beside the folder (or, where the
folder is read-only, under the cache dir), keyed by the files' sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path

from .paths import cache_dir

CACHE_NAME = ".taskdelta-fingerprint.json"


def fingerprint(folder: str | Path) -> str:
    folder = Path(folder).resolve()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    stamp = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    for cache in _cache_files(folder):
        try:
            cached = json.loads(cache.read_text())
            if cached.get("files") == stamp:
                return str(cached["fingerprint"])
        except (OSError, ValueError, KeyError):
            continue
    value = _hash_files(files)
    _store(folder, {"files": stamp, "fingerprint": value})
    return value


def _hash_files(files: list[Path]) -> str:
    """Files in name order, tensors in name order within each file."""
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            (n,) = struct.unpack("<Q", mm[:8])
            header = json.loads(mm[8 : 8 + n])
            header.pop("__metadata__", None)
            data = memoryview(mm)[8 + n :]
            try:
                for name in sorted(header):
                    e = header[name]
                    b, en = e["data_offsets"]
                    h.update(f"{name}\0{e['dtype']}\0{tuple(e['shape'])}\0".encode())
                    h.update(data[b:en])
            finally:
                data.release()
    return "sha256:" + h.hexdigest()


def _cache_files(folder: Path) -> list[Path]:
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    return [folder / CACHE_NAME, cache_dir() / "fingerprints" / f"{key}.json"]


def _store(folder: Path, record: dict) -> None:
    for target in _cache_files(folder):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(target)
            return
        except OSError:
            continue  # read-only folder: fall back to the cache dir
