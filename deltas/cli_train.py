"""`taskdelta delta train`: fine-tune a sparse mask of base entries (plus a dense head) and write
the delta; and `extract --refit`'s training step."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .cli import (
    TRAINING,
    BaseOpt,
    BatchOpt,
    DecayOpt,
    EncodingOpt,
    EpochsOpt,
    HeadLrOpt,
    LabelColOpt,
    LrOpt,
    MaxLenOpt,
    MaxStepsOpt,
    OutOpt,
    PairColOpt,
    SeedOpt,
    TextColOpt,
    TrainSizeOpt,
    ValSizeOpt,
    app,
    console,
    fail,
    out,
    progress_bar,
    quiet_transformers,
    stepper,
    val_scores,
)
from .errors import BaseModelError, DeltaRejected

if TYPE_CHECKING:
    from .base import Base
    from .format import TaskDelta
    from .train import TrainConfig


@app.command()
def train(
    base: BaseOpt,
    data: Annotated[Path, typer.Option(help="Task data: a TSV (header row, plain tabs) or an instruction "
                                       "JSONL (instruction, input, output)")],
    output: OutOpt,
    density: Annotated[float, typer.Option(help="Fraction of base entries to train")] = 0.01,
    recipe: Annotated[str | None, typer.Option(
        help="dense-extract (the default): train every entry for --dense-fraction of the steps, keep "
             "the largest |w - w0| (biases and norms always in) and train only those for the rest, "
             "from their dense values; scratch (the default when --mask, --exclude or --probe-epochs "
             "is given): score a --mask first and train only it, from zero")] = None,
    dense_fraction: Annotated[float, typer.Option(
        help="dense-extract: share of the steps trained densely")] = 0.25,
    dense_lr: Annotated[float, typer.Option(help="dense-extract: learning rate of the dense steps")] = 1e-4,
    block: Annotated[int | None, typer.Option(
        help="dense-extract: choose runs of this many entries along a row (16-64) instead of single "
             "entries (the swap's fast path)")] = None,
    mask: Annotated[str | None, typer.Option(
        help="scratch: grad (default) | fisher | magnitude | random")] = None,
    mask_batches: Annotated[int, typer.Option(help="Batches the grad / fisher scores sum over")] = 16,
    probe_epochs: Annotated[float, typer.Option(
        help="classify: first train a fresh head alone on the frozen base for this many epochs; the "
             "mask is scored and sparse training starts from that head (docs/quality.md uses 1)")] = 0.0,
    probe_lr: Annotated[float, typer.Option(help="The probe's head learning rate")] = 1e-2,
    exclude: Annotated[list[str] | None, typer.Option(
        help="grad / fisher: tensors whose name contains this get no entries (their share of the "
             "budget goes to the rest); repeatable, e.g. --exclude word_embeddings")] = None,
    kind: Annotated[str | None, typer.Option(help="classify | regress | generate (default: generate "
                                             "for .jsonl, else classify); regress: --label-col holds "
                                             "a number, e.g. STS-B's score")] = None,
    text_col: TextColOpt = "sentence",
    pair_col: PairColOpt = None,
    label_col: LabelColOpt = "label",
    lr: LrOpt = None,
    lr_1d: Annotated[float | None, typer.Option(
        help="Learning rate of the trained entries in 1-D tensors (biases, norms) [default: dense-extract "
             "1e-3; scratch: --lr]", rich_help_panel=TRAINING)] = None,
    head_lr: HeadLrOpt = 1e-3,
    epochs: EpochsOpt = 1,
    max_steps: MaxStepsOpt = None,
    batch_size: BatchOpt = 32,
    max_length: MaxLenOpt = 128,
    weight_decay: DecayOpt = 0.0,
    val_size: ValSizeOpt = None,
    train_size: TrainSizeOpt = None,
    seed: SeedOpt = 0,
    encoding: EncodingOpt = "compact",
) -> None:
    """Fine-tune only a sparse mask of base entries (plus a dense head) and write the delta."""
    from .base import load_base
    from .format import save
    from .masks import MASK_KINDS, mask_nnz
    from .recipe import (
        DENSE_EXTRACT_LR,
        DENSE_EXTRACT_LR_1D,
        SPARSE_LR_AT_1PCT,
        choose_mask,
        default_kind,
        describe,
        load_task_data,
        provenance,
        sparse_lr,
    )
    from .train import (
        TRAINABLE_KINDS,
        DenseExtract,
        TrainConfig,
        evaluate,
        probe_head,
        train_dense_extract,
        train_sparse,
    )
    from .validate import validate

    kind = kind or default_kind(data)
    if kind not in TRAINABLE_KINDS:
        fail(ValueError(f"--kind must be one of {', '.join(TRAINABLE_KINDS)}, not {kind!r}"))
    if recipe is None:
        recipe = "scratch" if mask is not None or exclude or probe_epochs else "dense-extract"
    if recipe not in ("dense-extract", "scratch"):
        fail(ValueError(f"--recipe must be dense-extract or scratch, not {recipe!r}"))
    mask = mask or "grad"
    if mask not in MASK_KINDS:
        fail(ValueError(f"--mask must be one of {', '.join(MASK_KINDS)}, not {mask!r}"))
    quiet_transformers()
    default_lr = sparse_lr(density, SPARSE_LR_AT_1PCT if recipe == "scratch" else DENSE_EXTRACT_LR)
    if lr_1d is None and recipe == "dense-extract":
        lr_1d = DENSE_EXTRACT_LR_1D
    cfg = TrainConfig(lr=lr if lr is not None else default_lr, lr_1d=lr_1d, head_lr=head_lr, epochs=epochs,
                      max_steps=max_steps, batch_size=batch_size, max_length=max_length,
                      weight_decay=weight_decay, seed=seed)
    try:
        b = load_base(base, device="cpu")
        task = load_task_data(b, data, kind, text_col=text_col, label_col=label_col, pair_col=pair_col,
                              val_size=val_size, train_size=train_size, max_length=max_length, seed=seed)
        if recipe == "dense-extract":
            with progress_bar() as bar:
                trained = train_dense_extract(b, kind, task.labels, task.train, cfg, DenseExtract(
                    density=density, dense_fraction=dense_fraction, dense_lr=dense_lr, block=block),
                    progress=stepper(bar))
                metrics = evaluate(trained.model, task.val, cfg.batch_size, stepper(bar)) if task.val else {}
            delta = trained.model.to_delta("dense-extract", **provenance(
                cfg, trained, target_density=density, dense_fraction=dense_fraction, dense_lr=dense_lr,
                block=block, **val_scores(metrics)))
            validate(delta, b)
            save(delta, output, encoding)
            out.print(f"wrote {output}\n" + describe(delta, output.stat().st_size, trained, metrics,
                                                       len(task.val)))
            return
        with progress_bar() as bar:
            steps = math.ceil(probe_epochs * len(task.train) / cfg.batch_size)
            heads = (probe_head(b, kind, task.labels, task.train, cfg, steps, probe_lr,
                                progress=stepper(bar)) if steps else None) or None
            chosen = choose_mask(b, task, mask, density, cfg, mask_batches, exclude=exclude or (),
                                 progress=stepper(bar), heads=heads)
            console.print(f"mask {mask}: {mask_nnz(chosen)} entries in "
                          f"{sum(1 for i in chosen.values() if i.numel())} tensors")
            warn_short_mask(mask_nnz(chosen), density, b)
            trained = train_sparse(b, kind, task.labels, task.train, chosen, cfg, progress=stepper(bar),
                                   heads=heads)
            metrics = evaluate(trained.model, task.val, cfg.batch_size, stepper(bar)) if task.val else {}
        delta = trained.model.to_delta("sparse-train", **provenance(
            cfg, trained, mask=mask, target_density=density, exclude=exclude or [], **val_scores(metrics)))
        validate(delta, b)  # never write a delta the server would refuse
        save(delta, output, encoding)
    except (BaseModelError, DeltaRejected, ValueError, OSError) as exc:
        fail(exc)
    out.print(f"wrote {output}\n" + describe(delta, output.stat().st_size, trained, metrics, len(task.val)))


def warn_short_mask(chosen: int, density: float, b: Base) -> None:
    """Scores of zero (untouched embedding rows, excluded tensors) cannot be chosen: say so when
    the mask came out smaller than --density asked for."""
    wanted = round(density * b.numel)
    if chosen < wanted:
        console.print(f"[yellow]warning:[/yellow] only {chosen} entries could be chosen, fewer "
                      f"than the {wanted} that --density {density} asks for ({chosen / b.numel:.4%} "
                      "of the base); the rest scored zero", soft_wrap=True)



def refit_delta(b: Base, delta: TaskDelta, data: Path, cfg: TrainConfig, *, text_col: str,
           pair_col: str | None, label_col: str, val_size: int | None,
           train_size: int | None) -> tuple[TaskDelta, Callable[[int], str]]:
    """extract --refit: train the extracted entries (mask fixed) and head; (delta, summary maker)."""
    from .format import HEAD_KINDS
    from .recipe import describe, load_task_data, provenance
    from .train import evaluate
    from .train import refit as run_refit

    labels = delta.meta.labels if delta.meta.kind in HEAD_KINDS else None
    task = load_task_data(b, data, delta.meta.kind, text_col=text_col, label_col=label_col,
                          pair_col=pair_col, labels=labels, val_size=val_size, train_size=train_size,
                          max_length=cfg.max_length, seed=cfg.seed)
    with progress_bar() as bar:
        trained = run_refit(b, delta, task.train, cfg, progress=stepper(bar))
        metrics = evaluate(trained.model, task.val, cfg.batch_size, stepper(bar)) if task.val else {}
    prov = delta.meta.provenance.model_dump()
    refitted = trained.model.to_delta("extract+refit", **provenance(
        cfg, trained, target_density=prov.get("target_density", prov["density"]),
        scope=prov.get("scope"), **val_scores(metrics)))
    return refitted, lambda size: describe(refitted, size, trained, metrics, len(task.val))
