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

A second table per batch size: 3/4 of the rows one task (t0), the rest other tasks, one each:
every row corrected (kernel), or t0 swapped into the base and the other rows corrected against it
(-Δt0 + their own Δ); that variant's time includes a swap and a restore per step (`swap +
restore`, measured alone, is what an engine keeping t0 swapped across steps saves).

    python bench/mixed_decode.py
    python bench/mixed_decode.py --rows 8 32 --repeat 9 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import torch  # noqa: E402

from taskdelta.deltas import (  # noqa: E402
    Base,
    PreparedDelta,
    Swapper,
    _mixed_kernel,
    load_base,
    prepare,
    random_delta,
)
from taskdelta.deltas.mixed import MixedDelta, Mixer  # noqa: E402

PROMPT = ("Write a short note to a colleague about the meeting on Thursday, the budget and the "
          "new hires, in a friendly tone, and add a list of three action items.")


def swap_ms(swapper: Swapper, prepared: PreparedDelta, repeat: int) -> float:
    took = []
    for _ in range(repeat):
        started = time.perf_counter()
        with swapper.swapped(prepared):
            pass
        took.append(time.perf_counter() - started)
    return statistics.median(took) * 1e3


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


Variants = dict[str, Callable[[], AbstractContextManager]]


def interleaved(base: Base, variants: Variants, rows: int, args: argparse.Namespace) -> dict:
    """Median ms of one decode step per variant, the variants alternating in a rotating order."""
    step, cache = prefill(base, rows, args.prompt)
    times: dict[str, list[float]] = {v: [] for v in variants}
    names = list(variants)
    for v in names:  # warm-up: first-call costs and the plans
        timed_step(base, step, cache, variants[v])
    for rep in range(args.repeat):
        for v in names[rep % len(names):] + names[:rep % len(names)]:
            times[v].append(timed_step(base, step, cache, variants[v]))
    return {v: statistics.median(t) * 1e3 for v, t in times.items()}


def distinct(mixes: dict[str, Mixer], built: dict[str, list[MixedDelta]], rows: int) -> Variants:
    """Every row a different task, on each correction path."""
    variants: Variants = {"plain": nullcontext}
    for name, mixer in mixes.items():
        segments = [(r, r + 1, built[name][r]) for r in range(rows)]
        variants[f"mixed, {name}"] = lambda m=mixer, s=segments: m.mixing(s, rows)
    return variants


def hot(mixer: Mixer, built: list[MixedDelta], swapper: Swapper, prepared: PreparedDelta,
        rows: int) -> Variants:
    """3/4 of the rows one task (t0), the others one task each: all corrected, or t0 swapped in
    (swap and restore inside the step's time) and the others corrected against it."""
    many = rows - rows // 4
    segments = [(0, many, built[0])] + [(r, r + 1, built[r - many + 1]) for r in range(many, rows)]

    @contextmanager
    def against_swap() -> Iterator[None]:
        with swapper.swapped(prepared), mixer.mixing(segments, rows, swapped=built[0]):
            yield

    return {"plain": nullcontext, "mixed, kernel": lambda: mixer.mixing(segments, rows),
            "t0 swapped in": against_swap}


def plan_ms(mixer: Mixer, segments: list, rows: int, repeat: int) -> float:
    """A new batch composition's plans (the next steps of the same composition reuse them)."""
    took = []
    for _ in range(repeat):
        mixer.forget_batch()
        started = time.perf_counter()
        with mixer.mixing(segments, rows):
            pass
        took.append(time.perf_counter() - started)
    return statistics.median(took) * 1e3


def show(title: str, med: dict[str, float]) -> None:
    print(f"\n{title}, load {os.getloadavg()[0]:.2f}")
    print(f"{'':20} {'ms':>8} {'x plain':>8} {'throughput':>11}")
    for name, ms in med.items():
        if name in ("plain",) or not name.startswith(("plan", "swap")):
            print(f"{name:20} {ms:8.2f} {ms / med['plain']:8.3f} {med['plain'] / ms:11.3f}")
        else:
            print(f"{name:20} {ms:8.2f}")


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
    swapper = Swapper(base)
    for rows in args.rows:
        med = interleaved(base, distinct(mixes, built, rows), rows, args)
        for name, mixer in mixes.items():
            med[f"plan, {name}"] = plan_ms(mixer, [(r, r + 1, built[name][r]) for r in range(rows)],
                                           rows, args.repeat)
        show(f"{rows} rows x {rows} tasks, one decode step (KV {args.prompt}), medians of "
             f"{args.repeat}", med)
        med = interleaved(base, hot(mixes["kernel"], built["kernel"], swapper, prepared[0], rows),
                          rows, args)
        med["swap + restore"] = swap_ms(swapper, prepared[0], args.repeat)
        show(f"{rows} rows: {rows - rows // 4} of t0, {rows // 4} of other tasks", med)
    for mixer in mixes.values():
        mixer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
