"""Apply+restore time of the in-place swap, side by side with the memory-speed limit.

For each base and density: a random delta (`random_delta`, the same density in every tensor),
`prepare()`d once; then the median of --repeats timed `apply(); restore()` pairs after --warmup
untimed ones. The reference is a contiguous `dst.copy_(src)` of the same number of bytes, timed the
same way. See BYTES_DEFINITION for what "the same number of bytes" means.

    python bench/swap.py                      # both defaults at 0.1 %, 1 %, 5 %
    python bench/swap.py --bases minilm --densities 0.01 --repeats 50 --json out.json
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
    "bytes = sum over touched entries of (index + 3 x value): the index (as prepared: int64), the "
    "increment, the kept base value and the touched weight, each counted once. apply reads index, "
    "weight and increment and writes kept value and weight; restore reads index and kept value "
    "and writes the weight: 2 x bytes of traffic in all, the same as copy_ of `bytes` contiguous "
    "bytes (read once, written once). Cache lines pulled in around scattered entries are not "
    "counted: the reference is the limit for the useful bytes only."
)


@dataclass
class Row:
    base: str
    dtype: str
    density: float
    nnz: int
    bytes: int
    swap_ms: float  # median apply+restore
    copy_ms: float  # median contiguous copy_ of `bytes`
    ratio: float  # swap_ms / copy_ms
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


def median_ms(fn: Callable[[], None], repeats: int, warmup: int, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench_base(name: str, densities: list[float], args: argparse.Namespace) -> list[Row]:
    base = load_base(name, device=args.device, dtype=args.dtype)
    rows = []
    for density in densities:
        prepared = prepare(random_delta(base, density, seed=args.seed), base, name="bench")
        sw = Swapper(base)
        nbytes = sum(i.numel() * (i.element_size() + 3 * v.element_size())
                     for i, v in zip(prepared.idx, prepared.inc, strict=True))

        def swap(sw: Swapper = sw, prepared=prepared) -> None:
            sw.apply(prepared)
            sw.restore()

        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=base.device)
        dst = torch.empty_like(src)
        swap_ms = median_ms(swap, args.repeats, args.warmup, args.device)
        copy_ms = median_ms(lambda d=dst, s=src: d.copy_(s), args.repeats, args.warmup, args.device)
        rows.append(Row(base=name, dtype=str(base.dtype).removeprefix("torch."), density=density,
                        nnz=prepared.nnz, bytes=nbytes, swap_ms=swap_ms, copy_ms=copy_ms,
                        ratio=swap_ms / copy_ms, swap_gbps=2 * nbytes / swap_ms / 1e6,
                        copy_gbps=2 * nbytes / copy_ms / 1e6))
        print(_format_row(rows[-1]), flush=True)
        del src, dst, prepared, sw
    return rows


HEADER = (f"{'base':<14} {'dtype':<8} {'density':>8} {'nnz':>10} {'MB':>8} "
          f"{'apply+restore ms':>17} {'copy_ ms':>9} {'ratio':>7} {'GB/s swap':>10} "
          f"{'GB/s copy':>10}")


def _format_row(r: Row) -> str:
    return (f"{r.base:<14} {r.dtype:<8} {r.density:>8.2%} {r.nnz:>10,} {r.bytes / 1e6:>8.2f} "
            f"{r.swap_ms:>17.3f} {r.copy_ms:>9.3f} {r.ratio:>7.1f} {r.swap_gbps:>10.2f} "
            f"{r.copy_gbps:>10.2f}")


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
    print(f"timing: median of {args.repeats} after {args.warmup} warm-up, seed {args.seed}")
    print("bytes:", BYTES_DEFINITION)
    print("ratio = apply+restore time / copy_ time (1.0 = at the memory-speed limit)\n")
    print(HEADER)
    rows = [r for name in args.bases.split(",") for r in bench_base(name, densities, args)]
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "bytes_definition": BYTES_DEFINITION,
                                         "repeats": args.repeats, "warmup": args.warmup,
                                         "rows": [asdict(r) for r in rows]}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
