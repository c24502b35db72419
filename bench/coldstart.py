"""A cold task's first answer (its delta only in Redis) against a warm one, end to end over HTTP,
and the cold path's steps timed one by one in-process, as the server's engine runs them."""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import time

import httpx
from loadgen import Send

from taskdelta.deltas import Swapper, loads, prepare, validate
from taskdelta.server.inference import classify
from taskdelta.server.jobs import ClassifyJob


async def cold_start(url: str, anchor: str, cold_sets: dict[str, list[str]], send: Send) -> dict:
    """On a server that has answered nothing yet, per sample and per set (an upload encoding): a
    never-requested task (its delta only in Redis), the same request again (warm: cached and
    swapped in), then the cached `anchor` task (warm, but a swap is needed). One request at a
    time, 50 ms apart, the sets interleaved so that neither gets the quieter moments."""
    series: dict[str, dict[str, list[float]]] = {
        k: {"cold": [], "warm": [], "warm_swap": []} for k in cold_sets}

    async def timed(http: httpx.AsyncClient, task: str) -> float:
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        r = await send(http, task)
        r.raise_for_status()
        return (time.perf_counter() - t0) * 1e3

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for _ in range(3):
            await timed(http, anchor)
        for i in range(max(len(v) for v in cold_sets.values())):
            for key, names in cold_sets.items():
                s = series[key]
                s["cold"].append(await timed(http, names[i]))
                s["warm"].append(await timed(http, names[i]))
                s["warm_swap"].append(await timed(http, anchor))
    out = {}
    for key, s in series.items():
        med = {f"{k}_ms": statistics.median(v) for k, v in s.items()}
        out[key] = {**med, "samples": len(s["cold"]), "ratio": med["cold_ms"] / med["warm_ms"],
                    "ratio_vs_warm_swap": med["cold_ms"] / med["warm_swap_ms"],
                    **{f"{k}_all_ms": v for k, v in s.items()},
                    "loadavg_1min": round(os.getloadavg()[0], 2)}
        print(f"  cold start ({key}): cold {med['cold_ms']:.1f} ms, warm {med['warm_ms']:.1f} ms "
              f"(x{out[key]['ratio']:.2f}), warm with a swap {med['warm_swap_ms']:.1f} ms",
              flush=True)
    return out


def cold_breakdown(base, blob: bytes, text: str, repeats: int = 7) -> dict[str, float]:
    """The cold path's steps, timed in this process (median ms), as the server runs them on a
    blob its upload validated (no checksum, form checks only: docs/delta-format.md, *Trust on
    load*), then what the full checks it skips would cost (as at upload, or for a blob stored
    without the stamp)."""
    steps: dict[str, list[float]] = {}

    def timed(step: str, fn):
        t0 = time.perf_counter()
        value = fn()
        steps.setdefault(step, []).append((time.perf_counter() - t0) * 1e3)
        return value

    swapper = Swapper(base)
    job = ClassifyJob(texts=(text,))
    for _ in range(repeats):
        timed("sha256 (store check)", lambda: hashlib.sha256(blob).hexdigest())
        delta = timed("loads (parse, no checksum)", lambda: loads(blob, verify_checksum=False))
        timed("validate (form only)", lambda d=delta: validate(d, base, contents=False))
        prepared = timed("prepare (incl. head)", lambda d=delta: prepare(d, base, name="x"))
        timed("swap apply", lambda p=prepared: swapper.apply(p))
        timed("forward (1 text)", lambda p=prepared: classify(p.head, base.tokenizer, p.labels, [job]))
        timed("swap restore", swapper.restore)
        full = timed("skipped: loads with checksum", lambda: loads(blob))
        timed("skipped: full validate", lambda d=full: validate(d, base))
    return {k: statistics.median(v) for k, v in steps.items()}
