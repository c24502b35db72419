"""Regress tasks (STS-B) for the quality bench: score a delta through the serving path, and a
quick run comparing sparse training with full fine-tuning at the same budget.

`serve_regress` is what bench/quality.py can call for a regress task, as it calls `serve_score`
for a classify one: the delta's bytes are parsed and validated, `prepare`d, swapped into the base
in place by `Swapper`, and run by the server's `score()` (the score route's code); Pearson and
Spearman of its outputs against the targets.

    OMP_NUM_THREADS=1 python bench/quality_regress.py --steps 300      # minilm on STS-B
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from taskdelta.deltas import Swapper, dumps, extract, load_base, loads, prepare, validate
from taskdelta.deltas.masks import mask_from_scores
from taskdelta.deltas.recipe import load_task_data, sparse_lr
from taskdelta.deltas.train import (
    TrainConfig,
    gradient_scores,
    regression_metrics,
    train_full,
    train_sparse,
)
from taskdelta.server.inference import score

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TASKDELTA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def serve_regress(base, delta, texts: list, targets: list[float], batch: int = 64) -> dict[str, float]:
    """{"pearson", "spearman", "loss"} of `delta` swapped into `base`, run by the server's score()."""
    delta = loads(dumps(delta))  # the bytes a client uploads
    validate(delta, base)
    prepared = prepare(delta, base, name="bench")
    with Swapper(base).swapped(prepared) as model:
        preds = score(model, base.tokenizer, texts, batch)
    return regression_metrics(preds, targets)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="minilm")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--full-lr", type=float, default=1e-4)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--methods", default="sparse,full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    base = load_base(args.base, device="cpu")
    data = load_task_data(base, DATA / "stsb" / "train.tsv", "regress", text_col="sentence1",
                          pair_col="sentence2", label_col="score", val_size=args.val_size, seed=args.seed)
    common = TrainConfig(batch_size=args.batch_size, max_steps=args.steps, head_lr=args.head_lr,
                         seed=args.seed)
    print(f"stsb: {len(data.train)} train / {len(data.val)} validation, {args.steps} steps of "
          f"{args.batch_size}, torch threads {torch.get_num_threads()}", flush=True)
    results = []
    for method in args.methods.split(","):
        t = time.perf_counter()
        if method == "full":
            trained = train_full(base, "regress", data.labels, data.train, replace(common, lr=args.full_lr))
            delta = extract(base, trained.model.net, 1.0)  # every changed entry, served as a delta
        else:
            cfg = replace(common, lr=sparse_lr(args.density))
            scores = gradient_scores(base, "regress", data.labels, data.train, cfg, 16)
            mask = mask_from_scores("grad", scores, args.density)
            trained = train_sparse(base, "regress", data.labels, data.train, mask, cfg)
            delta = trained.model.to_delta("sparse-train", mask="grad", target_density=args.density)
        m = serve_regress(base, delta, data.val_texts, list(data.val_labels))
        row = {"method": method, "density": round(delta.meta.provenance.density, 6),
               "pearson": round(100 * m["pearson"], 2), "spearman": round(100 * m["spearman"], 2),
               "val_mse": round(m["loss"], 4), "train_loss": round(trained.train_loss, 4),
               "steps": trained.steps, "seconds": round(time.perf_counter() - t, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
