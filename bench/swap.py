"""Apply+restore time of the in-place swap, side by side with the memory-speed limit.

For each base and density: a random delta (`random_delta`, the same density in every tensor),
`prepare()`d once; then --repeats rounds after --warmup untimed ones, each round timing one
`apply(); restore()` pair and, right after it, the reference: a contiguous `dst.copy_(src)` of
the same number of bytes. Interleaving puts swap and reference under the same load from other work
on the machine; medians over the rounds are reported. Two references:

- `copy_` (BYTES_DEFINITION): the useful bytes only. The goal "apply+restore <= 2x" is stated
  against this one.
- `lines` (LINES_DEFINITION): the bytes a cache-line memory system must move for scattered writes
  (every touched 64-byte line of the weights, not just its 2 or 4 useful bytes). Its copy is
  timed in rounds of its own: at 5 % density it moves hundreds of MB, which between two swaps
  would evict the weights from the caches.

    python bench/swap.py                      # both defaults at 0.1 %, 1 %, 5 %
    python bench/swap.py --bases minilm --densities 0.01 --repeats 50 --json out.json
    python bench/swap.py --backends kernel,torch,per-tensor   # kernel, index ops, the baseline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from taskdelta.deltas import Swapper, default_device, load_base, prepare, random_delta  # noqa: E402

BYTES_DEFINITION = (
    "bytes = sum over touched entries of (index + 3 x value): the index (as prepared: int32), the "
    "increment, the kept base value and the touched weight, each counted once. apply reads index, "
    "weight and increment and writes kept value and weight; restore reads index and kept value "
    "and writes the weight: 2 x bytes of traffic in all, the same as copy_ of `bytes` contiguous "
    "bytes (read once, written once). Cache lines pulled in around scattered entries are not "
    "counted: the reference is the limit for the useful bytes only."
)
LINES_DEFINITION = (
    "line bytes = half the traffic of a cache-line memory system: indices (read by apply and by "
    "restore), increments (read once), kept values (written, then read) and every distinct touched "
    "64-byte line of the weights 4 times (apply reads and writes it, restore reads and writes it: "
    "a partial-line write reads the line first); a copy_ of `line bytes` moves that traffic "
    "contiguously."
)


@dataclass
class Row:
    base: str
    dtype: str
    backend: str  # "kernel" (compiled) or "torch" (index ops)
    threads: int
    density: float
    nnz: int
    bytes: int
    lines: int  # distinct 64-byte lines of the weights touched
    line_bytes: int
    swap_ms: float  # median apply+restore
    copy_ms: float  # median contiguous copy_ of `bytes`
    lines_ms: float  # median contiguous copy_ of `line_bytes`
    ratio: float  # swap_ms / copy_ms: the stated goal is <= 2
    ratio_lines: float  # swap_ms / lines_ms
    swap_min_ms: float
    copy_min_ms: float
    swap_gbps: float  # 2 * bytes / swap time
    copy_gbps: float


def machine(device: str) -> dict[str, object]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "device": device,
        # other work on the machine skews timings (most of all with torch_threads > 1)
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def interleaved_ms(fns: dict[str, Callable[[], None]], repeats: int, warmup: int,
                   device: str) -> dict[str, list[float]]:
    """Times of each function, one of each per round, in ms."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[key].append((time.perf_counter() - start) * 1e3)
    return times


class PerTensor:
    """The baseline: the swap as first written (before the flat layout and the kernel): per
    tensor, int64 indices, `saved = flat.index_select(0, idx)`, `flat.index_copy_(0, idx,
    saved + inc)`; restore by index_copy_ of the saved values."""

    backend = "per-tensor"

    def __init__(self, base, prepared) -> None:
        self.items = [(base.params[n].data.view(-1), i.long(), v)
                      for n, i, v in zip(prepared.names, prepared.idx, prepared.inc, strict=True)]
        self.kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def apply(self, _prepared) -> None:
        for flat, idx, inc in self.items:
            saved = flat.index_select(0, idx)
            self.kept.append((flat, idx, saved))
            flat.index_copy_(0, idx, saved + inc)

    def restore(self) -> None:
        for flat, idx, saved in reversed(self.kept):
            flat.index_copy_(0, idx, saved)
        self.kept = []


def touched_lines(base, prepared) -> int:
    """Distinct 64-byte lines of the live weights that the delta's entries fall in."""
    total = 0
    for part in prepared.plan.parts:
        buf = base.layout.buffers[part.dtype]
        off, _, end = part.segs
        counts = torch.diff(end, prepend=end.new_zeros(1))
        where = part.idx.long().cpu() + torch.repeat_interleave(off, counts)
        line = (buf.data_ptr() + where * buf.element_size()) // 64
        total += int(line.numel() > 0) + int((line[1:] != line[:-1]).sum())
    return total


def bench_base(name: str, densities: list[float], args: argparse.Namespace) -> list[Row]:
    base = load_base(name, device=args.device, dtype=args.dtype)
    rows = []
    for density in densities:
        prepared = prepare(random_delta(base, density, seed=args.seed), base, name="bench")
        nbytes = sum(i.numel() * (i.element_size() + 3 * v.element_size())
                     for i, v in zip(prepared.idx, prepared.inc, strict=True))
        lines = touched_lines(base, prepared)
        stream = sum(i.numel() * (2 * i.element_size() + 3 * v.element_size())
                     for i, v in zip(prepared.idx, prepared.inc, strict=True))
        line_bytes = (stream + 4 * 64 * lines) // 2
        refs = {}
        for key, size in (("copy", nbytes), ("lines", line_bytes)):
            src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=base.device)
            refs[key] = (lambda d=torch.empty_like(src), s=src: d.copy_(s))
        # timed on its own: a copy of hundreds of MB between swaps would evict the weights
        lines_ms = statistics.median(interleaved_ms({"lines": refs.pop("lines")}, args.repeats,
                                                    args.warmup, args.device)["lines"])
        for backend in args.backends.split(","):
            sw = PerTensor(base, prepared) if backend == "per-tensor" else Swapper(base, backend)

            def swap(sw=sw, prepared=prepared) -> None:
                sw.apply(prepared)
                sw.restore()

            t = interleaved_ms({"swap": swap, **refs}, args.repeats, args.warmup, args.device)
            med = {k: statistics.median(v) for k, v in t.items()} | {"lines": lines_ms}
            rows.append(Row(
                base=name, dtype=str(base.dtype).removeprefix("torch."), backend=sw.backend,
                threads=torch.get_num_threads(), density=density, nnz=prepared.nnz, bytes=nbytes,
                lines=lines, line_bytes=line_bytes, swap_ms=med["swap"], copy_ms=med["copy"],
                lines_ms=med["lines"], ratio=med["swap"] / med["copy"],
                ratio_lines=med["swap"] / med["lines"], swap_min_ms=min(t["swap"]),
                copy_min_ms=min(t["copy"]), swap_gbps=2 * nbytes / med["swap"] / 1e6,
                copy_gbps=2 * nbytes / med["copy"] / 1e6))
            print(_format_row(rows[-1]), flush=True)
        del refs, prepared
    return rows


HEADER = (f"{'base':<14} {'dtype':<8} {'backend':<10} {'density':>8} {'nnz':>10} {'MB':>7} "
          f"{'apply+restore ms':>17} {'copy_ ms':>9} {'ratio':>6} {'(min)':>6} {'lines ms':>9} "
          f"{'ratio':>6} {'GB/s swap':>10} {'GB/s copy':>10}")


def _format_row(r: Row) -> str:
    return (f"{r.base:<14} {r.dtype:<8} {r.backend:<10} {r.density:>8.2%} {r.nnz:>10,} "
            f"{r.bytes / 1e6:>7.2f} {r.swap_ms:>17.3f} {r.copy_ms:>9.3f} {r.ratio:>6.2f} "
            f"{r.swap_min_ms / r.copy_min_ms:>6.2f} {r.lines_ms:>9.3f} {r.ratio_lines:>6.2f} "
            f"{r.swap_gbps:>10.2f} {r.copy_gbps:>10.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bases", default="minilm,smollm2-135m", help="comma-separated bases")
    p.add_argument("--densities", default="0.001,0.01,0.05", help="comma-separated fractions")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repeats first")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", default="auto",
                   help="comma-separated Swapper backends: auto, kernel, torch (auto: the kernel "
                        "on CPU where it builds), and per-tensor: the baseline, the swap as first "
                        "written (torch index ops per tensor, int64 indices)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    densities = [float(d) for d in args.densities.split(",")]
    info = machine(args.device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if float(info["loadavg_1min"]) >= 0.5 * int(info["usable_cores"]):  # type: ignore[arg-type]
        print("WARNING: the machine is busy (load average vs cores): timings are unreliable, "
              "most of all with torch_threads > 1; rerun on an idle machine or with --threads 1")
    print(f"timing: median of {args.repeats} interleaved rounds after {args.warmup} warm-up, "
          f"seed {args.seed}")
    print("bytes:", BYTES_DEFINITION)
    print("lines:", LINES_DEFINITION)
    print("ratio = apply+restore time / copy_ time of `bytes` (1.0 = at the memory-speed limit; "
          "the goal is <= 2); (min) = the same with the fastest round of each; the second ratio "
          "is against the copy_ of `line bytes`\n")
    print(HEADER)
    rows = [r for name in args.bases.split(",") for r in bench_base(name, densities, args)]
    info["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    print(f"\nload average (1 min) after the run: {info['loadavg_1min_after']}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "bytes_definition": BYTES_DEFINITION,
                                         "lines_definition": LINES_DEFINITION,
                                         "repeats": args.repeats, "warmup": args.warmup,
                                         "rows": [asdict(r) for r in rows]}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
