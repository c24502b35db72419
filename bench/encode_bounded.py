"""One huge embed request against the real server: bounded forwards, peak memory, others answered.

Issue 12's check: a request of 256 texts of 512 tokens is served in forwards bounded by
`max_batch` texts and `max_batch_tokens` texts x padded tokens, its peak memory is reported, and
other tenants' small requests keep being answered while it runs. Side by side in one run:

- served: the real server (`python -m taskdelta.server`, minilm, auth with two tenants, 1 torch
  thread). Tenant `big` sends the 256 x 512 request; tenant `small` sends one-text embed requests
  in a loop before, during and after it. Reported: the big request's time, the forwards it took
  (micro-batches counted by /metrics), the server's resident memory before it and at its peak
  (VmHWM), and the small requests answered while it ran with their latency.
- reference: the same 256 texts as one padded `embed()` forward in a fresh process (what a server
  without a token budget would run): its time and peak memory, and the served embeddings compared
  with its output.

    python bench/encode_bounded.py                    # ~5-10 min on 2 busy cores
    python bench/encode_bounded.py --texts 32 --out /tmp/eb.json   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported by path
from loadgen import ServerProcess, free_port, machine, parse_prometheus, proc_memory  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"big": "key-big-0123456789", "small": "key-small-0123456789"}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
         "bright", "stars", "shine", "above", "quiet", "hills", "and", "rivers"]


def long_texts(tokenizer, n: int, tokens: int) -> list[str]:
    """n distinct texts, each exactly `tokens` tokens long once the tokenizer adds its specials."""
    out = []
    for i in range(n):
        words = [WORDS[(i + j) % len(WORDS)] for j in range(tokens * 2)]
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][: tokens - 2]
        out.append(tokenizer.decode(ids))
    return out


def reference(args) -> dict:
    """The texts as one padded forward, in this (fresh) process: time, peak memory, embeddings."""
    import torch

    from taskdelta.deltas import load_base
    from taskdelta.server.inference import embed
    from taskdelta.server.jobs import EmbedJob

    torch.set_num_threads(args.threads)
    base = load_base(args.base, device="cpu")
    texts = long_texts(base.tokenizer, args.texts, args.tokens)
    embed(base.backbone, base.tokenizer, [EmbedJob(texts=tuple(texts[:2]))])  # one-off setup
    before = proc_memory()["rss_peak"]
    started = time.perf_counter()
    (rows,) = embed(base.backbone, base.tokenizer, [EmbedJob(texts=tuple(texts))])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rss_before": before,
            "rss_peak": proc_memory()["rss_peak"], "rows": rows}


def run_reference(args) -> dict:
    argv = [sys.executable, __file__, "--reference", "--base", args.base, "--texts", str(args.texts),
            "--tokens", str(args.tokens), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


async def small_loop(url: str, stop: asyncio.Event, log: list[tuple[float, float, int]]) -> None:
    """Tenant `small`: one short embed request after another; (start, end, status) each."""
    headers = {"Authorization": f"Bearer {KEYS['small']}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = await c.post("/v1/tasks/base/embed", json={"texts": ["a short question"]})
            log.append((t0, time.perf_counter(), r.status_code))


async def served(url: str, texts: list[str], srv: ServerProcess) -> dict:
    stop, small = asyncio.Event(), []
    loop_task = asyncio.create_task(small_loop(url, stop, small))
    await asyncio.sleep(3.0)  # the small tenant is being served before the big request
    m0 = time.perf_counter()
    metrics = parse_prometheus(httpx.get(url + "/metrics").text)
    mem_before = srv.memory()
    headers = {"Authorization": f"Bearer {KEYS['big']}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=900) as c:
        t0 = time.perf_counter()
        r = await c.post("/v1/tasks/base/embed", json={"texts": texts})
        t1 = time.perf_counter()
    r.raise_for_status()
    mem_after = srv.memory()
    after = parse_prometheus(httpx.get(url + "/metrics").text)
    m1 = time.perf_counter()
    await asyncio.sleep(2.0)
    stop.set()
    await loop_task
    during = [(s, e, code) for s, e, code in small if s >= t0 and e <= t1]
    lat = sorted(e - s for s, e, _ in during)
    # micro-batches between the two /metrics reads, less the small tenant's (one text each: one
    # micro-batch per request; its base and the big tenant's never share one)
    batches = after.get("taskdelta_batch_size_count", 0) - metrics.get("taskdelta_batch_size_count", 0)
    batches -= sum(1 for s, e, _ in small if s > m0 and e < m1)
    return {"seconds": t1 - t0, "rows": r.json()["embeddings"], "rss_before": mem_before["rss"],
            "rss_peak_before": mem_before["rss_peak"], "rss_peak": mem_after["rss_peak"],
            "micro_batches": batches, "small_during": len(during),
            "small_ok": sum(code == 200 for _, _, code in during),
            "small_p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
            "small_max_ms": 1000 * lat[-1] if lat else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="minilm")
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=16, help="the server's TASKDELTA_MAX_BATCH")
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.reference:
        print(json.dumps(reference(args)))
        return

    from taskdelta.deltas import load_base

    tokenizer = load_base(args.base, device="cpu").tokenizer
    texts = long_texts(tokenizer, args.texts, args.tokens)
    print(f"encode_bounded: {args.base}, {args.texts} texts x {args.tokens} tokens, "
          f"{args.threads} thread(s), max_batch {args.max_batch}, max_batch_tokens "
          f"{args.max_batch_tokens}, load {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        port = free_port()
        argv_ = [sys.executable, "-m", "taskdelta.server", "--base", args.base, "--port", str(port),
                 "--log-level", "warning", "--data-dir", str(Path(work) / "data")]
        env = {"TASKDELTA_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
               "TASKDELTA_TORCH_THREADS": str(args.threads), "TASKDELTA_MAX_BATCH": str(args.max_batch),
               "TASKDELTA_MAX_BATCH_TOKENS": str(args.max_batch_tokens),
               "TASKDELTA_REQUEST_TIMEOUT_S": "900"}
        with ServerProcess(argv_, port, args.threads, env=env, log=Path(work) / "server.log") as srv:
            got = asyncio.run(served(srv.url, texts, srv))
    print(f"  served: {got['seconds']:.1f} s in {got['micro_batches']:.0f} micro-batches; server RSS "
          f"{got['rss_before'] / 2**20:.0f} MiB before, peak {got['rss_peak'] / 2**20:.0f} MiB; "
          f"small tenant answered {got['small_ok']}/{got['small_during']} meanwhile", flush=True)
    ref = run_reference(args)
    print(f"  reference (one forward): {ref['seconds']:.1f} s; RSS {ref['rss_before'] / 2**20:.0f} "
          f"MiB before, peak {ref['rss_peak'] / 2**20:.0f} MiB", flush=True)
    diff = max(abs(a - b) for ra, rb in zip(got["rows"], ref["rows"], strict=True)
               for a, b in zip(ra, rb, strict=True))
    result = {
        "base": args.base, "texts": args.texts, "tokens": args.tokens, "threads": args.threads,
        "max_batch": args.max_batch, "max_batch_tokens": args.max_batch_tokens,
        "served": {k: v for k, v in got.items() if k != "rows"},
        "reference": {k: v for k, v in ref.items() if k != "rows"},
        "max_abs_diff": diff, "machine": machine(args.threads),
    }
    served_growth = got["rss_peak"] - max(got["rss_before"], 0)
    ref_growth = ref["rss_peak"] - ref["rss_before"]
    lines = [
        "| | time, s | forwards | peak memory growth, MiB | other tenant answered meanwhile |",
        "| --- | --- | --- | --- | --- |",
        f"| served (budgeted) | {got['seconds']:.1f} | {got['micro_batches']:.0f} | "
        f"<= {served_growth / 2**20:.0f} | {got['small_ok']}/{got['small_during']} (p50 "
        f"{got['small_p50_ms'] or 0:.0f} ms, max {got['small_max_ms'] or 0:.0f} ms) |",
        f"| one forward, in process | {ref['seconds']:.1f} | 1 | {ref_growth / 2**20:.0f} | - |",
    ]
    print("\n" + "\n".join(lines))
    print(f"\nserved vs one forward: max |diff| of the embeddings {diff:.2e}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
