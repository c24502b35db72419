"""Quality of sparse deltas against full fine-tuning, measured through the serving path.

For each task (a TSV in ../shared/data) and the `minilm` base: full fine-tuning; PEFT LoRA at the
rank matching a 1 % delta's entries; `taskdelta delta train`'s default recipe (dense-extract) at each
density, and with block masks; sparse training from scratch (grad and fisher masks); extraction of
the top 1 % of the full fine-tune, with and without refit. Every model is scored on the same seeded
validation split carved from the training file, through the serving path: the delta's bytes are
parsed and validated, `prepare`d, swapped into the base in place by `Swapper`, and run by the
server's `classify()` (`score()` for a regress task such as STS-B; full fine-tuning and LoRA too,
as a dense delta of every changed entry). Writes quality.md, quality.json and quality.png in --out.

    bench/quality_table.sh                                 # the documented table: its runs, merged (~2 h)
    python bench/quality.py --tasks sst2 --seed 1 --out /tmp/q      # one task, one seed, every method
    python bench/quality.py --tasks sst2 --steps 40 --val-size 200 --out /tmp/q   # a quick look
    python bench/quality.py --report-only                  # re-render docs/ from docs/quality.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from taskdelta.deltas import Swapper, dumps, extract, load_base, loads, prepare, validate  # noqa: E402
from taskdelta.deltas.masks import mask_from_scores  # noqa: E402
from taskdelta.deltas.recipe import (  # noqa: E402
    DENSE_EXTRACT_LR,
    DENSE_EXTRACT_LR_1D,
    load_task_data,
    sparse_lr,
)
from taskdelta.deltas.train import (  # noqa: E402
    DenseExtract,
    TrainConfig,
    fit,
    gradient_scores,
    probe_head,
    refit,
    train_dense_extract,
    train_full,
    train_sparse,
)
from taskdelta.server.inference import classify  # noqa: E402
from taskdelta.server.jobs import ClassifyJob  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported by path
from quality_regress import serve_regress  # noqa: E402
from quality_report import (  # noqa: E402
    DATA,
    DEFAULT_TASKS,
    ROOT,
    TASKS,
    Result,
    TaskSpec,
    load_results,
    log,
    write_report,
)


def serve_score(base, delta, texts: list, labels: list, metric: str,
                batch: int = 64) -> tuple[float, float]:
    """(score, accuracy) of `delta` swapped into `base`, run by the server's classify(); a regress
    task (metric pearson): (Pearson, Spearman) of the server's score() outputs, both x 100."""
    if metric == "pearson":
        m = serve_regress(base, delta, texts, labels, batch)
        return 100 * m["pearson"], 100 * m["spearman"]
    delta = loads(dumps(delta))  # the bytes a client uploads
    validate(delta, base)
    prepared = prepare(delta, base, name="bench")
    preds: list[int] = []
    with Swapper(base).swapped(prepared) as model:
        for s in range(0, len(texts), batch):
            job = ClassifyJob(tuple(texts[s:s + batch]))
            (out,) = classify(model, base.tokenizer, prepared.labels, [job])
            preds += [prepared.labels.index(r["label"]) for r in out]
    acc = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)
    return (100 * mcc(preds, labels) if metric == "mcc" else 100 * acc), 100 * acc


LORA_TARGETS = ("query", "key", "value", "dense")  # every linear of a BERT encoder (and its pooler)


def lora_rank(shapes: list[tuple[int, int]], nnz: int) -> int:
    """The LoRA rank whose trainable entries come closest to `nnz`: a rank-r adapter on an
    [out, in] matrix trains r * (in + out) entries (A: [r, in], B: [out, r])."""
    per_rank = sum(o + i for o, i in shapes)
    return max(1, round(nnz / per_rank))


class LoraTaskModel:
    """PEFT LoRA on every linear of the task network (a private copy), with the dense head trained
    alongside; `fit` trains it like the others. Scored by merging into that copy (`merged`)."""

    def __init__(self, base, labels: list[str], rank: int, seed: int = 0, kind: str = "classify") -> None:
        from peft import LoraConfig, get_peft_model

        from taskdelta.deltas.train import FullTaskModel

        self.base, self.kind, self.labels, self.rank = base, kind, list(labels), rank
        full = FullTaskModel(base, kind, labels, seed=seed)
        self._shapes = [tuple(m.weight.shape) for n, m in full.net.named_modules()
                        if isinstance(m, torch.nn.Linear) and n.endswith(LORA_TARGETS)]
        torch.manual_seed(seed)
        self.net = get_peft_model(full.net.requires_grad_(False), LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
            modules_to_save=["classifier"]))
        self.lora = [p for n, p in self.net.named_parameters() if p.requires_grad and "lora_" in n]
        self.head = [p for n, p in self.net.named_parameters() if p.requires_grad and "lora_" not in n]

    def shapes(self) -> list[tuple[int, int]]:
        """[out, in] of every adapted matrix."""
        return list(self._shapes)

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.lora)

    def stored_bytes(self) -> int:
        """fp32 adapter + head entries: what a LoRA task costs to store (safetensors headers aside)."""
        return 4 * (self.trainable + sum(p.numel() for p in self.head))

    def __call__(self, **inputs):
        return self.net(**inputs)

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        return [{"params": self.lora, "lr": cfg.lr, "weight_decay": 0.0},
                {"params": self.head, "lr": cfg.head_lr, "weight_decay": 0.0}]

    def train(self, mode: bool) -> None:
        self.net.train(mode)

    def merged(self):
        return self.net.merge_and_unload()


def mcc(preds: list[int], labels: list[int]) -> float:
    """Matthews correlation of a binary task."""
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels, strict=True))
    tn = sum(p == 0 and y == 0 for p, y in zip(preds, labels, strict=True))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels, strict=True))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels, strict=True))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def run_task(base, name: str, spec: TaskSpec, args: argparse.Namespace, results: list[Result],
             flush: Callable[[], None]) -> None:
    """Append each of the task's results to `results` as it is measured, calling `flush` after each."""
    t0 = time.perf_counter()
    kind = spec.kind
    data = load_task_data(base, DATA / spec.file, kind, text_col=spec.text, label_col=spec.label,
                          pair_col=spec.pair, val_size=args.val_size,
                          train_size=args.train_size or spec.train_size, max_length=args.max_length,
                          seed=args.seed)
    steps = args.steps or args.epochs * -(-len(data.train) // args.batch_size)
    common = TrainConfig(batch_size=args.batch_size, max_length=args.max_length, max_steps=steps,
                         seed=args.seed, head_lr=args.head_lr)
    log(f"{name}: {len(data.train)} train / {len(data.val)} validation examples, {steps} steps of "
        f"{args.batch_size}, labels {data.labels}")

    def record(method: str, target: float, delta, trained, seconds: float, stored: int | None = None) -> None:
        score, acc = serve_score(base, delta, data.val_texts, data.val_labels, spec.metric)
        size = stored if stored is not None else len(dumps(delta))
        compact = len(dumps(delta, encoding="compact")) if stored is None else None
        r = Result(name, method, target, round(delta.meta.provenance.density, 6), round(score, 2),
                   round(acc, 2), size, round(trained.train_loss, 4) if trained else None, round(seconds, 1),
                   compact, args.seed, steps)
        results.append(r)
        flush()
        log(f"  {r.column:<20} {spec.metric} {r.score:6.2f}  ({r.bytes / 1e6:8.2f} MB, loss "
            f"{r.train_loss}, {r.seconds:.0f} s)")

    full = None
    if "full" in args.methods:
        t = time.perf_counter()
        full = train_full(base, kind, data.labels, data.train, replace(common, lr=args.full_lr))
        dense = extract(base, full.model.net, 1.0)  # every changed entry: the full fine-tune, served
        checkpoint = 4 * sum(p.numel() for p in full.model.net.parameters())
        record("full", 1.0, dense, full, time.perf_counter() - t, stored=checkpoint)
        del dense

    if full is not None and "extract" in args.methods:
        t = time.perf_counter()
        extracted = extract(base, full.model.net, args.extract_density)
        record("extract", args.extract_density, extracted, None, time.perf_counter() - t)
        t = time.perf_counter()
        refitted = refit(base, extracted, data.train,
                         replace(common, lr=args.refit_lr, head_lr=args.refit_head_lr))
        record("extract+refit", args.extract_density, refitted.model.to_delta("extract+refit"), refitted,
               time.perf_counter() - t)
        del full

    if "lora" in args.methods:  # PEFT LoRA, rank matched to a 1 % delta's entries
        t = time.perf_counter()
        shapes = LoraTaskModel(base, data.labels, 1, kind=kind).shapes()
        rank = lora_rank(shapes, round(args.extract_density * base.numel))
        lm = LoraTaskModel(base, data.labels, rank, seed=args.seed, kind=kind)
        trained = fit(lm, data.train, replace(common, lr=args.lora_lr))
        merged = extract(base, lm.merged(), 1.0, kind=kind, labels=data.labels)  # served dense
        record("lora", args.extract_density, merged, trained, time.perf_counter() - t,
               stored=lm.stored_bytes())
        del merged, lm

    for density in args.densities if "dense-extract" in args.methods else ():
        for block in args.blocks if args.blocks_only else (None, *args.blocks):
            t = time.perf_counter()
            trained = train_dense_extract(base, kind, data.labels, data.train,
                                          replace(common, lr=sparse_lr(density, args.de_lr),
                                                  lr_1d=args.de_lr_1d),
                                          DenseExtract(density=density, dense_fraction=args.dense_fraction,
                                                       dense_lr=args.full_lr, block=block))
            method = "dense-extract" if block is None else "dense-extract-block"
            record(method, density, trained.model.to_delta(method, block=block), trained,
                   time.perf_counter() - t)

    if "sparse" in args.methods:
        t = time.perf_counter()
        probe_steps = math.ceil(args.probe_epochs * len(data.train) / args.batch_size)
        heads = (probe_head(base, kind, data.labels, data.train, common, probe_steps, args.probe_lr)
                 if probe_steps else None)
        scores = gradient_scores(base, kind, data.labels, data.train, common, args.mask_batches,
                                 heads=heads)
        score_s = time.perf_counter() - t
        for density in args.densities:  # in the order given: a run cut short has the first ones
            for mask_kind in args.masks:
                t = time.perf_counter()
                mask = mask_from_scores(mask_kind, scores, density, exclude=args.exclude)
                trained = train_sparse(base, kind, data.labels, data.train, mask,
                                       replace(common, lr=sparse_lr(density, args.sparse_lr)), heads=heads)
                delta = trained.model.to_delta("sparse-train", mask=mask_kind, target_density=density)
                record(mask_kind, density, delta, trained, time.perf_counter() - t + score_s)
        del scores

    log(f"{name}: {time.perf_counter() - t0:.0f} s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--train-size", type=int, default=None, help="training examples per task "
                   "(default: per task, see TASKS in quality_report.py)")
    p.add_argument("--val-size", type=int, default=500, help="validation examples carved per task")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--densities", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.001, 0.005, 0.01])
    p.add_argument("--masks", type=lambda s: s.split(","), default=["grad", "fisher"])
    p.add_argument("--methods", type=lambda s: s.split(","),
                   default=["full", "lora", "dense-extract", "sparse", "extract"],
                   help="which of full, lora (PEFT, rank matched to --extract-density), dense-extract "
                        "(the `train` default), sparse (masks from scratch), extract (needs full)")
    p.add_argument("--dense-fraction", type=float, default=0.25,
                   help="dense-extract: share of the steps trained densely (at --full-lr)")
    p.add_argument("--de-lr", type=float, default=DENSE_EXTRACT_LR,
                   help="dense-extract: the sparse phase's lr at 1 %% density (matrices; scaled by "
                        "1 %% / density, at most 1e-2)")
    p.add_argument("--de-lr-1d", type=float, default=DENSE_EXTRACT_LR_1D,
                   help="dense-extract: the sparse phase's lr in 1-D tensors (biases, norms)")
    p.add_argument("--blocks", type=lambda s: [int(x) for x in s.split(",") if x], default=[16],
                   help="dense-extract: also run block masks of these run lengths (at each density)")
    p.add_argument("--blocks-only", action="store_true",
                   help="dense-extract: run only the block masks of --blocks, not single entries")
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--mask-batches", type=int, default=16)
    p.add_argument("--probe-epochs", type=float, default=0.0,
                   help="sparse runs: train a fresh head alone (frozen base) for this many epochs first; "
                        "masks are scored and sparse training starts from the probed head")
    p.add_argument("--probe-lr", type=float, default=1e-2, help="head learning rate of the probe")
    p.add_argument("--exclude", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="grad/fisher masks: tensors whose name contains one of these get no entries")
    p.add_argument("--extract-density", type=float, default=0.01)
    p.add_argument("--full-lr", type=float, default=1e-4)
    p.add_argument("--sparse-lr", type=float, default=1e-3,
                   help="at 1 %% density; scaled by 1 %% / density, at most 1e-2")
    p.add_argument("--refit-lr", type=float, default=1e-3)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--refit-head-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for quality.md/.json/.png")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: render quality.md and .png again from OUT/quality.json")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                   help="train nothing: render one report in OUT from the quality.json of runs made side "
                        "by side on different --tasks (same settings otherwise)")
    args = p.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.report_only:
        results, saved, minutes, command = load_results(args.out / "quality.json")
        saved = argparse.Namespace(**{**saved, "out": args.out})
        write_report(args.out, results, saved, saved.tasks.split(","), minutes, command)
        log(f"wrote {args.out}/quality.md, quality.png from quality.json")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    known = {"full", "lora", "dense-extract", "sparse", "extract"}
    if unknown_methods := set(args.methods) - known:
        p.error(f"unknown methods {sorted(unknown_methods)}; known: {', '.join(sorted(known))}")
    if "extract" in args.methods and "full" not in args.methods:
        p.error("extract takes its entries from the full fine-tune: --methods must include full")
    names = args.tasks.split(",")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        p.error(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    t0 = time.perf_counter()
    base = load_base("minilm", device="cpu")
    results: list[Result] = []
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/quality.py", *(argv if argv is not None else sys.argv[1:])])

    def flush() -> None:  # after every result: a run cut short still leaves what it measured
        done = [n for n in names if any(r.task == n for r in results)]
        write_report(args.out, results, args, done, (time.perf_counter() - t0) / 60, command)

    for name in names:
        run_task(base, name, TASKS[name], args, results, flush)
    minutes = (time.perf_counter() - t0) / 60
    log(f"wrote {args.out}/quality.md, quality.json, quality.png in {minutes:.1f} min")


MERGE_FREE = ("tasks", "out", "threads", "methods", "densities", "masks", "blocks", "blocks_only", "seed",
              "steps", "lora_lr", "lora_lrs", "commands")  # may differ between merged runs
METHOD_SETTINGS = {  # settings only these methods read: runs that did not run one may differ there
    "dense-extract": ("de_lr", "de_lr_1d", "dense_fraction"),
    "extract": ("refit_lr", "refit_head_lr"),
    "sparse": ("sparse_lr", "mask_batches", "probe_epochs", "probe_lr", "exclude"),
}


def _unused(key: str, methods: list[str]) -> bool:
    """Whether a run of `methods` never read setting `key`."""
    return any(key in keys and method not in methods for method, keys in METHOD_SETTINGS.items())


def merge(dirs: list[Path], out: Path) -> None:
    """One report from runs made side by side: disjoint tasks, the same tasks with disjoint columns
    (e.g. --densities 0.01 and --methods sparse --densities 0.005,0.001), or other seeds and step
    counts (cells are then means over seeds). Settings a run's methods never read (`METHOD_SETTINGS`,
    e.g. --de-lr in a run without dense-extract) may differ. Its time is the runs' total."""
    runs = [load_results(d / "quality.json") for d in dirs]
    settings = runs[0][1]  # the shared settings, then each method's from the first run that ran it
    for method, keys in METHOD_SETTINGS.items():
        if ran := [saved for _, saved, _, _ in runs if method in saved["methods"]]:
            settings = {**settings, **{k: ran[0][k] for k in keys if k in ran[0]}}
    for d, (_, saved, _, _) in zip(dirs, runs, strict=True):
        if differ := [k for k in settings if k not in MERGE_FREE and not _unused(k, saved["methods"])
                      and saved.get(k) != settings[k]]:
            raise SystemExit(f"{d}: not the same settings as the other runs: {differ}")
    results = [r for res, _, _, _ in runs for r in res]
    if len({(r.task, r.column, r.seed) for r in results}) != len(results):
        raise SystemExit("the runs overlap: a (task, column, seed) appears twice")
    order = DEFAULT_TASKS.split(",") + [t for t in TASKS if t not in DEFAULT_TASKS.split(",")]
    names = sorted({n for _, saved, _, _ in runs for n in saved["tasks"].split(",")}, key=order.index)
    results.sort(key=lambda r: names.index(r.task))
    densities = sorted({d for _, saved, _, _ in runs for d in saved["densities"]})
    masks = list(dict.fromkeys(m for _, saved, _, _ in runs for m in saved["masks"]))
    args = argparse.Namespace(**{**settings, "tasks": ",".join(names), "out": out, "densities": densities,
                                 "masks": masks, "seed": min(r.seed for r in results)})
    minutes = sum(m for _, _, m, _ in runs)
    command = (" & ".join(c for _, _, _, c in runs) + "  # side by side" if len(runs) <= 3 else
               f"{len(runs)} runs of bench/quality.py, as bench/quality_table.sh runs them, merged with "
               "--merge (their commands: quality.json)")
    args.commands = [c for _, _, _, c in runs]
    args.lora_lrs = {n: lr for _, saved, _, _ in runs if "lora" in saved["methods"]  # where LoRA ran
                     for n, lr in saved.get("lora_lrs", dict.fromkeys(saved["tasks"].split(","),
                                                                      saved["lora_lr"])).items()}
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, results, args, names, minutes, command)
    log(f"wrote {out}/quality.md, quality.json, quality.png from {len(dirs)} runs")


if __name__ == "__main__":
    main()
