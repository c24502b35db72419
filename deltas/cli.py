"""`taskdelta delta ...`: make and look at delta files (extract, inspect, random, import-peft,
export; `train` lives in cli_train.py), and the options and progress display they share."""

from __future__ import annotations

import json
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
    from .train import Step

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
TRAINING = "Training"
DataOpt = Annotated[Path | None, typer.Option(help="Task data: a TSV (header row, plain tabs) or an "
                                               "instruction JSONL (instruction, input, output)",
                                               rich_help_panel=TRAINING)]
TextColOpt = Annotated[str, typer.Option(help="TSV column of the text", rich_help_panel=TRAINING)]
PairColOpt = Annotated[str | None, typer.Option(help="TSV column of a second text (pair tasks)",
                                                rich_help_panel=TRAINING)]
LabelColOpt = Annotated[str, typer.Option(help="TSV column of the label", rich_help_panel=TRAINING)]
LrOpt = Annotated[float | None, typer.Option(help="Learning rate of the trained entries [default: train "
                                             "5e-3 x 1 % / density (dense-extract's sparse steps; "
                                             "--recipe scratch 1e-3 x 1 % / density), at most 1e-2; "
                                             "refit 1e-3]",
                                             rich_help_panel=TRAINING)]
HeadLrOpt = Annotated[float, typer.Option(help="Learning rate of the dense head", rich_help_panel=TRAINING)]
EpochsOpt = Annotated[int, typer.Option(help="Passes over the training split", rich_help_panel=TRAINING)]
MaxStepsOpt = Annotated[int | None, typer.Option(help="Stop after this many steps (overrides --epochs)",
                                                 rich_help_panel=TRAINING)]
BatchOpt = Annotated[int, typer.Option(help="Examples per step", rich_help_panel=TRAINING)]
MaxLenOpt = Annotated[int, typer.Option(help="Tokens an example is cut to", rich_help_panel=TRAINING)]
DecayOpt = Annotated[float, typer.Option(help="AdamW weight decay (trained entries and head matrices "
                                         "only)", rich_help_panel=TRAINING)]
ValSizeOpt = Annotated[int | None, typer.Option(help="Validation examples carved from the file (seeded) "
                                                "[default: 10 %, at most 1000; 0: none]",
                                                rich_help_panel=TRAINING)]
TrainSizeOpt = Annotated[int | None, typer.Option(help="Train on a seeded subsample of this many",
                                                  rich_help_panel=TRAINING)]
SeedOpt = Annotated[int, typer.Option(help="Seed of the split, order, mask, head and dropout",
                                      rich_help_panel=TRAINING)]
REFIT_LR = 1e-3


def fail(exc: Exception) -> None:
    # one line, whatever the terminal width; the message is text, not rich markup
    console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(2)


def _check_kind(kind: str | None) -> None:
    from .format import TASK_KINDS

    if kind is not None and kind not in TASK_KINDS:
        fail(ValueError(f"--kind must be one of {', '.join(TASK_KINDS)}, not {kind!r}"))


def _check_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        fail(ValueError(f"{folder}: no such folder"))
    if not (folder / "config.json").is_file():
        fail(ValueError(f"{folder} is not a Hugging Face model folder (no config.json)"))


def _check_finetune_of(b: Base, finetuned: object, folder: Path) -> None:
    from .extract import split_params

    sparse, _ = split_params(b, finetuned)
    if not sparse:
        fail(ValueError(f"{folder} is not a fine-tune of base {b.name!r}: none of its tensors "
                         "has a base tensor's name and shape"))


def quiet_transformers() -> None:
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
        fail(ValueError(f"--scope must be global or per-tensor, not {scope!r}"))
    _check_kind(kind)
    if refit and data is None:
        fail(ValueError("--refit needs --data: the task's training file"))
    _check_model_folder(finetuned)
    quiet_transformers()
    try:
        b = load_base(base, device="cpu")
        ft = load_finetuned(finetuned)
        _check_finetune_of(b, ft, finetuned)
        n = sum(1 for _ in ft.named_parameters())
        with progress_bar() as bar:
            task = bar.add_task("diffing tensors", total=n)
            delta = run_extract(b, ft, density, scope=scope, kind=kind,  # type: ignore[arg-type]
                                progress=lambda _name: bar.advance(task))
        if refit:
            from .train import TrainConfig

            cfg = TrainConfig(lr=lr if lr is not None else REFIT_LR, head_lr=head_lr, epochs=epochs,
                              max_steps=max_steps, batch_size=batch_size, max_length=max_length,
                              weight_decay=weight_decay, seed=seed)
            assert data is not None  # checked above
            from .cli_train import refit_delta

            delta, summary = refit_delta(b, delta, data, cfg, text_col=text_col, pair_col=pair_col,
                                         label_col=label_col, val_size=val_size, train_size=train_size)
        validate(delta, b)  # never write a delta the server would refuse
        save(delta, output, encoding)
    except (BaseModelError, DeltaRejected, ValueError, OSError) as exc:
        fail(exc)
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
        fail(exc)
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
    quiet_transformers()
    try:
        b = load_base(base, device="cpu")
        delta = random_delta(b, density, seed=seed, kind=kind)
        validate(delta, b)  # never write a delta the server would refuse
        save(delta, output, encoding)
    except (BaseModelError, DeltaRejected, ValueError, OSError) as exc:
        fail(exc)
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
    quiet_transformers()
    try:
        b = load_base(base, device="cpu")
        names = [x.strip() for x in labels.split(",")] if labels else None
        imported = run_import(b, adapter, density=density, kind=kind, labels=names)
        validate(imported.delta, b)  # never write a delta the server would refuse
        save(imported.delta, output, encoding)
    except (BaseModelError, DeltaRejected, ValueError, OSError) as exc:
        fail(exc)
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

    quiet_transformers()
    try:
        delta = load(delta_file)
        b = load_base(base, device="cpu")
        validate(delta, b)
        export_merged(b, delta, output)
    except (BaseModelError, DeltaRejected, ValueError, OSError) as exc:
        fail(exc)
    out.print(f"wrote {output}: {b.name} with {delta_file.name} merged in ({delta.meta.kind})")


def val_scores(metrics: dict[str, float]) -> dict[str, float]:
    return {f"val_{k}": round(v, 6) for k, v in metrics.items()}


def stepper(bar: Progress) -> Callable[[Step], None]:
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


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


from . import cli_train  # noqa: E402, F401  (registers `train` on `app`)
