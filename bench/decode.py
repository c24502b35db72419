"""Decode throughput: the real server under C streaming clients against the same model decoding
the same prompts as ONE `model.generate()` batch in this process, side by side in one run.

- reference: C prompts, left-padded, greedy, exactly --tokens new tokens each (min = max), in this
  process with the server's torch thread count; tokens/s = C x tokens / seconds. Measured before
  and after the served runs (the machine's load drifts); the table shows both and their mean.
- served: the real server (`python -m taskdelta.server`, its own data dir and embedded Redis,
  --threads torch threads) and C closed-loop clients streaming `/v1/tasks/{task}/generate`
  (greedy, --tokens new tokens; the server stops earlier at EOS and reports what it made).
  Tokens/s counts the tokens that arrived inside the window; TTFT and inter-token latency come
  from the SSE events' arrival times (bench/decode_load.py).
- scenarios: `base` (no delta) and `task` (one random generate delta at --density, every client
  asking it: swapped in once). --with-classify adds a C = 8 `base` run with one more client
  embedding a few texts with `base` back to back: are they answered, how fast, and what is the
  decode throughput meanwhile.
- many-task scenarios (mixed-task decode, issue 13): `tasks8` / `tasks32` (C clients, C distinct
  random generate deltas, client i always asks task i), `zipf1000` (32 clients, each request's
  task drawn Zipf(1) over --zipf-names names; the server's delta-cache hit rate read from
  /metrics) and `tasks8-nomix` (tasks8 on a second server with TASKDELTA_MIXED_BATCHES=false:
  one group per task, swapped in turn). Tasks are uploaded through PUT /v1/tasks/NAME. The zipf
  names reuse --distinct deltas in turn (uploading 1,000 distinct 1 % deltas does not fit the
  machine's time and memory); the output says how many.
- --peft: the peer, PEFT's mixed-adapter batch in this process on the same prompts (bench/decode_peft.py).

    python bench/decode.py --scenarios tasks8,tasks32,zipf1000,tasks8-nomix --peft
    python bench/decode.py --with-classify            # ~6 min on 2 cores
    python bench/decode.py --quick                     # a smoke run
    python bench/decode.py --base path/to/llama --quick --clients 1,4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from decode_load import TaskPicker, run_load  # noqa: E402
from decode_peft import peer  # noqa: E402
from decode_tasks import cache_counts, hit_rate, make_blobs, upload_many, zipf_picker  # noqa: E402
from loadgen import ServerProcess, free_port, machine  # noqa: E402

from taskdelta.deltas import Base, dumps, load_base, random_delta  # noqa: E402

# many-task scenarios: name -> (clients, distinct task names); client i asks task i, zipf draws
MANY = {"tasks8": (8, 8), "tasks32": (32, 32), "zipf1000": (32, 1000), "tasks8-nomix": (8, 8)}

ROOT = Path(__file__).resolve().parents[1]
TASK = "decode-bench"
# raw openings the instruct model continues at length (asked a bare question without its chat
# template it may stop at once); distinct, so a batch's rows differ in content and length
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The old lighthouse keeper climbed the stairs every evening because",
    "In the year 2150, the first city on Mars was built by",
    "The recipe for my grandmother's apple pie begins with",
    "When the train stopped in the middle of the desert, the passengers",
    "The most important thing I learned in my first job was",
    "Deep in the forest, a young fox discovered a strange",
    "The history of the printing press shows that",
    "On a rainy Tuesday morning, the detective received a letter that",
    "The best way to learn a new language is to",
    "Scientists were surprised when the telescope revealed",
    "The little robot wanted nothing more than to",
    "Every summer, our family drove to the mountains, where",
    "The ancient map showed a path across the frozen lake to",
    "My favourite teacher once told me that",
    "The city woke up slowly as the baker opened",
    "A good night's sleep matters because",
    "The ship's captain looked at the storm clouds and decided",
    "In the quiet library, between two dusty books, she found",
    "The football match was tied with one minute left when",
    "Bees are essential to our food supply because",
    "The painter mixed the colours carefully, hoping to capture",
    "After years of silence, the old piano in the hall",
    "The village festival began at sunrise with",
    "To build a simple wooden bookshelf, you first need",
    "The astronaut looked back at the Earth and thought about",
    "Long ago, the river that runs through our town",
    "The new student sat alone at lunch until",
    "Volcanoes form when",
    "The king announced a contest, and the prize was",
    "Walking through the night market, I smelled",
    "The inventor's notebook was full of drawings of",
]
EMBED_TEXTS = ["a wonderful, moving film about two old friends",
               "the service was slow and the soup was cold",
               "how do I reset my password?",
               "quarterly revenue grew by twelve percent"]


# --- the in-process reference ------------------------------------------------------------------


@torch.inference_mode()
def reference_seconds(base: Base, prompts: list[str], tokens: int) -> float:
    """Seconds for one left-padded greedy `generate()` batch making exactly `tokens` per row."""
    tok = base.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(base.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    _sync(base)
    started = time.perf_counter()
    out = base.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                              max_new_tokens=tokens, min_new_tokens=tokens,
                              do_sample=False, pad_token_id=pad)
    _sync(base)
    seconds = time.perf_counter() - started
    made = out.shape[1] - enc["input_ids"].shape[1]
    assert made == tokens, f"the reference made {made} tokens a row, not {tokens}"
    return seconds


def _sync(base: Base) -> None:
    if torch.device(base.device).type == "cuda":
        torch.cuda.synchronize()


def reference_pass(base: Base, clients: list[int], tokens: int, label: str) -> dict[int, float]:
    """tokens/s of the one-batch reference at each C."""
    out = {}
    for c in clients:
        seconds = reference_seconds(base, PROMPTS[:c], tokens)
        out[c] = c * tokens / seconds
        print(f"  reference ({label}) C={c:<3} {out[c]:8.1f} tok/s  ({seconds:.2f} s)  "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    return out


# --- the served runs ---------------------------------------------------------------------------


def start_server(args, work: Path, mixed: bool = True) -> ServerProcess:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [sys.executable, "-m", "taskdelta.server", "--base", args.base, "--port", str(port),
            "--no-auth", "--log-level", "warning", "--data-dir", str(work / "data")]
    if args.device:
        argv += ["--device", args.device]
    env = {"TASKDELTA_TORCH_THREADS": str(args.threads), "TASKDELTA_CACHE_BYTES": str(args.cache_bytes),
           "TASKDELTA_MIXED_BATCHES": "true" if mixed else "false",
           # the zipf names beside the fixed tasks: over the default 1,000 tasks a tenant may hold
           "TASKDELTA_MAX_TASKS_PER_TENANT": str(max(1000, args.zipf_names + 64))}
    return ServerProcess(argv, port, args.threads, log=work / "server.log", env=env)


def upload_task(url: str, base: Base, density: float, seed: int) -> dict:
    """One random generate delta, PUT as task TASK."""
    delta = random_delta(base, density, seed=seed, kind="generate")
    blob = dumps(delta)
    r = httpx.put(f"{url}/v1/tasks/{TASK}", content=blob, timeout=300,
                  headers={"Content-Type": "application/octet-stream"})
    r.raise_for_status()
    print(f"  uploaded {TASK}: {delta.nnz:,} nonzeros, {len(blob) / 1e6:.1f} MB", flush=True)
    return {"nnz": delta.nnz, "blob_bytes": len(blob), "density": density}


def served(args, url: str, scenario: str, clients: int, embed: bool = False,
           task: str | TaskPicker | None = None) -> dict:
    task = task or ("base" if scenario.startswith("base") else TASK)
    prompts = [PROMPTS[n % len(PROMPTS)] for n in range(clients)]
    res = asyncio.run(run_load(url, task, prompts, args.tokens, args.warmup, window(args, clients),
                               EMBED_TEXTS if embed else None))
    res.update(scenario=scenario, clients=clients, loadavg_1min=round(os.getloadavg()[0], 2))
    print(f"  served {scenario:<12} C={clients:<3} {res['tokens_per_s']:8.1f} tok/s  "
          f"TTFT p50 {_ms(res['ttft_p50_ms'])}  ITL p50 {_ms(res['itl_p50_ms'])}  "
          f"errors {res['errors']}  load {res['loadavg_1min']:.2f}", flush=True)
    return res


def window(args, clients: int) -> float:
    """Measured seconds at C clients. Equal-length answers admitted together finish together,
    so above C = 16 the clients move in waves (C = 32: one wave ~20 s on 2 cores); a longer
    window holds more whole waves, so where it cuts the last one weighs less."""
    return args.duration * max(1.0, clients / 16)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms"


def many_task_runs(args, base: Base, work: Path, out: dict) -> list[dict]:
    """The many-task scenarios asked for: mixed ones on one server, tasks8-nomix on another."""
    asked = [s for s in args.scenarios if s in MANY]
    if not asked:
        return []
    count = max([MANY[s][1] for s in asked if s != "zipf1000"]
                + [args.distinct if "zipf1000" in asked else 0])
    blobs = make_blobs(base, count, args.density)
    rows = []
    mixed = [s for s in asked if s != "tasks8-nomix"]
    if mixed:
        rows += _on_server(args, work / "mixed", True, mixed, blobs, out)
    if "tasks8-nomix" in asked:
        rows += _on_server(args, work / "nomix", False, ["tasks8-nomix"], blobs, out)
    return rows


def _on_server(args, work: Path, mixed: bool, scenarios: list[str], blobs: list[bytes],
               out: dict) -> list[dict]:
    rows = []
    with start_server(args, work, mixed=mixed) as srv:
        print(f"  server (mixed batches {mixed}) ready in {srv.ready_s:.1f} s", flush=True)
        fixed = max((MANY[s][1] for s in scenarios if s != "zipf1000"), default=0)
        out.setdefault("uploads", {})[f"mixed={mixed}"] = upload_many(
            srv.url, [f"t{i}" for i in range(fixed)], blobs)
        for scenario in scenarios:
            clients, tasks = MANY[scenario]
            if scenario == "zipf1000":
                rows.append(_zipf_run(args, srv.url, clients, blobs, out))
            else:
                rows.append(served(args, srv.url, scenario, clients, task=lambda n: f"t{n}"))
        out.setdefault("server_memory_many", {})[f"mixed={mixed}"] = srv.memory()
    return rows


def _zipf_run(args, url: str, clients: int, blobs: list[bytes], out: dict) -> dict:
    names = [f"z{i}" for i in range(args.zipf_names)]
    out["zipf_upload"] = upload_many(url, names, blobs[:args.distinct])
    before = cache_counts(url)
    res = served(args, url, "zipf1000", clients, task=zipf_picker(names, clients, args.seed))
    res["cache"] = hit_rate(before, cache_counts(url))
    res["cache"].update(names=len(names), distinct_deltas=min(len(names), args.distinct),
                        cache_bytes_limit=args.cache_bytes)
    print(f"  zipf cache: {res['cache']}", flush=True)
    return res


# --- the table ---------------------------------------------------------------------------------


def table(rows: list[dict], before: dict[int, float], after: dict[int, float]) -> str:
    head = ("| scenario | C | served tok/s | reference tok/s (before / after / mean) | ratio "
            "| TTFT p50 / p99 ms | ITL p50 / p99 ms | tokens/answer |")
    lines = [head, "|" + " --- |" * 8]
    for r in rows:
        c = r["clients"]
        lines.append(f"| {r['scenario']} | {c} | {r['tokens_per_s']:.1f} | {before[c]:.1f} / "
                     f"{after[c]:.1f} / {r['reference_tok_s']:.1f} | {r['ratio']:.2f} | "
                     f"{_num(r['ttft_p50_ms'])} / {_num(r['ttft_p99_ms'])} | "
                     f"{_num(r['itl_p50_ms'])} / {_num(r['itl_p99_ms'])} | "
                     f"{_num(r['tokens_per_answer'], 1)} |")
    for r in rows:
        if "embed" in r:
            e = r["embed"]
            lines.append(f"\nembed beside the C={r['clients']} decode load ({e['texts_per_request']} "
                         f"texts a request): {e['answered']} answered, {e['errors']} errors, p50 "
                         f"{_num(e['p50_ms'])} ms, p99 {_num(e['p99_ms'])} ms; decode meanwhile "
                         f"{r['tokens_per_s']:.1f} tok/s")
    return "\n".join(lines)


GOALS = {"tasks8": 0.75, "tasks32": 0.70, "zipf1000": 0.70}


def goals_table(rows: list[dict], out: dict) -> str:
    """Ours (served / one in-process generate() batch of the base) beside PEFT's mixed-adapter
    batch (mixed / its base batch), each with its goal."""
    peft = {p["rows"]: p["ratio"] for p in out.get("peft", [])}
    lines = ["| scenario | C | ours: ratio | goal | PEFT mixed-adapter batch ratio (rows = adapters) |",
             "|" + " --- |" * 5]
    for r in rows:
        if r["scenario"] not in MANY:
            continue
        goal = GOALS.get(r["scenario"])
        p = peft.get(r["clients"]) if r["scenario"] in GOALS and r["scenario"] != "zipf1000" else None
        lines.append(f"| {r['scenario']} | {r['clients']} | {r['ratio']:.2f} | "
                     f"{'-' if goal is None else f'>= {goal:.2f}'} | {_num(p, 2)} |")
    if "zipf_upload" in out:
        z = [r for r in rows if r["scenario"] == "zipf1000"][0]["cache"]
        lines.append(f"\nzipf1000: {z['names']} task names over {z['distinct_deltas']} distinct "
                     f"deltas; cache hit rate {_num(z['hit_rate'], 3)} ({z['hits']:.0f} hits, "
                     f"{z['misses']:.0f} misses); cache {z['cache_bytes'] / 1e9:.2f} GB in "
                     f"{z['cache_entries']:.0f} entries, limit {z['cache_bytes_limit'] / 1e9:.2f} GB")
    return "\n".join(lines)


def _num(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# --- main --------------------------------------------------------------------------------------


def measure(args, base: Base, work: Path, out: dict) -> None:
    reference_seconds(base, PROMPTS[:2], 2)  # a first call pays one-off setup: not measured
    single = [s for s in args.scenarios if s not in MANY]
    needed = set(args.clients if single else []) | {MANY[s][0] for s in args.scenarios if s in MANY}
    before = reference_pass(base, sorted(needed), args.tokens, "before")
    rows = []
    if single or args.with_classify:
        with start_server(args, work / "single") as srv:
            print(f"  server ready in {srv.ready_s:.1f} s", flush=True)
            out["task"] = upload_task(srv.url, base, args.density, args.seed)
            for scenario in single:
                rows += [served(args, srv.url, scenario, c) for c in args.clients]
            if args.with_classify:
                rows.append(served(args, srv.url, "base+embed", args.classify_clients, embed=True))
            out["server_memory"] = srv.memory()
    rows += many_task_runs(args, base, work, out)
    after = reference_pass(base, sorted({r["clients"] for r in rows}), args.tokens, "after")
    for r in rows:
        c = r["clients"]
        r["reference_tok_s"] = (before.get(c, after[c]) + after[c]) / 2
        r["ratio"] = r["tokens_per_s"] / r["reference_tok_s"]
    if args.peft:
        out["peft"] = [peer(base.model, base.tokenizer, PROMPTS, n, args.tokens)
                       for n in args.peft_rows]
    out.update(rows=rows, reference_before=before, reference_after=after)
    out["table"] = table(rows, {c: before.get(c, after[c]) for c in after}, after)
    if any(r["scenario"] in MANY for r in rows):  # the goals are the many-task scenarios'
        out["table"] += "\n\n" + goals_table(rows, out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", default="smollm2-135m", help="named base or a causal LM folder")
    p.add_argument("--clients", type=_ints, default=[1, 8, 32], help="C values (at most 32)")
    p.add_argument("--scenarios", type=lambda t: t.split(","), default=["base", "task"])
    p.add_argument("--with-classify", action="store_true", help="a base run at --classify-clients "
                   "with an embedding client beside it")
    p.add_argument("--classify-clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    p.add_argument("--duration", type=float, default=25.0, help="measured seconds per run at C <= 16 "
                   "(C = 32: twice that)")
    p.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each window")
    p.add_argument("--threads", type=int, default=1, help="torch threads, server and reference")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zipf-names", type=int, default=1000, help="task names zipf1000 draws from")
    p.add_argument("--distinct", type=int, default=32, help="distinct deltas behind the zipf names")
    p.add_argument("--cache-bytes", type=int, default=8 * 1024**3, help="the server's delta cache")
    p.add_argument("--peft", action="store_true", help="also PEFT's mixed-adapter batch (the peer)")
    p.add_argument("--peft-rows", type=_ints, default=[8, 32], help="rows = adapters of the peer")
    p.add_argument("--quick", action="store_true", help="a smoke run: short windows")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "decode.json")
    p.add_argument("--workdir", type=Path, default=None, help="server data and log (default: temp)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    if max(args.clients) > len(PROMPTS):
        p.error(f"at most {len(PROMPTS)} clients (one distinct prompt each)")
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out: dict = {"machine": machine(args.threads), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(f"decode benchmark: {args.base}, {args.threads} torch thread(s), {args.tokens} new "
          f"tokens, C = {args.clients}; load {out['machine']['loadavg_start']}", flush=True)
    started = time.perf_counter()
    base = load_base(args.base, device=args.device)
    with tempfile.TemporaryDirectory(prefix="taskdelta-decode-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        measure(args, base, work, out)
    out["seconds"] = time.perf_counter() - started
    out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print("\n" + out["table"])
    print(f"\nload average {out['machine']['loadavg_start']} -> {out['machine']['loadavg_end']}; "
          f"{out['seconds']:.0f} s in all; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
