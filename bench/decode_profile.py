"""Where a server decode step's time goes, in this process, without HTTP: the engine's own
executor (server/executor.py) runs one wave of C generations as the closed loop of
bench/decode.py makes them (C prompts admitted together, decoded together), and each part is
timed against what `model.generate()` spends on the same prompts:

- prefill: the executor reads the C whole prompts in one left-padded forward, as `generate()`
  does;
- join: a prefilled sequence's KV cache concatenated into its decode group (server/kv.py);
- decode forward: the model's forward on the group, per step;
- decode overhead: the rest of a decode step (inputs, per-row pick and push: detokenize, stream);
- keep: rows selected out of the cache when sequences finish.

--tasks N adds a mixed wave: the same C prompts, row i of task i % N (random 1 % generate
deltas), in one DecodeGroup(mixed=True) on the untouched base with the Mixer's corrections, and
splits its forward into the base's own work and the corrections per module kind (linear,
embedding, norm) and the per-step plan; the mixed forms are built before the wave (the server
caches them).

    python bench/decode_profile.py                  # smollm2-135m, C = 8 and 32, 1 thread
    python bench/decode_profile.py --clients 32 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from decode import PROMPTS, reference_seconds  # noqa: E402

from taskdelta.client.types import SamplingParams  # noqa: E402
from taskdelta.deltas import Base, load_base, random_delta  # noqa: E402
from taskdelta.deltas.mixed import Mixer, module_kind  # noqa: E402
from taskdelta.deltas.swap import PreparedDelta, prepare  # noqa: E402
from taskdelta.server.executor import Executor, Prefill, StepReport  # noqa: E402
from taskdelta.server.jobs import GenerateJob  # noqa: E402
from taskdelta.server.kv import DecodeGroup  # noqa: E402
from taskdelta.server.sequences import Sequence, eos_ids, prompt_ids  # noqa: E402


class Timers:
    """Seconds summed per part; `wrap` times every call of an object's method."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started
            self.calls[name] += 1

    def wrap(self, owner: object, method: str, name: str) -> Callable[[], None]:
        original, own = getattr(owner, method), method in vars(owner)

        def timed(*args, **kwargs):
            with self.part(name):
                return original(*args, **kwargs)

        setattr(owner, method, timed)
        return lambda: setattr(owner, method, original) if own else delattr(owner, method)


def sequences(base: Base, prompts: list[str], tokens: int) -> list[Sequence]:
    positions = base.model.config.max_position_embeddings
    eos = eos_ids(base.model, base.tokenizer)
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    return [Sequence(GenerateJob(prompt=p, params=params, emit=lambda _c: None),
                     prompt_ids(base.tokenizer, p, positions), positions, base.tokenizer, eos)
            for p in prompts]


def server_wave(base: Base, prompts: list[str], tokens: int) -> Timers:
    """One wave as the executor runs it: every prompt prefilled, then decode steps to the end."""
    timers, executor, group = Timers(), Executor(base), DecodeGroup()
    undo = [timers.wrap(base.model, "forward", "forward"), timers.wrap(group, "join", "join"),
            timers.wrap(group, "keep", "keep")]
    try:
        run_wave(timers, executor, group,
                 [Prefill(seq, None, group) for seq in sequences(base, prompts, tokens)])
    finally:
        for u in undo:
            u()
    return timers


def run_wave(timers: Timers, executor: Executor, group: DecodeGroup, works: list[Prefill]) -> None:
    """Every prompt prefilled (whole prompts of one group in one left-padded forward, as the server
    does), then decode steps to the end; the prefill's share of the forward (and of the mixed
    corrections) is recorded apart from the decode's."""
    report = StepReport()
    with timers.part("prefill step"):
        executor.prefill(works, 4096, report)
    timers.seconds["prefill forward"] = timers.seconds["forward"]
    timers.seconds["prefill corrections"] = sum(timers.seconds[k] for k in KINDS)
    while len(group):
        with timers.part("decode step"):
            executor.decode(group, None, report)


def mixed_wave(base: Base, prompts: list[str], tokens: int, deltas: list[PreparedDelta]) -> Timers:
    """One wave of a mixed group: row i of deltas[i % len(deltas)], corrections timed by kind."""
    timers, mixer = Timers(), Mixer(base)
    executor, group = Executor(base, mixer=mixer), DecodeGroup(mixed=True)
    for d in deltas:
        mixer.build(d)  # the server builds each once and caches it with the delta
    for name, module in mixer._modules.items():
        mixer._runs[name] = _timed(timers, module_kind(module) or "", mixer._runs[name])
    undo = [timers.wrap(base.model, "forward", "forward"), timers.wrap(mixer, "mixing", "plan")]
    try:
        run_wave(timers, executor, group,
                 [Prefill(seq, deltas[n % len(deltas)], group, key=deltas[n % len(deltas)].name)
                  for n, seq in enumerate(sequences(base, prompts, tokens))])
    finally:
        for u in undo:
            u()
        mixer.close()
    return timers


KINDS = ("linear", "embedding", "norm")


def _timed(timers: Timers, kind: str, run: Callable) -> Callable:
    def timed(*args, **kwargs):
        with timers.part(kind):
            return run(*args, **kwargs)
    return timed


def report_mixed(c: int, tasks: int, tokens: int, t: Timers, base_wave: Timers) -> None:
    s, steps = t.seconds, t.calls["decode step"]
    forward = s["forward"] - s["prefill forward"]
    total = s["prefill step"] + s["decode step"]
    base_step = (base_wave.seconds["forward"] - base_wave.seconds["prefill forward"]) / max(
        1, base_wave.calls["decode step"])
    print(f"C={c}, {tasks} tasks mixed: wave {total:.2f} s ({c * tokens / total:.1f} tok/s); "
          f"prefill {s['prefill step']:.2f} s (corrections {s['prefill corrections']:.2f} s)")
    print(f"  decode {s['decode step']:.2f} s over {steps} steps: forward {forward / steps * 1e3:.1f} "
          f"ms/step (base wave {base_step * 1e3:.1f}); plan {s['plan'] / steps * 1e3:.2f} ms/step")
    print("  corrections, whole wave (prefill + decode): " + ", ".join(
        f"{k} {s[k]:.2f} s ({t.calls[k]} calls)" for k in KINDS))


@torch.inference_mode()
def batched_prefill_seconds(base: Base, prompts: list[str]) -> float:
    """One left-padded forward over every prompt, as `generate()` reads them."""
    tok = base.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    started = time.perf_counter()
    base.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], logits_to_keep=1)
    return time.perf_counter() - started


def report(c: int, tokens: int, t: Timers, batched_prefill: float, reference: float) -> None:
    s, n = t.seconds, t.calls
    steps = n["decode step"]
    prefill_forward = s["prefill forward"]
    decode_forward = s["forward"] - prefill_forward
    overhead = s["decode step"] - decode_forward - s["keep"]
    total = s["prefill step"] + s["decode step"]
    print(f"C={c}: server wave {total:.2f} s for {c * tokens} tokens ({c * tokens / total:.1f} "
          f"tok/s); generate() {reference:.2f} s ({c * tokens / reference:.1f} tok/s)")
    print(f"  prefill   {s['prefill step']:6.2f} s  (forward {prefill_forward:.2f} s; "
          f"joins {s['join']:.3f} s)  vs one batched forward {batched_prefill:.2f} s")
    print(f"  decode    {s['decode step']:6.2f} s  over {steps} steps: forward "
          f"{decode_forward / steps * 1e3:.1f} ms/step, keep {s['keep'] / steps * 1e3:.1f} ms/step, "
          f"the rest (inputs, pick, push) {overhead / steps * 1e3:.1f} ms/step")
    print(f"  generate() per token step {(reference - batched_prefill) / (tokens - 1) * 1e3:.1f} ms "
          f"(its prefill counted as the batched forward)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--clients", type=lambda t: [int(x) for x in t.split(",")], default=[8, 32])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tasks", type=int, default=0, help="also a mixed wave of this many tasks")
    p.add_argument("--density", type=float, default=0.01)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    base = load_base(args.base, device="cpu")
    reference_seconds(base, PROMPTS[:2], 2)  # one-off setup, not measured
    print(f"{args.base}, {args.threads} thread(s), {args.tokens} new tokens; load "
          f"{os.getloadavg()[0]:.2f}")
    for c in args.clients:
        prompts = PROMPTS[:c]
        timers = server_wave(base, prompts, args.tokens)
        report(c, args.tokens, timers, batched_prefill_seconds(base, prompts),
               reference_seconds(base, prompts, args.tokens))
        if args.tasks:
            deltas = [prepare(random_delta(base, args.density, seed=i, kind="generate"), base,
                              name=f"t{i}") for i in range(min(args.tasks, c))]
            report_mixed(c, len(deltas), args.tokens,
                         mixed_wave(base, prompts, args.tokens, deltas), timers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
