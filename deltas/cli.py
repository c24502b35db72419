"""`taskdelta delta ...`: make and look at delta files (extract, inspect, random)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import BaseModelError, DeltaRejected

app = typer.Typer(help="Make and inspect sparse task deltas.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console(stderr=True)
out = Console()

BaseOpt = Annotated[str, typer.Option(help="A named default (minilm, smollm2-135m) or a model folder")]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="Delta file to write")]


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


@app.command()
def extract(
    base: BaseOpt,
    finetuned: Annotated[Path, typer.Option(help="Fine-tuned model folder (safetensors)")],
    output: OutOpt,
    density: Annotated[float, typer.Option(help="Fraction of base entries to keep")] = 0.01,
    scope: Annotated[str, typer.Option(help="global | per-tensor top-k")] = "global",
    kind: Annotated[str | None, typer.Option(help="classify | generate | embed (default: inferred)")] = None,
) -> None:
    """Keep the largest |finetuned - base| entries of a full fine-tune as a sparse delta."""
    from .base import load_base
    from .extract import extract as run_extract
    from .extract import load_finetuned
    from .format import save

    if scope not in ("global", "per-tensor"):
        _fail(ValueError(f"--scope must be global or per-tensor, not {scope!r}"))
    try:
        b = load_base(base, device="cpu")
        ft = load_finetuned(finetuned)
        n = sum(1 for _ in ft.named_parameters())
        with _bar() as bar:
            task = bar.add_task("diffing tensors", total=n)
            delta = run_extract(b, ft, density, scope=scope, kind=kind,  # type: ignore[arg-type]
                                progress=lambda _name: bar.advance(task))
        save(delta, output)
    except (BaseModelError, DeltaRejected, ValueError, OSError) as exc:
        _fail(exc)
    out.print(f"wrote {output}: {delta.nnz} nonzeros "
              f"(density {delta.meta.provenance.density:.4%}), {len(delta.heads)} head tensors, "
              f"{output.stat().st_size} bytes")


@app.command()
def inspect(path: Path, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Tensors, nonzeros, density, bytes per nonzero and metadata of a delta file."""
    from .format import load

    try:
        delta = load(path)
    except (DeltaRejected, OSError) as exc:
        _fail(exc)
    size = path.stat().st_size
    summary = {
        "file": str(path), "bytes": size, "nnz": delta.nnz,
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
        table.add_row(name, str(t.nnz), str(t.idx.dtype), str(t.val.dtype))
    for name, h in delta.heads.items():
        table.add_row(f"head::{name}", str(h.numel()), "dense", str(h.dtype))
    out.print(table)
    meta = delta.meta
    out.print(f"kind {meta.kind}, labels {meta.labels or '-'}, base {meta.base_name or '?'} "
              f"{meta.base_fingerprint}")
    out.print(f"provenance {meta.provenance.model_dump()}")
    bpn = f"{size / delta.nnz:.2f}" if delta.nnz else "-"
    out.print(f"{delta.nnz} nonzeros, density {meta.provenance.density:.4%}, {size} bytes, "
              f"{bpn} bytes per nonzero, checksum {meta.checksum}")


@app.command()
def random(
    base: BaseOpt,
    output: OutOpt,
    density: Annotated[float, typer.Option(help="Fraction of every tensor's entries")] = 0.01,
    seed: int = 0,
    kind: Annotated[str | None, typer.Option(help="classify | generate | embed")] = None,
) -> None:
    """A synthetic delta with random entries, for load tests."""
    from .base import load_base
    from .format import save
    from .synth import random_delta

    try:
        delta = random_delta(load_base(base, device="cpu"), density, seed=seed, kind=kind)
        save(delta, output)
    except (BaseModelError, DeltaRejected, ValueError, OSError) as exc:
        _fail(exc)
    out.print(f"wrote {output}: {delta.nnz} nonzeros, {output.stat().st_size} bytes")


def _bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)
