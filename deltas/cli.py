"""`taskdelta delta ...`: make and look at delta files (extract, train, inspect, random,
import-peft, export)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import BaseModelError, DeltaRejected

if TYPE_CHECKING:  # the commands import torch lazily: `--help` stays fast
    from .base import Base
    from .format import TaskDelta
    from .train import Step, TrainConfig

app = typer.Typer(help="Make and inspect sparse task deltas.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console(stderr=True)
out = Console()

BaseOpt = Annotated[str, typer.Option(help="A named default (minilm, smollm2-135m) or a model folder")]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="Delta file to write")]
EncodingOpt = Annotated[str, typer.Option(help="How indices are stored: compact (gap-varint, about 3.4 "
                                          "bytes per nonzero with bf16 values at 1 %) or plain "
                                          "(int32)")]

# training options, shared by `train` and `extract --refit`
_T = "Training"
DataOpt = Annotated[Path | None, typer.Option(help="Task data: a TSV (header row, plain tabs) or an "
                                               "instruction JSONL (instruction, input, output)",
                                               rich_help_panel=_T)]
TextColOpt = Annotated[str, typer.Option(help="TSV column of the text", rich_help_panel=_T)]
PairColOpt = Annotated[str | None, typer.Option(help="TSV column of a second text (pair tasks)",
                                                rich_help_panel=_T)]
LabelColOpt = Annotated[str, typer.Option(help="TSV column of the label", rich_help_panel=_T)]
LrOpt = Annotated[float | None, typer.Option(help="Learning rate of the trained entries [default: train "
                                             "5e-3 x 1 % / density (dense-extract's sparse steps; "
                                             "--recipe scratch 1e-3 x 1 % / density), at most 1e-2; "
                                             "refit 1e-3]",
                                             rich_help_panel=_T)]
HeadLrOpt = Annotated[float, typer.Option(help="Learning rate of the dense head", rich_help_panel=_T)]
EpochsOpt = Annotated[int, typer.Option(help="Passes over the training split", rich_help_panel=_T)]
MaxStepsOpt = Annotated[int | None, typer.Option(help="Stop after this many steps (overrides --epochs)",
                                                 rich_help_panel=_T)]
BatchOpt = Annotated[int, typer.Option(help="Examples per step", rich_help_panel=_T)]
MaxLenOpt = Annotated[int, typer.Option(help="Tokens an example is cut to", rich_help_panel=_T)]
DecayOpt = Annotated[float, typer.Option(help="AdamW weight decay (trained entries and head matrices "
                                         "only)", rich_help_panel=_T)]
ValSizeOpt = Annotated[int | None, typer.Option(help="Validation examples carved from the file (seeded) "
                                                "[default: 10 %, at most 1000; 0: none]",
                                                rich_help_panel=_T)]
TrainSizeOpt = Annotated[int | None, typer.Option(help="Train on a seeded subsample of this many",
                                                  rich_help_panel=_T)]
SeedOpt = Annotated[int, typer.Option(help="Seed of the split, order, mask, head and dropout",
                                      rich_help_panel=_T)]
REFIT_LR = 1e-3


def _fail(exc: Exception) -> None:
    # one line, whatever the terminal width; the message is text, not rich markup
    console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(2)


def _check_kind(kind: str | None) -> None:
    from .format import TASK_KINDS

    if kind is not None and kind not in TASK_KINDS:
        _fail(ValueError(f"--kind must be one of {', '.join(TASK_KINDS)}, not {kind!r}"))


def _check_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        _fail(ValueError(f"{folder}: no such folder"))
    if not (folder / "config.json").is_file():
        _fail(ValueError(f"{folder} is not a Hugging Face model folder (no config.json)"))


def _check_finetune_of(b: Base, finetuned: object, folder: Path) -> None:
    from .extract import split_params

    sparse, _ = split_params(b, finetuned)
    if not sparse:
        _fail(ValueError(f"{folder} is not a fine-tune of base {b.name!r}: none of its tensors "
                         "has a base tensor's name and shape"))


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # our own bar and messages are the output


@app.command()
def extract(
    base: BaseOpt,
    finetuned: Annotated[Path, typer.Option(help="Fine-tuned model folder (safetensors)")],
    output: OutOpt,
    density: Annotated[float, typer.Option(help="Fraction of base entries to keep")] = 0.01,
    scope: Annotated[str, typer.Option(help="global | per-tensor top-k")] = "global",
    kind: Annotated[str | None, typer.Option(help="classify | regress | generate | embed (default: "
                                             "inferred)")] = None,
    refit: Annotated[bool, typer.Option(help="Then fine-tune the kept entries (mask fixed) on --data",
                                        rich_help_panel="Refit")] = False,
    data: DataOpt = None,
    text_col: TextColOpt = "sentence",
    pair_col: PairColOpt = None,
    label_col: LabelColOpt = "label",
    lr: LrOpt = None,
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
    """Keep the largest |finetuned - base| entries of a full fine-tune as a sparse delta.

    With --refit --data FILE, then fine-tune the kept entries and the head with the mask fixed
    (diff pruning's last stage) and print the validation score."""
    from .base import load_base
    from .extract import extract as run_extract
    from .extract import load_finetuned
    from .format import save
    from .validate import validate

    if scope not in ("global", "per-tensor"):
        _fail(ValueError(f"--scope must be global or per-tensor, not {scope!r}"))
    _check_kind(kind)
    if refit and data is None:
        _fail(ValueError("--refit needs --data: the task's training file"))
    _check_model_folder(finetuned)
    _quiet_transformers()
    try:
        b = load_base(base, device="cpu")
        ft = load_finetuned(finetuned)
        _check_finetune_of(b, ft, finetuned)
        n = sum(1 for _ in ft.named_parameters())
        with _bar() as bar:
            task = bar.add_task("diffing tensors", total=n)
            delta = run_extract(b, ft, density, scope=scope, kind=kind,  # type: ignore[arg-type]
                                progress=lambda _name: bar.advance(task))
        if refit:
            from .train import TrainConfig

            cfg = TrainConfig(lr=lr if lr is not None else REFIT_LR, head_lr=head_lr, epochs=epochs,
                              max_steps=max_steps, batch_size=batch_size, max_length=max_length,
                              weight_decay=weight_decay, seed=seed)
            assert data is not None  # checked above
            delta, summary = _refit(b, delta, data, cfg, text_col=text_col, pair_col=pair_col,
                                    label_col=label_col, val_size=val_size, train_size=train_size)
        validate(delta, b)  # never write a delta the server would refuse
        save(delta, output, encoding)
    except (BaseModelError, DeltaRejected, ValueError, OSError) as exc:
        _fail(exc)
    if refit:
        out.print(f"wrote {output} (extract + refit)\n" + summary(output.stat().st_size))
        return
    out.print(f"wrote {output}: {delta.nnz} nonzeros "
              f"(density {delta.meta.provenance.density:.4%}), {len(delta.heads)} head tensors, "
              f"{output.stat().st_size} bytes")


@app.command()
def inspect(path: Path, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Tensors, nonzeros, density, bytes per nonzero and metadata of a delta file."""
    from .format import file_encoding, load

    try:
        delta = load(path)
        encoding = file_encoding(path.read_bytes())
    except (DeltaRejected, OSError) as exc:
        _fail(exc)
    size = path.stat().st_size
    summary = {
        "file": str(path), "bytes": size, "nnz": delta.nnz, "encoding": encoding,
        "bytes_per_nonzero": round(size / delta.nnz, 3) if delta.nnz else None,
        "metadata": delta.meta.model_dump(mode="json"),
        "tensors": {n: {"nnz": t.nnz, "idx": str(t.idx.dtype), "val": str(t.val.dtype)}
                    for n, t in delta.tensors.items()},
        "heads": {n: list(h.shape) for n, h in delta.heads.items()},
    }
    if as_json:
        out.print_json(json.dumps(summary))
        return
    table = Table("tensor", "nnz", "idx", "val")
    for name, t in delta.tensors.items():
        table.add_row(name, str(t.nnz), _dtype(t.idx.dtype), _dtype(t.val.dtype))
    for name, h in delta.heads.items():
        table.add_row(f"head::{name}", str(h.numel()), "dense", _dtype(h.dtype))
    # whole tensor names, even on a narrow terminal or a pipe: they are what a user greps for
    names = [*delta.tensors, *(f"head::{n}" for n in delta.heads)]
    out.print(table, width=max(out.width, max(map(len, names), default=0) + 40))
    meta = delta.meta
    out.print(f"kind {meta.kind}, labels {meta.labels or '-'}, base {meta.base_name or '?'} "
              f"{meta.base_fingerprint}")
    out.print(f"provenance {meta.provenance.model_dump()}")
    bpn = f"{size / delta.nnz:.2f}" if delta.nnz else "-"
    out.print(f"{delta.nnz} nonzeros, density {meta.provenance.density:.4%}, {size} bytes "
              f"({encoding}), {bpn} bytes per nonzero, checksum {meta.checksum}")


@app.command()
def random(
    base: BaseOpt,
    output: OutOpt,
    density: Annotated[float, typer.Option(help="Fraction of every tensor's entries")] = 0.01,
    seed: int = 0,
    kind: Annotated[str | None, typer.Option(help="classify | regress | generate | embed")] = None,
    encoding: EncodingOpt = "compact",
) -> None:
    """A synthetic delta with random entries, for load tests."""
    from .base import load_base
    from .format import save
    from .synth import random_delta
    from .validate import validate

    _check_kind(kind)
    _quiet_transformers()
    try:
        b = load_base(base, device="cpu")
        delta = random_delta(b, density, seed=seed, kind=kind)
        validate(delta, b)  # never write a delta the server would refuse
        save(delta, output, encoding)
    except (BaseModelError, DeltaRejected, ValueError, OSError) as exc:
        _fail(exc)
    out.print(f"wrote {output}: {delta.nnz} nonzeros, {output.stat().st_size} bytes")


@app.command("import-peft")
def import_peft(
    adapter: Annotated[Path, typer.Argument(help="A PEFT adapter folder (adapter_config.json, "
                                            "adapter_model.safetensors)")],
    base: BaseOpt,
    output: OutOpt,
    density: Annotated[float | None, typer.Option(
        help="LoRA and other dense adapters: fraction of base entries to keep, largest first "
             "[default: every nonzero of the merged update]; SHiRA is imported exactly")] = None,
    kind: Annotated[str | None, typer.Option(help="classify | regress | generate | embed (default: "
                                             "the adapter's task_type, else the base's)")] = None,
    labels: Annotated[str | None, typer.Option(help="classify: label names, comma-separated "
                                               "(default: LABEL_0, LABEL_1, ...)")] = None,
    encoding: EncodingOpt = "compact",
) -> None:
    """A PEFT adapter (SHiRA, LoRA, ...) as a task delta: SHiRA maps directly, others are merged
    and kept at --density; modules_to_save the base lacks become the dense head."""
    from .base import load_base
    from .format import save
    from .peft_io import import_peft as run_import
    from .validate import validate

    _check_kind(kind)
    _quiet_transformers()
    try:
        b = load_base(base, device="cpu")
        names = [x.strip() for x in labels.split(",")] if labels else None
        imported = run_import(b, adapter, density=density, kind=kind, labels=names)
        validate(imported.delta, b)  # never write a delta the server would refuse
        save(imported.delta, output, encoding)
    except (BaseModelError, DeltaRejected, ValueError, OSError) as exc:
        _fail(exc)
    d = imported.delta
    out.print(f"wrote {output}: {d.meta.provenance.model_dump().get('peft_type')} adapter, "
              f"{d.nnz} nonzeros (density {d.meta.provenance.density:.4%}), {len(d.heads)} head "
              f"tensors; the kept entries hold {imported.kept_energy:.2%} of the adapter's update "
              "(squared norm)")


@app.command()
def export(
    delta_file: Annotated[Path, typer.Argument(help="A delta file")],
    base: BaseOpt,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write")],
) -> None:
    """The base with the delta merged in, as a Hugging Face folder `from_pretrained` loads."""
    from .base import load_base
    from .format import load
    from .peft_io import export_merged
    from .validate import validate

    _quiet_transformers()
    try:
        delta = load(delta_file)
        b = load_base(base, device="cpu")
        validate(delta, b)
        export_merged(b, delta, output)
    except (BaseModelError, DeltaRejected, ValueError, OSError) as exc:
        _fail(exc)
    out.print(f"wrote {output}: {b.name} with {delta_file.name} merged in ({delta.meta.kind})")


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
             "1e-3; scratch: --lr]", rich_help_panel=_T)] = None,
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
        _fail(ValueError(f"--kind must be one of {', '.join(TRAINABLE_KINDS)}, not {kind!r}"))
    if recipe is None:
        recipe = "scratch" if mask is not None or exclude or probe_epochs else "dense-extract"
    if recipe not in ("dense-extract", "scratch"):
        _fail(ValueError(f"--recipe must be dense-extract or scratch, not {recipe!r}"))
    mask = mask or "grad"
    if mask not in MASK_KINDS:
        _fail(ValueError(f"--mask must be one of {', '.join(MASK_KINDS)}, not {mask!r}"))
    _quiet_transformers()
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
            with _bar() as bar:
                trained = train_dense_extract(b, kind, task.labels, task.train, cfg, DenseExtract(
                    density=density, dense_fraction=dense_fraction, dense_lr=dense_lr, block=block),
                    progress=_stepper(bar))
                metrics = evaluate(trained.model, task.val, cfg.batch_size, _stepper(bar)) if task.val else {}
            delta = trained.model.to_delta("dense-extract", **provenance(
                cfg, trained, target_density=density, dense_fraction=dense_fraction, dense_lr=dense_lr,
                block=block, **_scores(metrics)))
            validate(delta, b)
            save(delta, output, encoding)
            out.print(f"wrote {output}\n" + describe(delta, output.stat().st_size, trained, metrics,
                                                       len(task.val)))
            return
        with _bar() as bar:
            steps = math.ceil(probe_epochs * len(task.train) / cfg.batch_size)
            heads = (probe_head(b, kind, task.labels, task.train, cfg, steps, probe_lr,
                                progress=_stepper(bar)) if steps else None) or None
            chosen = choose_mask(b, task, mask, density, cfg, mask_batches, exclude=exclude or (),
                                 progress=_stepper(bar), heads=heads)
            console.print(f"mask {mask}: {mask_nnz(chosen)} entries in "
                          f"{sum(1 for i in chosen.values() if i.numel())} tensors")
            _warn_short_mask(mask_nnz(chosen), density, b)
            trained = train_sparse(b, kind, task.labels, task.train, chosen, cfg, progress=_stepper(bar),
                                   heads=heads)
            metrics = evaluate(trained.model, task.val, cfg.batch_size, _stepper(bar)) if task.val else {}
        delta = trained.model.to_delta("sparse-train", **provenance(
            cfg, trained, mask=mask, target_density=density, exclude=exclude or [], **_scores(metrics)))
        validate(delta, b)  # never write a delta the server would refuse
        save(delta, output, encoding)
    except (BaseModelError, DeltaRejected, ValueError, OSError) as exc:
        _fail(exc)
    out.print(f"wrote {output}\n" + describe(delta, output.stat().st_size, trained, metrics, len(task.val)))


def _warn_short_mask(chosen: int, density: float, b: Base) -> None:
    """Scores of zero (untouched embedding rows, excluded tensors) cannot be chosen: say so when
    the mask came out smaller than --density asked for."""
    wanted = round(density * b.numel)
    if chosen < wanted:
        console.print(f"[yellow]warning:[/yellow] only {chosen} entries could be chosen, fewer "
                      f"than the {wanted} that --density {density} asks for ({chosen / b.numel:.4%} "
                      "of the base); the rest scored zero", soft_wrap=True)


def _refit(b: Base, delta: TaskDelta, data: Path, cfg: TrainConfig, *, text_col: str,
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
    with _bar() as bar:
        trained = run_refit(b, delta, task.train, cfg, progress=_stepper(bar))
        metrics = evaluate(trained.model, task.val, cfg.batch_size, _stepper(bar)) if task.val else {}
    prov = delta.meta.provenance.model_dump()
    refitted = trained.model.to_delta("extract+refit", **provenance(
        cfg, trained, target_density=prov.get("target_density", prov["density"]),
        scope=prov.get("scope"), **_scores(metrics)))
    return refitted, lambda size: describe(refitted, size, trained, metrics, len(task.val))


def _scores(metrics: dict[str, float]) -> dict[str, float]:
    return {f"val_{k}": round(v, 6) for k, v in metrics.items()}


def _stepper(bar: Progress) -> Callable[[Step], None]:
    """A training progress callback drawing one bar per phase, with the running loss."""
    tasks: dict[str, TaskID] = {}

    def on_step(step: Step) -> None:
        if step.phase not in tasks:
            tasks[step.phase] = bar.add_task(step.phase, total=step.total)
        loss = f" loss {step.loss:.4f}" if step.loss is not None else ""
        bar.update(tasks[step.phase], completed=step.done, description=f"{step.phase}{loss}")

    return on_step


def _dtype(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def _bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)
