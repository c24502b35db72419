"""Apply+restore time of the in-place swap, side by side with the memory-speed limit.

For each base, dtype, mask and density: a delta with that density in every tensor, `prepare()`d
once; then --repeats rounds after --warmup untimed ones, each round timing one `apply();
restore()` pair per contender and, right after them, the reference: a contiguous `dst.copy_(src)`
of the same number of bytes. Interleaving puts every contender and the reference under the same
load from other work on the machine; medians over the rounds are reported. The contenders are the
Swapper's backends (--backends) and builds of the kernel with other tuning knobs (--variants),
each at every thread count of --threads. Two references:

- `copy_` (BYTES_DEFINITION): the useful bytes only. The goal "apply+restore <= 2x" is stated
  against this one.
- `lines` (LINES_DEFINITION): the bytes a cache-line memory system must move for scattered writes
  (every touched 64-byte line of the weights, not just its 2 or 4 useful bytes). Its copy is
  timed in rounds of its own: at 5 % density it moves hundreds of MB, which between two swaps
  would evict the weights from the caches. `lines / bytes` is then the least ratio a swap can
  reach where the touched lines do not stay in the caches between swaps.

Masks: `random` (`random_delta`: entries spread uniformly, as sparse fine-tuning's masks are; at
<= 5 % nearly every entry is alone in its cache line) and `blocks` (the same count of entries in
runs of --block consecutive entries at random places: a structured mask, every line it touches
used whole).

    python bench/swap.py                      # both defaults, fp32 and bf16, 0.1 %, 1 %, 5 %
    python bench/swap.py --bases minilm --densities 0.01 --repeats 50 --json out.json
    python bench/swap.py --backends kernel,torch,index_put,scatter,per-tensor --threads 1
    python bench/swap.py --variants default,TD_AHEAD=16,TD_PREFETCHW=0+TD_RUN=0,int64 --cold
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
from taskdelta.deltas import (  # noqa: E402
    SparseTensor,
    Swapper,
    TaskDelta,
    _kernel,
    default_device,
    load_base,
    prepare,
    random_delta,
)

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
    mask: str  # "random" or "blocks<N>"
    backend: str  # "kernel" (compiled), "torch" (index ops), or a bench-only contender
    variant: str  # "Swapper" (through Swapper.apply/restore), or a build of the kernel called
    # directly ("default", "TD_AHEAD=16", ...; "int64": int64 indices)
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
    loadavg_1min: float  # as the case was timed


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
        # other work on the machine skews timings (most of all with threads > 1)
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def interleaved_ms(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str,
                   flush: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Times of each function, one of each per round, in ms. Each round starts one further along
    the list: the contenders swap the same delta, so whichever runs right after another finds its
    lines in cache, and rotating spreads that over all of them. `flush` (untimed) runs before
    each function: every one then starts with cold caches."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            if flush is not None:
                flush()
                sync()
            start = time.perf_counter()
            fns[key]()
            sync()
            times[key].append((time.perf_counter() - start) * 1e3)
    return times


class SwapperRun:
    def __init__(self, sw: Swapper, prepared) -> None:
        self.sw, self.prepared = sw, prepared

    def apply(self) -> None:
        self.sw.apply(self.prepared)

    def restore(self) -> None:
        self.sw.restore()


class PerTensor:
    """The baseline: the swap as first written (before the flat layout and the kernel): per
    tensor, int64 indices, `saved = flat.index_select(0, idx)`, `flat.index_copy_(0, idx,
    saved + inc)`; restore by index_copy_ of the saved values."""

    def __init__(self, base, prepared) -> None:
        self.items = [(base.params[n].data.view(-1), i.long(), v)
                      for n, i, v in zip(prepared.names, prepared.idx, prepared.inc, strict=True)]
        self.kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def apply(self) -> None:
        for flat, idx, inc in self.items:
            saved = flat.index_select(0, idx)
            self.kept.append((flat, idx, saved))
            flat.index_copy_(0, idx, saved + inc)

    def restore(self) -> None:
        for flat, idx, saved in reversed(self.kept):
            flat.index_copy_(0, idx, saved)
        self.kept = []


class FlatOps:
    """Other torch index ops on the flat buffers (global int64 indices, checked in prepare):
    `scatter`: gather + scatter_; `index_put`: buf[idx] + index_put_."""

    def __init__(self, base, prepared, op: str) -> None:
        self.op = op
        self.items = [(base.layout.buffers[p.dtype], p.global_idx, p.inc) for p in prepared.plan.parts]
        self.kept: list[torch.Tensor] = []

    def apply(self) -> None:
        for buf, idx, inc in self.items:
            saved = buf.gather(0, idx) if self.op == "scatter" else buf[idx]
            self.kept.append(saved)
            self._write(buf, idx, saved + inc)

    def restore(self) -> None:
        for (buf, idx, _), saved in zip(reversed(self.items), reversed(self.kept), strict=True):
            self._write(buf, idx, saved)
        self.kept = []

    def _write(self, buf: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
        if self.op == "scatter":
            buf.scatter_(0, idx, values)
        else:
            buf.index_put_((idx,), values)


class KernelBuild:
    """The kernel calls the Swapper makes, with a given build of the kernel (and index width)."""

    def __init__(self, base, prepared, module, wide: bool) -> None:
        self.module = module
        self.items = [(base.layout.buffers[p.dtype], p.segs, p.idx.long() if wide else p.idx, p.inc,
                       torch.empty_like(p.inc)) for p in prepared.plan.parts]

    def apply(self) -> None:
        for buf, segs, idx, inc, kept in self.items:
            if self.module.apply(buf, segs, idx, inc, kept, torch.get_num_threads()) >= 0:
                raise IndexError("bad index")

    def restore(self) -> None:
        for buf, segs, idx, _, kept in reversed(self.items):
            self.module.restore(buf, segs, idx, kept, torch.get_num_threads())


def parse_variant(spec: str) -> tuple[dict[str, int], bool]:
    """'TD_AHEAD=16+int64' -> ({'TD_AHEAD': 16}, wide indices)."""
    defines, wide = {}, False
    for item in spec.split("+"):
        if item == "int64":
            wide = True
        elif item != "default":
            key, value = item.split("=")
            defines[key] = int(value)
    return defines, wide


def contenders(base, prepared, args) -> dict[str, tuple[str, str, object]]:
    """label -> (backend, variant, an object with apply() and restore())."""
    out: dict[str, tuple[str, str, object]] = {}
    for backend in filter(None, args.backends.split(",")):
        if backend == "per-tensor":
            out[backend] = (backend, "", PerTensor(base, prepared))
        elif backend in ("scatter", "index_put"):
            out[backend] = (backend, "", FlatOps(base, prepared, backend))
        else:
            run = SwapperRun(Swapper(base, backend), prepared)
            out[backend] = (run.sw.backend, "Swapper", run)
    for spec in filter(None, args.variants.split(",")):
        defines, wide = parse_variant(spec)
        module = _kernel.variant(**defines) if defines else _kernel.load()
        if module is None:
            raise SystemExit(f"cannot build the kernel variant {spec!r}")
        out[f"kernel {spec}"] = ("kernel", spec, KernelBuild(base, prepared, module, wide))
    return out


def block_delta(base, density: float, block: int, seed: int) -> TaskDelta:
    """As random_delta (the same count of entries per tensor, the same values), but the entries
    in runs of `block` consecutive ones at random block-aligned places."""
    delta = random_delta(base, density, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for name, sp in delta.tensors.items():
        numel, count = base.params[name].numel(), sp.idx.numel()
        blocks = min(-(-count // block), -(-numel // block))
        starts = torch.randperm(-(-numel // block), generator=gen)[:blocks].sort().values * block
        idx = (starts[:, None] + torch.arange(block)).reshape(-1)
        idx = idx[idx < numel][:count]
        tensors[name] = SparseTensor(idx.to(sp.idx.dtype), sp.val[: idx.numel()])
    return TaskDelta(meta=delta.meta, tensors=tensors, heads=delta.heads)


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


def bench_case(base, name: str, mask: str, density: float, args) -> list[Row]:
    if mask == "random":
        delta = random_delta(base, density, seed=args.seed)
    else:
        delta = block_delta(base, density, args.block, args.seed)
    prepared = prepare(delta, base, name="bench")
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
    if args.cold:  # a copy twice the size of a large L3 evicts the weights' lines
        junk = torch.empty(64 << 20, dtype=torch.uint8, device=base.device)
        refs["flush"] = lambda j=junk, d=torch.empty_like(junk): d.copy_(j)
    rivals = contenders(base, prepared, args)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        # timed on its own: a copy of hundreds of MB between swaps would evict the weights
        lines_ms = statistics.median(interleaved_ms({"lines": refs["lines"]}, args.repeats,
                                                    args.warmup, args.device)["lines"])
        fns: dict[str, Callable[[], None]] = {}
        for label, (_, _, sw) in rivals.items():
            fns[label] = lambda sw=sw: (sw.apply(), sw.restore())  # type: ignore[attr-defined]
        t = interleaved_ms(fns | {"copy": refs["copy"]}, args.repeats, args.warmup, args.device,
                           flush=refs.get("flush"))
        load = round(os.getloadavg()[0], 2)
        copy_ms = statistics.median(t["copy"])
        for label, (backend, variant, _) in rivals.items():
            swap_ms = statistics.median(t[label])
            rows.append(Row(
                base=name, dtype=str(base.dtype).removeprefix("torch."), mask=mask, backend=backend,
                variant=variant, threads=threads, density=density, nnz=prepared.nnz, bytes=nbytes,
                lines=lines, line_bytes=line_bytes, swap_ms=swap_ms, copy_ms=copy_ms,
                lines_ms=lines_ms, ratio=swap_ms / copy_ms, ratio_lines=swap_ms / lines_ms,
                swap_min_ms=min(t[label]), copy_min_ms=min(t["copy"]),
                swap_gbps=2 * nbytes / swap_ms / 1e6, copy_gbps=2 * nbytes / copy_ms / 1e6,
                loadavg_1min=load))
            print(_format_row(rows[-1]), flush=True)
    return rows


HEADER = (f"{'base':<13} {'dtype':<8} {'mask':<8} {'contender':<26} {'thr':>3} {'density':>7} "
          f"{'nnz':>10} {'MB':>7} {'lines/B':>7} {'swap ms':>9} {'copy_ms':>8} {'ratio':>6} "
          f"{'(min)':>6} {'lines ms':>9} {'ratio':>6} {'load':>5}")


def _format_row(r: Row) -> str:
    who = r.backend + (f" {r.variant}" if r.variant else "")
    return (f"{r.base:<13} {r.dtype:<8} {r.mask:<8} {who:<26} {r.threads:>3} {r.density:>7.2%} "
            f"{r.nnz:>10,} {r.bytes / 1e6:>7.2f} {r.line_bytes / r.bytes:>7.2f} {r.swap_ms:>9.3f} "
            f"{r.copy_ms:>8.3f} {r.ratio:>6.2f} {r.swap_min_ms / r.copy_min_ms:>6.2f} "
            f"{r.lines_ms:>9.3f} {r.ratio_lines:>6.2f} {r.loadavg_1min:>5.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bases", default="minilm,smollm2-135m", help="comma-separated bases")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated base dtypes")
    p.add_argument("--densities", default="0.001,0.01,0.05", help="comma-separated fractions")
    p.add_argument("--masks", default="random,blocks", help="random and/or blocks (see above)")
    p.add_argument("--block", type=int, default=64, help="entries per run of a blocks mask")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repeats first")
    p.add_argument("--device", default=default_device())
    p.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                   help="comma-separated torch thread counts, each timed (the kernel splits a long "
                        "run over torch.get_num_threads() threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cold", action="store_true",
                   help="evict the caches (an untimed 64 MB copy) before every timed call, as a "
                        "server's forward pass between two swaps does; default: the same delta "
                        "swapped over and over, its lines partly left in cache")
    p.add_argument("--backends", default="auto",
                   help="comma-separated: the Swapper's auto, kernel, torch (auto: the kernel on CPU "
                        "where it builds); bench-only: scatter and index_put (other torch ops on "
                        "the flat buffers) and per-tensor (the swap as first written: torch index "
                        "ops per tensor, int64 indices)")
    p.add_argument("--variants", default="",
                   help="comma-separated kernel builds timed beside the backends: 'default', or "
                        "'+'-joined -D knobs of deltas/_kernel.py (TD_AHEAD=16+TD_LOCALITY=3) and "
                        "'int64' (the indices widened)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write rows here")
    args = p.parse_args(argv)
    args.threads = ",".join(dict.fromkeys(args.threads.split(",")))  # "1,1" -> "1"
    torch.set_grad_enabled(False)
    info = machine(args.device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if float(info["loadavg_1min"]) >= 0.5 * int(info["usable_cores"]):  # type: ignore[arg-type]
        print("WARNING: the machine is busy (load average vs cores): timings are unreliable, "
              "most of all with threads > 1; rerun on an idle machine or with --threads 1")
    print(f"timing: median of {args.repeats} interleaved rounds after {args.warmup} warm-up, "
          f"seed {args.seed}")
    print("bytes:", BYTES_DEFINITION)
    print("lines:", LINES_DEFINITION)
    print("ratio = apply+restore time / copy_ time of `bytes` (1.0 = at the memory-speed limit; "
          "the goal is <= 2); (min) = the same with the fastest round of each; lines/B = line "
          "bytes / bytes, the ratio a swap whose touched lines miss the caches cannot beat; the "
          "second ratio is against the copy_ of `line bytes`; load = 1-min load average\n")
    print(HEADER)
    rows = []
    for name in args.bases.split(","):
        for dtype in args.dtypes.split(","):
            base = load_base(name, device=args.device, dtype=dtype)
            for mask in args.masks.split(","):
                label = mask if mask == "random" else f"blocks{args.block}"
                for density in [float(d) for d in args.densities.split(",")]:
                    rows += bench_case(base, name, label, density, args)
            del base
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
