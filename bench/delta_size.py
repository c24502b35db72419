"""Bytes per nonzero of a delta file, plain against compact (gap-varint), and the time to read it.

For each base, values dtype and density: a random delta (`random_delta`, the same density in every
tensor; its increments in the base dtype), written both ways with `dumps`. Prints the whole file's
bytes (header, metadata and heads included) over the nonzeros, and the median time of `loads`
(parse, decode, checksum) over --repeats, the two encodings interleaved. The goal is <= 3.5 bytes
per nonzero at 1 % density with bf16 values.

    python bench/delta_size.py
    python bench/delta_size.py --bases minilm --dtypes bfloat16 --densities 0.01 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from taskdelta.deltas import dumps, load_base, loads, random_delta  # noqa: E402

GOAL = 3.5


def measure(base_name: str, dtype: str, densities: list[float], repeats: int) -> list[dict]:
    base = load_base(base_name, device="cpu", dtype=dtype)
    rows = []
    for density in densities:
        delta = random_delta(base, density, seed=0)
        files = {enc: dumps(delta, encoding=enc) for enc in ("plain", "compact")}
        times: dict[str, list[float]] = {enc: [] for enc in files}
        for _ in range(repeats):
            for enc, data in files.items():
                start = time.perf_counter()
                loads(data)
                times[enc].append((time.perf_counter() - start) * 1e3)
        row = {"base": base_name, "values": dtype, "density": density, "nnz": delta.nnz,
               **{f"{enc}_bytes": len(data) for enc, data in files.items()},
               **{f"{enc}_per_nnz": len(data) / delta.nnz for enc, data in files.items()},
               **{f"{enc}_loads_ms": statistics.median(t) for enc, t in times.items()}}
        rows.append(row)
        print(f"{base_name:<14} {dtype:<9} {density:>7.2%} {delta.nnz:>10,} "
              f"{row['plain_per_nnz']:>10.3f} {row['compact_per_nnz']:>12.3f} "
              f"{row['plain_loads_ms']:>9.1f} {row['compact_loads_ms']:>11.1f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bases", default="minilm,smollm2-135m")
    p.add_argument("--dtypes", default="bfloat16,float32", help="base (and so values) dtypes")
    p.add_argument("--densities", default="0.001,0.01,0.05")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    densities = [float(d) for d in args.densities.split(",")]
    print(f"loadavg_1min {os.getloadavg()[0]:.2f}, torch {torch.__version__}, "
          f"median of {args.repeats} loads per file; bytes per nonzero = whole file / nnz\n")
    print(f"{'base':<14} {'values':<9} {'density':>7} {'nnz':>10} {'plain B/nnz':>10} "
          f"{'compact B/nnz':>12} {'plain ms':>9} {'compact ms':>11}")
    rows = [r for b in args.bases.split(",") for dt in args.dtypes.split(",")
            for r in measure(b, dt, densities, args.repeats)]
    goal = [r for r in rows if r["values"] == "bfloat16" and r["density"] == 0.01]
    for r in goal:
        verdict = "met" if r["compact_per_nnz"] <= GOAL else "NOT met"
        print(f"\ngoal <= {GOAL} bytes per nonzero at 1 % with bf16 values, {r['base']}: "
              f"{r['compact_per_nnz']:.3f} ({verdict})")
    if args.json:
        args.json.write_text(json.dumps({"goal_bytes_per_nnz": GOAL, "rows": rows}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
