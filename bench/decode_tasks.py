"""Many tasks for bench/decode.py: upload N random generate deltas over HTTP, pick a task per
request (fixed per client, or Zipf(1)), and read the server's delta-cache counters."""

from __future__ import annotations

import random
import re
import time
from itertools import accumulate

import httpx

from taskdelta.deltas import Base, dumps, random_delta


def make_blobs(base: Base, count: int, density: float) -> list[bytes]:
    """`count` distinct random generate deltas (seed i), serialised."""
    started = time.perf_counter()
    blobs = [dumps(random_delta(base, density, seed=i, kind="generate")) for i in range(count)]
    print(f"  made {count} deltas at {density:.2%}: {len(blobs[0]) / 1e6:.1f} MB each, "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    return blobs


def upload_many(url: str, names: list[str], blobs: list[bytes]) -> dict:
    """PUT names[i] with blobs[i % len(blobs)]; seconds and bytes uploaded."""
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=300) as http:
        for i, name in enumerate(names):
            r = http.put(f"/v1/tasks/{name}", content=blobs[i % len(blobs)],
                         headers={"Content-Type": "application/octet-stream"})
            r.raise_for_status()
    seconds = time.perf_counter() - started
    total = sum(len(blobs[i % len(blobs)]) for i in range(len(names)))
    print(f"  uploaded {len(names)} tasks ({min(len(names), len(blobs))} distinct deltas), "
          f"{total / 1e9:.2f} GB in {seconds:.1f} s", flush=True)
    return {"tasks": len(names), "distinct_deltas": min(len(names), len(blobs)),
            "upload_bytes": total, "upload_s": round(seconds, 1)}


def zipf_picker(names: list[str], clients: int, seed: int = 0):
    """client -> a task drawn Zipf(1) over `names` (rank 1 = names[0]); one seeded stream per
    client, so a run draws the same sequence whatever the arrival order."""
    cum = list(accumulate(1.0 / k for k in range(1, len(names) + 1)))
    rngs = [random.Random(seed * 1_000_003 + n) for n in range(clients)]
    return lambda n: rngs[n].choices(names, cum_weights=cum)[0]


def cache_counts(url: str) -> dict[str, float]:
    """The server's delta-cache hits, misses and bytes from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for key in ("cache_hits", "cache_misses", "cache_bytes", "cache_entries"):
        m = re.search(rf"^taskdelta_{key}(?:_total)?(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
        out[key] = float(m.group(1)) if m else float("nan")
    return out


def hit_rate(before: dict[str, float], after: dict[str, float]) -> dict:
    hits = after["cache_hits"] - before["cache_hits"]
    misses = after["cache_misses"] - before["cache_misses"]
    return {"hits": hits, "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "cache_bytes": after["cache_bytes"], "cache_entries": after["cache_entries"]}
