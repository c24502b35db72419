"""One mixed forward against the plain one, in process: where a mixed batch's extra time goes.

The plain side is what a single-task server runs for a batch: tokenize, the minilm backbone and one
classify head over R short texts. The mixed side is the same R texts over T tasks (the first tasks
two rows each, the rest one, as a Zipf batch of 16 looks), each task's random delta (--density,
~227k stored entries at 1 %) corrected on its rows, then each task's head on its rows. Both run on
one torch thread (as the bench servers do), alternating, --repeat times; medians are reported.

A second set of mixed runs wraps the mixer's steps and kernels in timers (exclusive times, so a
step's figure leaves out what it calls): the kernels (linear, embedding, LayerNorm and bias rows),
the torch ops of the corrections, the hooks' own Python, the heads. Those runs are slower by the
timers' cost and are not in the side-by-side figures.

    python bench/mixed_forward.py
    python bench/mixed_forward.py --tasks 12 --rows 16 --repeat 40 --json bench/out/mixed-forward.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from loadgen import machine  # noqa: E402

from taskdelta.deltas import _mixed_paths as mixed_module  # noqa: E402  (F.layer_norm timed)
from taskdelta.deltas import load_base, prepare, random_delta  # noqa: E402
from taskdelta.deltas.mixed import Mixer, pooled_logits  # noqa: E402

WORDS = ["wonderful", "dreadful", "moving", "tedious", "clever", "hollow", "tender", "loud"]


def texts(rows: int) -> list[str]:
    """Short reviews of the bench's length (~18 tokens), not all alike."""
    return [f"a {WORDS[i % 8]}, {WORDS[(3 * i + 1) % 8]} film about two old friends who travel "
            f"across the country together" for i in range(rows)]


def owners(rows: int, tasks: int) -> list[int]:
    """Task of each row: the first rows - tasks tasks get two rows, the others one."""
    per = [2 if t < rows - tasks else 1 for t in range(tasks)]
    return [t for t, n in enumerate(per) for _ in range(n)][:rows]


class Timers:
    """Exclusive wall time per label: wrapped callables subtract what their callees took."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[float] = []

    def wrap(self, fn: Any, label: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append(0.0)
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - started
                children = self._stack.pop()
                self.totals[label] += took - children
                self.calls[label] += 1
                if self._stack:
                    self._stack[-1] += took
        return timed


class KernelProxy:
    def __init__(self, kernel: Any, timers: Timers) -> None:
        self._kernel, self._timers = kernel, timers

    def __getattr__(self, name: str) -> Any:
        return self._timers.wrap(getattr(self._kernel, name), f"kernel: {name}")


# the mixer's steps, where they exist: (method, label); the hook and the kernel path's `_fix` count
# the torch ops they run themselves (norm(x) for a LayerNorm's Δγ, reshapes) with their Python
PY = "hooks' Python (+ reshapes, norm(x))"
STEPS = [("_hook", PY), ("_fix", PY), ("_linear", PY), ("_embedding", PY), ("_sparse_mm", PY),
         ("_norm", "LayerNorm corrections (torch ops)"), ("_add_per_row", "bias / LN rows (torch ops)")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=12)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label", default="", help="a name for this run in the JSON (before/after)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    base = load_base("minilm", device="cpu")
    mixer = Mixer(base)
    prepared = [prepare(random_delta(base, args.density, seed=10 + t, kind="classify"), base,
                        name=f"t{t}") for t in range(args.tasks)]
    built = [mixer.build(d) for d in prepared]
    rows = texts(args.rows)
    own = owners(args.rows, args.tasks)
    segments = [(a, b, t) for t, a, b in _runs(own)]
    tok, backbone = base.tokenizer, base.backbone
    print(f"machine: {machine(args.threads)}")
    print(f"minilm, {args.rows} texts, {len(segments)} tasks, {prepared[0].nnz:,} entries a delta, "
          f"kernel {'on' if mixer._kernel is not None else 'off (torch sparse ops)'}", flush=True)

    def encode() -> dict:
        return tok(rows, padding=True, truncation=True, max_length=512, return_tensors="pt")

    def plain(enc: dict) -> torch.Tensor:
        pooled = backbone(**enc).pooler_output  # [rows, hidden]
        return pooled_logits(prepared[0].head, pooled).softmax(-1)

    def mixed(enc: dict, timers: Timers | None = None) -> list[torch.Tensor]:
        with mixer.mixing([(a, b, built[t]) for a, b, t in segments], len(rows)):
            pooled = backbone(**enc).pooler_output
        heads = (lambda fn: timers.wrap(fn, "per-task heads")) if timers else (lambda fn: fn)
        return [heads(pooled_logits)(prepared[t].head, pooled[a:b]).softmax(-1)
                for a, b, t in segments]

    enc = encode()
    tokens = int(enc["input_ids"].numel())
    for _ in range(3):  # warm: allocator, kernels, caches
        plain(enc)
        mixed(enc)
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.repeat):
        for name, fn in (("tokenize", encode), ("plain forward + head", lambda: plain(enc)),
                         ("mixed forward + heads", lambda: mixed(enc))):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    timers = Timers()  # instrumented runs: where the mixed side's extra time goes
    originals = {name: getattr(mixer, name) for name, _ in STEPS if hasattr(mixer, name)}
    for name, label in STEPS:
        if name in originals:
            setattr(mixer, name, timers.wrap(originals[name], label))
    kernel = mixer._kernel
    if kernel is not None:
        mixer._kernel = KernelProxy(kernel, timers)
    layer_norm = mixed_module.F.layer_norm
    instrumented = []
    try:
        for _ in range(args.repeat):
            started = time.perf_counter()
            mixed(enc, timers)
            instrumented.append(time.perf_counter() - started)
    finally:
        for name in originals:
            delattr(mixer, name)
        mixer._kernel = kernel
        mixed_module.F.layer_norm = layer_norm
    breakdown = {k: v / args.repeat * 1e3 for k, v in timers.totals.items()}
    calls = {k: v // args.repeat for k, v in timers.calls.items()}

    mixer.close()  # the plain forward with no hooks registered at all
    nohooks = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        plain(enc)
        nohooks.append(time.perf_counter() - started)
    med["plain forward + head, no hooks registered"] = statistics.median(nohooks) * 1e3

    ref = med["plain forward + head"]
    print(f"\n{tokens} tokens ({enc['input_ids'].shape[1]} per row); medians of {args.repeat}, "
          f"load {os.getloadavg()[0]:.2f}\n")
    print(f"{'':46} {'ms':>8} {'x plain':>8}")
    for name in ("plain forward + head, no hooks registered", "plain forward + head",
                 "mixed forward + heads", "tokenize"):
        print(f"{name:46} {med[name]:8.2f} {med[name] / ref:8.3f}")
    timed = statistics.median(instrumented) * 1e3
    print(f"\nmixed side, instrumented (exclusive ms per forward; {timed:.2f} ms a forward with timers)")
    for label, ms in sorted(breakdown.items(), key=lambda kv: -kv[1]):
        print(f"  {label:44} {ms:8.3f}  ({calls[label]} calls)")
    extra = med["mixed forward + heads"] - ref
    print(f"  {'mixed - plain (uninstrumented)':44} {extra:8.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        saved = json.loads(args.json.read_text()) if args.json.exists() else {}
        saved[args.label or time.strftime("%H:%M:%S")] = {
            "machine": machine(args.threads), "args": {k: str(v) for k, v in vars(args).items()},
            "tokens": tokens, "median_ms": med, "breakdown_ms": breakdown, "calls": calls}
        args.json.write_text(json.dumps(saved, indent=1))
    return 0


def _runs(owners: list[int]) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    for i, t in enumerate(owners):
        if runs and runs[-1][0] == t:
            runs[-1] = (t, runs[-1][1], i + 1)
        else:
            runs.append((t, i, i + 1))
    return runs


if __name__ == "__main__":
    sys.exit(main())
