"""Many tasks, one base: the real server (real Redis, real HTTP on loopback) under a closed loop of
C clients over T tasks with Zipf(1.0) popularity, side by side with the same server answering the
same requests for a single task, and with the naive route (a merged model copy per task, loaded
from disk on a switch, an LRU of 4 resident). Also a cold task's first answer against a warm one.

Scenarios (--scenarios, comma-separated):
  classify  minilm, random classify deltas at --density, at each of --clients: T = 1 (the
            reference: the same requests, one task, no swaps), each of --tasks, and the base's
            embed route on the same text (a second reference)
  mixed     each of --tasks again on a second server with mixed batches on
            (TASKDELTA_MIXED_BATCHES=1: several tasks per forward, each delta a sparse
            correction); its levels take turns with the exact server's, against the same reference
  naive     the merged-copy baseline (bench/naive_server.py, --naive-variants) at --naive-tasks
  cold      Redis -> first answer for never-requested tasks vs the same request again
  generate  smollm2-135m, short greedy generations; `base` (no delta) and each of --gen-tasks

Every server runs as its own process with --threads torch threads, against a private redis-server
(in memory, one per scenario) on a free loopback port; the clients run in this process. Deltas are
generated (one seed per task: distinct masks and values) and uploaded through the HTTP API. One
server per scenario and C runs the levels in increasing T, --rounds times over, so that the
machine's drifting load skews them alike; before a level's first window every task is asked once,
the rarest first, so the cache holds what a long-running server's would.

    python bench/serve.py                                # the figures of docs/performance.md
    python bench/serve.py --quick                        # a smoke run, a few minutes
    python bench/serve.py --scenarios classify --tasks 10,100 --clients 8 --duration 10
    python bench/serve.py --scenarios classify,mixed --tasks 1000 --clients 16 --duration 8
    python bench/serve.py --replot bench/out/serve.json  # tables and plots again, no run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from coldstart import cold_breakdown, cold_start  # noqa: E402
from loadgen import (  # noqa: E402
    RedisServer,
    ServerProcess,
    closed_loop,
    free_port,
    machine,
    parse_prometheus,
    touch,
    zipf_top_mass,
)
from naive_server import build_merged  # noqa: E402
from serve_report import report  # noqa: E402

from taskdelta.deltas import (  # noqa: E402
    dumps,
    load_base,
    prepare,
    random_delta,
    resolve_base,
)
from taskdelta.server.auth import DEFAULT_TENANT  # noqa: E402
from taskdelta.server.keys import Keys  # noqa: E402

TEXT = "a wonderful, moving film about two old friends who travel across the country together"
# a raw prompt the instruct model continues (asked a question without its chat template, it stops
# at once); greedy, so every request generates the same number of tokens, checked by tokens/s
PROMPT = "Once upon a time, in a small village by the sea, there lived"
ROOT = Path(__file__).resolve().parents[1]


def classify_send(text: str = TEXT):
    body = {"texts": [text]}
    return lambda http, task: http.post(f"/v1/tasks/{task}/classify", json=body)


def embed_send(http: httpx.AsyncClient, task: str):
    return http.post(f"/v1/tasks/{task}/embed", json={"texts": [TEXT]})


def generate_send(tokens: int):
    body = {"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0.0}
    return lambda http, task: http.post(f"/v1/tasks/{task}/generate", json=body)


def completion_tokens(r: httpx.Response) -> float:
    return float(r.json()["usage"]["completion_tokens"])


# --- the servers -------------------------------------------------------------------------------


def taskdelta_server(args, base: str, redis: RedisServer, work: Path,
                     mixed: bool = False) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "taskdelta.server", "--base", base, "--redis-url", redis.url,
            "--port", str(port), "--no-auth", "--log-level", "warning", "--data-dir",
            str(work / "data")]
    if args.cache_bytes is not None:
        argv += ["--cache-bytes", str(args.cache_bytes)]
    if args.device:
        argv += ["--device", args.device]
    return ServerProcess(argv, port, args.threads,
                         log=work / ("server-mixed.log" if mixed else "server.log"),
                         env={"TASKDELTA_MAX_TASKS_PER_TENANT": "1000000",
                              "TASKDELTA_MAX_BYTES_PER_TENANT": str(2**50),
                              "TASKDELTA_MIXED_BATCHES": "1" if mixed else "0"})


def naive_server(args, folders: Path, work: Path, variant: str) -> ServerProcess:
    """variant: MODE:STORAGE, MODE batched | fifo, STORAGE cache (page cache) | disk (evicted)."""
    mode, _, storage = variant.partition(":")
    port = free_port()
    argv = [sys.executable, str(ROOT / "bench" / "naive_server.py"), "--folders", str(folders),
            "--tokenizer", str(resolve_base("minilm")), "--lru", str(args.naive_lru),
            "--port", str(port), "--mode", mode] + (["--evict"] if storage == "disk" else [])
    return ServerProcess(argv, port, args.threads, log=work / "naive.log")


async def metrics_probe(http: httpx.AsyncClient) -> dict[str, float]:
    return parse_prometheus((await http.get("/metrics")).text)


async def stats_probe(http: httpx.AsyncClient) -> dict[str, float]:
    return (await http.get("/stats")).json()


# --- uploading ---------------------------------------------------------------------------------


async def upload_all(url: str, base, names: list[str], density: float, kind: str, seed: int,
                     keep: set[str], encoding: str = "plain") -> dict:
    """Generate one distinct random delta per task (seed + i) and PUT it; keep some blobs."""
    started = time.perf_counter()
    sizes, kept, nnz = [], {}, 0
    sem = asyncio.Semaphore(2)

    async def put(http: httpx.AsyncClient, name: str, blob: bytes) -> None:
        async with sem:
            r = await http.put(f"/v1/tasks/{name}", content=blob,
                               headers={"Content-Type": "application/octet-stream"})
            r.raise_for_status()

    def make(i: int) -> tuple[bytes, int]:
        delta = random_delta(base, density, seed=seed + i, kind=kind)
        return (dumps(delta) if encoding == "plain" else dumps(delta, encoding)), delta.nnz

    pending = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        for i, name in enumerate(names):
            blob, nnz = await asyncio.to_thread(make, i)
            sizes.append(len(blob))
            if name in keep:
                kept[name] = blob
            pending.append(asyncio.ensure_future(put(http, name, blob)))
            if len(pending) > 8:
                await pending.pop(0)
        await asyncio.gather(*pending)
    seconds = time.perf_counter() - started
    print(f"  uploaded {len(names)} {kind} deltas ({encoding}, {statistics.mean(sizes) / 1e6:.2f} MB, "
          f"{nnz:,} nonzeros each) in {seconds:.0f} s", flush=True)
    return {"tasks": len(names), "encoding": encoding, "seconds": seconds,
            "blob_bytes": statistics.mean(sizes),
            "nnz": nnz, "kept": kept}


FULL = " (checked in full)"  # a cold set whose records lack `validated_for`


def forget_validation(redis: RedisServer, names: list[str]) -> None:
    """Drop the upload's `validated_for` from the tasks' records, as a server before it stored
    them: their loads then check in full (docs/delta-format.md, *Trust on load*), side by side
    with the loads that trust the record."""
    import redis as redis_py  # noqa: PLC0415

    keys = Keys()
    with redis_py.Redis.from_url(redis.url) as r:
        for name in names:
            assert r.hdel(keys.meta(DEFAULT_TENANT, name), "validated_for") == 1, name


# --- measured levels ---------------------------------------------------------------------------


@dataclass
class Level:
    """One configuration to measure: a label, the tasks (in popularity order) and how to ask."""

    label: str
    tasks: list[str]
    send: Callable
    extra: dict
    probe: Callable = metrics_probe
    measure: Callable | None = None
    prewarm: bool = True
    touch_send: Callable | None = None  # a cheaper request to fill the cache with (else `send`)
    server: ServerProcess | None = None  # where it runs, if not on the sweep's server
    parts: list[dict] = field(default_factory=list)


def sweep(args, default: ServerProcess, levels: list[Level], clients: int) -> list[dict]:
    """Each level in turn, --rounds times over (so that a machine whose load drifts skews every
    level alike); a level's rounds are merged into one row."""
    for n in range(args.rounds):
        for level in levels:
            srv = level.server or default
            started = time.perf_counter()
            if level.prewarm and n == 0:  # one request per task, the rarest first, so that the
                asyncio.run(touch(srv.url, list(reversed(level.tasks)),
                                  level.touch_send or level.send, clients))
            prewarm_s = time.perf_counter() - started  # cache holds what a long-running one would
            warmup = args.warmup if n == 0 else min(args.warmup, 1.0)  # queues refill within 1 s
            res = asyncio.run(closed_loop(srv.url, level.tasks, level.send, clients, warmup,
                                          args.duration / args.rounds, seed=args.seed * 1000 + n,
                                          measure=level.measure, probe=level.probe))
            before, after = res.probes
            level.parts.append({
                "seconds": res.seconds, "completed": res.completed, "errors": dict(res.errors),
                "latencies": res.latencies, "extra": res.extra, "prewarm_s": prewarm_s,
                "served": set(res.per_task), "after": after, "memory": srv.memory(),
                "delta": {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, float | int)},
                "loadavg_1min": os.getloadavg()[0]})
            print(f"  round {n + 1}/{args.rounds} {level.label:<34} {res.throughput:8.1f} req/s  "
                  f"p50 {res.percentile(0.5) * 1e3:7.1f} ms  p99 {res.percentile(0.99) * 1e3:7.1f} ms  "
                  f"errors {sum(res.errors.values())}  load {os.getloadavg()[0]:.2f}", flush=True)
    return [merge(level, clients, level.server or default) for level in levels]


def merge(level: Level, clients: int, srv: ServerProcess) -> dict:
    parts = level.parts
    seconds = sum(p["seconds"] for p in parts)
    completed = sum(p["completed"] for p in parts)
    lat = sorted(x for p in parts for x in p["latencies"])
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3) if lat else (lambda q: float("nan"))
    errors: dict = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[str(k)] = errors.get(str(k), 0) + v
    delta: dict[str, float] = {}
    for p in parts:
        for k, v in p["delta"].items():
            delta[k] = delta.get(k, 0) + v
    row = {"label": level.label, "tasks": len(level.tasks), "clients": clients, "seconds": seconds,
           "completed": completed, "throughput": completed / seconds,
           "round_throughputs": [p["completed"] / p["seconds"] for p in parts],
           "p50_ms": pct(0.50), "p99_ms": pct(0.99), "errors": errors,
           "distinct_tasks_served": len(set().union(*(p["served"] for p in parts))),
           "prewarm_s": sum(p["prewarm_s"] for p in parts), "server_ready_s": srv.ready_s,
           # memory as the level's first window ended: levels run in increasing T on one server,
           # so that is the cache of at most T tasks (a later sweep inherits a fuller one)
           **parts[0]["memory"], "rss_peak": max(p["memory"].get("rss_peak", 0) for p in parts),
           "loadavg_1min": [round(p["loadavg_1min"], 2) for p in parts],
           "latencies_ms": [round(x * 1e3, 2) for x in lat]}
    if level.measure is not None:
        row["tokens_per_s"] = sum(p["extra"] for p in parts) / seconds
    row.update(derive(delta, parts[0]["after"], completed, seconds))
    row.update(level.extra)
    return row


def derive(d: dict, after: dict, completed: int, s: float) -> dict:
    """Figures over the windows from the counters' increments: taskdelta's /metrics or the
    baseline's /stats."""
    if "taskdelta_swaps_total" in after:
        hits, misses = d.get("taskdelta_cache_hits_total", 0), d.get("taskdelta_cache_misses_total", 0)
        count = d.get("taskdelta_swap_seconds_count", 0)
        batches = d.get("taskdelta_batch_size_count", 0)
        return {"swaps_per_s": d["taskdelta_swaps_total"] / s,
                "swap_ms_mean": d.get("taskdelta_swap_seconds_sum", 0) / count * 1e3 if count else 0.0,
                "mean_batch": d.get("taskdelta_batch_size_sum", 0) / batches if batches else 0.0,
                "cache_hit_rate": hits / (hits + misses) if hits + misses else 1.0,
                "misses_per_1k": misses / max(1, completed) * 1e3,
                "cache_bytes": after.get("taskdelta_cache_bytes", 0.0),
                "cache_entries": after.get("taskdelta_cache_entries", 0.0),
                "mixed_share": d.get("taskdelta_mixed_batches_total", 0) / batches if batches else 0.0,
                "tasks_per_mixed": (d.get("taskdelta_mixed_batch_tasks_sum", 0)
                                    / d["taskdelta_mixed_batch_tasks_count"]
                                    if d.get("taskdelta_mixed_batch_tasks_count") else 0.0)}
    loads_, hits = d.get("loads", 0), d.get("hits", 0)
    return {"swaps_per_s": d.get("swaps", 0) / s, "loads_per_s": loads_ / s,
            "load_ms_mean": d.get("load_seconds", 0) / loads_ * 1e3 if loads_ else 0.0,
            "mean_batch": completed / d["batches"] if d.get("batches") else 0.0,
            "cache_hit_rate": hits / (hits + loads_) if hits + loads_ else 1.0,
            "misses_per_1k": loads_ / max(1, completed) * 1e3,
            "state_bytes": after.get("state_bytes", 0)}


# --- scenarios ---------------------------------------------------------------------------------


def run_classify(args, redis: RedisServer, work: Path, out: dict) -> None:
    scenarios = args.scenarios
    base = load_base("minilm", device="cpu")
    base_bytes = sum(p.numel() * p.element_size() for p in base.params.values())
    naive_tasks = args.naive_tasks if "naive" in scenarios else []
    # a cold-only run needs one warm task (the anchor), not the classify levels' thousand
    count = max(args.tasks + naive_tasks) if scenarios & {"classify", "mixed", "naive"} else 1
    names = [f"c{i:04d}" for i in range(count)]
    keep = set(names[:max(naive_tasks)]) if naive_tasks else set()
    print(f"classify on minilm: {len(names)} tasks at density {args.density}", flush=True)
    if args.cache_bytes is None and scenarios & {"classify", "mixed"}:
        size_cache(args, base, max(args.tasks), out)
    send = classify_send()
    with taskdelta_server(args, "minilm", redis, work) as srv:
        up = asyncio.run(upload_all(srv.url, base, names, args.density, "classify", args.seed * 10**6,
                                    keep))
        if "cold" in scenarios:  # a fresh server: nothing requested yet, the cache is empty
            cold_sets, blobs = {}, {}
            for n, encoding in enumerate(args.cold_encodings):
                cold_sets[encoding] = [f"cold-{encoding}-{i:02d}" for i in range(args.cold_samples)]
                kept = asyncio.run(upload_all(srv.url, base, cold_sets[encoding], args.density,
                                              "classify", args.seed * 10**6 + 900_000 + 1000 * n,
                                              set(cold_sets[encoding][:1]), encoding))["kept"]
                blobs[encoding] = kept[cold_sets[encoding][0]]
                if args.cold_full_check:  # the same, stored as an older server stored them
                    full = cold_sets[f"{encoding}{FULL}"] = [f"cold-{encoding}-full-{i:02d}"
                                                            for i in range(args.cold_samples)]
                    asyncio.run(upload_all(srv.url, base, full, args.density, "classify",
                                           args.seed * 10**6 + 950_000 + 1000 * n, set(), encoding))
                    forget_validation(redis, full)
            out["cold"] = asyncio.run(cold_start(srv.url, names[0], cold_sets, send))
            for encoding, blob in blobs.items():
                out["cold"][encoding]["blob_bytes"] = len(blob)
                out["cold"][encoding]["breakdown_ms"] = cold_breakdown(base, blob, TEXT)
                if f"{encoding}{FULL}" in out["cold"]:
                    out["cold"][encoding]["full_check"] = out["cold"].pop(f"{encoding}{FULL}")
    out["classify_upload"] = {k: v for k, v in up.items() if k != "kept"}
    out["redis_used_memory"] = redis.used_memory()
    rows = out.setdefault("classify", [])
    if scenarios & {"classify", "mixed"}:
        common = {"base_state_bytes": base_bytes, "kind": "taskdelta"}
        with (taskdelta_server(args, "minilm", redis, work) as srv,
              taskdelta_server(args, "minilm", redis, work, mixed=True) if "mixed" in scenarios
              else contextlib.nullcontext() as mixed_srv):
            for clients in args.clients:
                levels = [Level("1 task (reference: no swaps)", names[:1], send,
                                {**common, "reference": True})]
                if "classify" in scenarios:
                    levels += [Level(f"{t} tasks", names[:t], send, common) for t in args.tasks]
                if mixed_srv is not None:
                    levels += [Level(f"{t} tasks, mixed batches", names[:t], send,
                                     {**common, "kind": "mixed"}, server=mixed_srv)
                               for t in args.tasks]
                if args.embed_reference and "classify" in scenarios:
                    levels.append(Level("base embed (same text)", ["base"], embed_send,
                                        {**common, "kind": "embed"}))
                rows += sweep(args, srv, levels, clients)
    if "naive" in scenarios:
        folders = work / "merged"
        build_merged(base, up["kept"], names[:max(args.naive_tasks)], folders)
        # its answers take seconds: fewer, longer windows
        naive_args = argparse.Namespace(**{**vars(args), "rounds": args.naive_rounds,
                                           "duration": args.naive_duration})
        for variant in args.naive_variants:
            with naive_server(args, folders, work, variant) as srv:
                for clients in args.naive_clients:
                    mode, _, storage = variant.partition(":")
                    levels = [Level(f"naive {mode}, {storage or 'cache'}, {t} tasks", names[:t], send,
                                    {"kind": "naive", "mode": variant, "lru": args.naive_lru},
                                    probe=stats_probe, prewarm=False) for t in args.naive_tasks]
                    rows += sweep(naive_args, srv, levels, clients)
    del base


def size_cache(args, base, tasks: int, out: dict) -> None:
    """A delta cache that holds every task of the largest T (1.25 x their prepared bytes, room
    for the mixed form's few dense vectors): both modes measure serving, not cache misses."""
    sample = prepare(random_delta(base, args.density, seed=args.seed * 10**6, kind="classify"), base)
    args.cache_bytes = int(tasks * sample.nbytes * 1.25)
    out["args"]["cache_bytes"] = out["classify_cache_bytes"] = args.cache_bytes
    print(f"  delta cache: {args.cache_bytes / 2**30:.2f} GiB ({tasks} tasks x "
          f"{sample.nbytes / 1e6:.2f} MB prepared x 1.25)", flush=True)


def run_generate(args, redis: RedisServer, work: Path, out: dict) -> None:
    base = load_base("smollm2-135m", device="cpu")
    base_bytes = sum(p.numel() * p.element_size() for p in base.params.values())
    names = [f"g{i:03d}" for i in range(max(args.gen_tasks))]
    print(f"generate on smollm2-135m: {len(names)} tasks at density {args.density}, "
          f"{args.gen_tokens} new tokens", flush=True)
    with taskdelta_server(args, "smollm2-135m", redis, work) as srv:
        up = asyncio.run(upload_all(srv.url, base, names, args.density, "generate",
                                    args.seed * 10**6 + 500_000, set()))
    del base
    out["generate_upload"] = {k: v for k, v in up.items() if k != "kept"}
    rows = out.setdefault("generate", [])
    send = generate_send(args.gen_tokens)
    common = {"base_state_bytes": base_bytes, "kind": "taskdelta"}
    one_token = generate_send(1)  # fills the cache as well as a long generation, in less time
    levels = [Level("base only (reference: no delta)", ["base"], send, {**common, "reference": True},
                    measure=completion_tokens, touch_send=one_token)]
    levels += [Level(f"{t} tasks", names[:t], send, common, measure=completion_tokens,
                     touch_send=one_token) for t in args.gen_tasks]
    # a request takes seconds here: fewer, longer windows
    gen_args = argparse.Namespace(**{**vars(args), "rounds": args.gen_rounds,
                                     "duration": args.gen_duration})
    with taskdelta_server(args, "smollm2-135m", redis, work) as srv:
        rows += sweep(gen_args, srv, levels, args.gen_clients)


# --- main --------------------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenarios", default="classify,naive,cold,generate")
    p.add_argument("--tasks", type=ints, default=[10, 100, 1000], help="T for classify")
    p.add_argument("--clients", type=ints, default=[1, 16], help="C, concurrent closed-loop "
                   "clients (a list runs every classify level at each)")
    p.add_argument("--naive-clients", type=ints, default=[16])
    p.add_argument("--naive-duration", type=float, default=20.0)
    p.add_argument("--naive-rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=12.0, help="measured seconds per level")
    p.add_argument("--rounds", type=int, default=4, help="the levels in turn, this many times; "
                   "each window is duration / rounds (the machine's load drifts: spread it)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each window")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--naive-tasks", type=ints, default=[100])
    p.add_argument("--naive-lru", type=int, default=4, help="resident merged copies")
    p.add_argument("--naive-variants", default="batched:cache,fifo:cache,fifo:disk",
                   type=lambda t: t.split(","), help="MODE:STORAGE,...: batched (taskdelta's "
                   "scheduler) or fifo (one request at a time); cache (files in the page cache) or "
                   "disk (evicted after each load)")
    p.add_argument("--no-embed-reference", dest="embed_reference", action="store_false")
    p.add_argument("--cold-samples", type=int, default=15)
    p.add_argument("--no-cold-full-check", dest="cold_full_check", action="store_false",
                   help="cold: skip the reference sets whose records lack `validated_for` "
                   "(checked in full on load, as stored by an older server)")
    p.add_argument("--cold-encodings", default="plain,compact", type=lambda t: t.split(","),
                   help="upload encodings whose cold starts are measured (format.dumps)")
    p.add_argument("--gen-tasks", type=ints, default=[10, 100])
    p.add_argument("--gen-clients", type=int, default=4)
    p.add_argument("--gen-tokens", type=int, default=8)
    p.add_argument("--gen-duration", type=float, default=32.0)
    p.add_argument("--gen-rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server process")
    p.add_argument("--cache-bytes", type=int, default=None,
                   help="server's delta cache (default: for classify / mixed, every task of the "
                   "largest --tasks with room to spare; else the server's own)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "serve.json")
    p.add_argument("--plots", type=Path, default=ROOT / "docs", help="where the PNGs go")
    p.add_argument("--workdir", type=Path, default=None, help="merged folders, logs (default: temp)")
    p.add_argument("--replot", type=Path, default=None, metavar="JSON", help="report a saved run")
    args = p.parse_args(argv)
    if args.replot:
        report(json.loads(args.replot.read_text()), args.plots, args.replot.with_suffix(".md"))
        return 0
    if args.quick:
        args.tasks, args.naive_tasks, args.gen_tasks, args.clients = [10, 100], [10], [10], [16]
        args.duration, args.warmup, args.cold_samples, args.rounds = 8.0, 2.0, 5, 1
        args.gen_duration, args.gen_rounds, args.naive_duration, args.naive_rounds = 10.0, 1, 10.0, 1
    args.scenarios = set(args.scenarios.split(","))
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    out: dict = {"machine": machine(args.threads), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "args": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()
                          if k not in ("json", "plots", "workdir", "replot")},
                 "zipf_top4_of_100": zipf_top_mass(100, 4)}
    print("machine: " + ", ".join(f"{k} {v}" for k, v in out["machine"].items()), flush=True)
    started = time.perf_counter()
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each scenario: a later failure keeps what was measured
        out["seconds"] = time.perf_counter() - started
        out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        args.json.write_text(json.dumps(out))

    with tempfile.TemporaryDirectory(prefix="taskdelta-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.scenarios & {"classify", "mixed", "naive", "cold"}:
            with RedisServer() as redis:  # one per scenario: the first one's GBs are freed
                run_classify(args, redis, work, out)
            save()
        if "generate" in args.scenarios:
            with RedisServer() as redis:
                run_generate(args, redis, work, out)
            save()
    print(f"\nwrote {args.json} ({out['seconds']:.0f} s in all)")
    report(out, args.plots, args.json.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
