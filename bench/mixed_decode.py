"""One decode step of smollm2-135m: the plain base against a mixed-task step, in process.

The plain side is what a one-task server runs: one decode token for each of R rows over the base
with their KV cache (a prompt of ~--prompt tokens each). The mixed side is the same step with each
row a different task (R distinct random deltas of --density, every tensor touched, the tied
embedding / LM head included), each corrected on its row: on the compiled CPU kernels and on the
torch sparse path (two Mixers on the one model; each one's hooks are inert outside its own
context). Variants alternate in a rotating order, --repeat times; the cache is cropped back after
every step so each step sees the same length. Medians; `x plain` is the mixed step's time over the
plain step's, `throughput` its inverse (the issue's ratio against the base batch).

The first mixed step of a new batch composition also builds its plan (per module, the tasks'
arguments); later steps of the same composition reuse it. `plan` is that one-off cost.

    python bench/mixed_decode.py
    python bench/mixed_decode.py --rows 8 32 --repeat 9 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import torch  # noqa: E402

from taskdelta.deltas import Base, _mixed_kernel, load_base, prepare, random_delta  # noqa: E402
from taskdelta.deltas.mixed import MixedDelta, Mixer  # noqa: E402

PROMPT = ("Write a short note to a colleague about the meeting on Thursday, the budget and the "
          "new hires, in a friendly tone, and add a list of three action items.")


def mixers(base: Base) -> dict[str, Mixer]:
    """A Mixer on the compiled kernels and one on the torch sparse path."""
    _mixed_kernel.reset()
    kernel = Mixer(base)
    os.environ[_mixed_kernel.DISABLE_ENV] = "0"
    _mixed_kernel.reset()
    try:
        torch_path = Mixer(base)
    finally:
        del os.environ[_mixed_kernel.DISABLE_ENV]
        _mixed_kernel.reset()
    if kernel._kernel is None:
        print("the compiled kernels could not be built: 'kernel' is the torch path too")
    return {"kernel": kernel, "torch": torch_path}


@torch.no_grad()
def prefill(base: Base, rows: int, prompt_tokens: int) -> tuple[dict, object]:
    """The rows' prompts through the plain base: the next step's inputs and the KV cache."""
    ids = base.tokenizer(PROMPT, return_tensors="pt")["input_ids"][:, :prompt_tokens]
    ids = ids.repeat(rows, 1)
    ids[:, -1] = torch.arange(rows) + 1000  # rows not all alike
    mask = torch.ones_like(ids)
    out = base.model(input_ids=ids, attention_mask=mask, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [rows, 1]
    step = {"input_ids": nxt, "attention_mask": torch.ones(rows, ids.shape[1] + 1, dtype=torch.long),
            "position_ids": torch.full((rows, 1), ids.shape[1])}
    return step, out.past_key_values


@torch.no_grad()
def timed_step(base: Base, step: dict, cache: object,
               context: Callable[[], AbstractContextManager]) -> float:
    started = time.perf_counter()
    with context():
        base.model(**step, cache=cache, use_cache=True)
    took = time.perf_counter() - started
    cache.crop(-1)  # back to the prompt: every step sees the same cache length
    return took


def measure(base: Base, mixes: dict[str, Mixer], built: dict[str, list[MixedDelta]], rows: int,
            args: argparse.Namespace) -> dict[str, float]:
    step, cache = prefill(base, rows, args.prompt)
    variants: dict[str, Callable[[], AbstractContextManager]] = {"plain": nullcontext}
    for name, mixer in mixes.items():
        segments = [(r, r + 1, built[name][r]) for r in range(rows)]  # one task a row
        variants[f"mixed, {name}"] = lambda m=mixer, s=segments: m.mixing(s, rows)
    times: dict[str, list[float]] = {v: [] for v in variants}
    names = list(variants)
    for v in names:  # warm-up: first-call costs and the plans
        timed_step(base, step, cache, variants[v])
    for rep in range(args.repeat):
        for v in names[rep % len(names):] + names[:rep % len(names)]:
            times[v].append(timed_step(base, step, cache, variants[v]))
    med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    for name, mixer in mixes.items():  # a new composition's plan
        segments = [(r, r + 1, built[name][r]) for r in range(rows)]
        plans = []
        for _ in range(args.repeat):
            mixer.forget_batch()
            started = time.perf_counter()
            with mixer.mixing(segments, rows):
                pass
            plans.append(time.perf_counter() - started)
        med[f"plan, {name}"] = statistics.median(plans) * 1e3
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--prompt", type=int, default=24, help="prompt tokens per row (KV length)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the servers use 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base("smollm2-135m", device="cpu")
    mixes = mixers(base)
    tasks = max(args.rows)
    started = time.perf_counter()
    prepared = [prepare(random_delta(base, args.density, seed=900 + t, scale=0.01), base,
                        name=f"t{t}") for t in range(tasks)]
    built = {name: [m.build(p) for p in prepared] for name, m in mixes.items()}
    extra = {name: statistics.mean(b.nbytes for b in bs) / 2**20 for name, bs in built.items()}
    print(f"{tasks} deltas of {args.density:.0%} ({prepared[0].nnz:,} entries, "
          f"{prepared[0].nbytes / 2**20:.1f} MiB each; mixing form beyond it: "
          + ", ".join(f"{n} {mb:.1f} MiB" for n, mb in extra.items())
          + f") in {time.perf_counter() - started:.0f} s; torch threads {args.threads}")
    for rows in args.rows:
        med = measure(base, mixes, {n: b[:rows] for n, b in built.items()}, rows, args)
        print(f"\n{rows} rows x {rows} tasks, one decode step (KV {args.prompt}), medians of "
              f"{args.repeat}, load {os.getloadavg()[0]:.2f}")
        print(f"{'':20} {'ms':>8} {'x plain':>8} {'throughput':>11}")
        for name, ms in med.items():
            if name.startswith("plan"):
                print(f"{name:20} {ms:8.2f}")
            else:
                print(f"{name:20} {ms:8.2f} {ms / med['plain']:8.3f} {med['plain'] / ms:11.3f}")
    for mixer in mixes.values():
        mixer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
