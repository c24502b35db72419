"""The `taskdelta` command. Commands that need torch (`delta`, `serve`) load lazily, so the
bare SDK install (`pip install taskdelta`) runs the client commands without torch."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypedDict

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column, Table

from ._client import Client
from ._exceptions import TaskDeltaError
from ._keys import hash_api_key, new_api_key
from .types import TaskInfo

app = typer.Typer(help="taskdelta: many fine-tuned tasks served from one base model.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
tasks_app = typer.Typer(help="Upload, list, show and delete task deltas.", no_args_is_help=True,
                        pretty_exceptions_enable=False)
app.add_typer(tasks_app, name="tasks")
keys_app = typer.Typer(help="Make API keys and the digests a server's keys file holds.",
                       no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(keys_app, name="keys")

# command -> (module with a typer `app`, what to install when it is missing)
LAZY = {
    "delta": ("taskdelta.deltas.cli", "pip install 'taskdelta[server]'"),
    "serve": ("taskdelta.server.cli", "pip install 'taskdelta[server]'"),
}


def _lazy_placeholder(name: str, help_text: str) -> None:
    @app.command(name, help=help_text, context_settings={"allow_extra_args": True,
                                                          "ignore_unknown_options": True})
    def _placeholder() -> None:  # main() dispatches before typer ever gets here
        raise typer.Exit(2)


# the delta commands, named here so that `taskdelta --help` lists them without importing torch
DELTA_COMMANDS = ("extract", "train", "inspect", "random", "import-peft", "export")
_lazy_placeholder("delta", f"Make and inspect delta files ({', '.join(DELTA_COMMANDS)}).")
_lazy_placeholder("serve", "Run the taskdelta HTTP server.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON answer")]
IfMatchOpt = Annotated[int | None, typer.Option("--if-match", metavar="VERSION",
                                                help="Only if the task is at this version")]


# --- the client and its errors -------------------------------------------------------------------

def make_client(base_url: str | None, api_key: str | None) -> Client:
    """The one place the commands get a Client (tests swap in one over a MockTransport)."""
    return Client(base_url, api_key=api_key)


@app.callback()
def _global_options(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option("--url", envvar="TASKDELTA_BASE_URL",
                                            help="Server URL [default: http://127.0.0.1:8000]")
                   ] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="TASKDELTA_API_KEY",
                                                show_default=False, help="API key")] = None,
) -> None:
    ctx.obj = {"url": url, "api_key": api_key}


@contextmanager
def _session(ctx: typer.Context) -> Iterator[Client]:
    """A client for one command; an expected error becomes one line on stderr and exit 1."""
    opts = ctx.find_root().obj or {}
    try:
        with make_client(opts.get("url"), opts.get("api_key")) as client:
            yield client
    except TaskDeltaError as exc:
        typer.echo(f"error: {exc}".replace("\n", " "), err=True)
        raise typer.Exit(1) from None


def _out() -> Console:
    return Console(soft_wrap=True, highlight=False)


def _echo_json(model: BaseModel) -> None:
    typer.echo(model.model_dump_json(indent=2))


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


# --- tasks ---------------------------------------------------------------------------------------

@tasks_app.command("upload")
def tasks_upload(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task name")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Delta file")],
    if_match: IfMatchOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a delta file as task NAME (creates it, or replaces it)."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    with _session(ctx) as client, bar:
        job = bar.add_task(f"uploading {file.name}", total=file.stat().st_size)
        info = client.tasks.upload(name, file, if_match=if_match,
                                   progress=lambda sent, _total: bar.update(job, completed=sent))
    if as_json:
        _echo_json(info)
    else:
        _out().print(f"uploaded {info.name}: version {info.version}, {info.kind}, "
                     f"{info.nnz:,} entries (density {info.density:.4%}), {info.bytes:,} bytes")


@tasks_app.command("list")
def tasks_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List your tasks."""
    with _session(ctx) as client:
        listing = client.tasks.list()
    if as_json:
        _echo_json(listing)
        return
    if not listing.tasks:
        _out().print("no tasks")
        return
    table = Table(Column("name", overflow="fold"), "kind", "version", "entries", "density",
                  "bytes", Column("created (UTC)", no_wrap=True))
    for t in listing.tasks:
        table.add_row(t.name, t.kind, str(t.version), f"{t.nnz:,}", f"{t.density:.4%}",
                      f"{t.bytes:,}", _when(t.created_at))
    _out().print(table)


@tasks_app.command("show")
def tasks_show(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Show one task."""
    with _session(ctx) as client:
        info = client.tasks.get(name)
    if as_json:
        _echo_json(info)
    else:
        _print_task(info)


def _print_task(info: TaskInfo) -> None:
    rows = {"name": info.name, "kind": info.kind, "version": info.version,
            "labels": ", ".join(info.labels) or "-", "entries": f"{info.nnz:,}",
            "density": f"{info.density:.4%}", "bytes": f"{info.bytes:,}", "sha256": info.sha256,
            "base": info.base_fingerprint, "created (UTC)": _when(info.created_at)}
    rows.update({f"provenance.{k}": v for k, v in info.provenance.items()})
    out = _out()
    for key, value in rows.items():
        out.print(f"{key + ':':<20} {value}", markup=False)


@tasks_app.command("delete")
def tasks_delete(ctx: typer.Context, name: str, if_match: IfMatchOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Delete a task."""
    with _session(ctx) as client:
        result = client.tasks.delete(name, if_match=if_match)
    if as_json:
        _echo_json(result)
    else:
        _out().print(f"deleted {result.name}", markup=False)


# --- inference -----------------------------------------------------------------------------------

@app.command()
def classify(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="Task name (or `base`)")],
    texts: Annotated[list[str], typer.Argument(help="Texts to classify")],
    pair: Annotated[bool, typer.Option("--pair", help="Read TEXTS as text, text_pair, ...")
                    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Classify texts (or text pairs) with a task."""
    inputs = _inputs(texts, pair)
    with _session(ctx) as client:
        result = client.classify(task, inputs)
    if as_json:
        _echo_json(result)
        return
    table = Table(Column("text", overflow="fold"), "label", "score")
    for text, r in zip(inputs, result.results, strict=False):
        table.add_row(_shown(text), r.label, f"{r.scores.get(r.label, float('nan')):.3f}")
    _out().print(table)


@app.command()
def score(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="A regress task's name")],
    texts: Annotated[list[str], typer.Argument(help="Texts to score")],
    pair: Annotated[bool, typer.Option("--pair", help="Read TEXTS as text, text_pair, ...")
                    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Score texts (or text pairs) with a regress task, e.g. STS-B similarity."""
    inputs = _inputs(texts, pair)
    with _session(ctx) as client:
        result = client.score(task, inputs)
    if as_json:
        _echo_json(result)
        return
    table = Table(Column("text", overflow="fold"), "score")
    for text, value in zip(inputs, result.scores, strict=False):
        table.add_row(_shown(text), f"{value:.4f}")
    _out().print(table)


def _shown(text: str | Sequence[str]) -> str:
    """A text as a table shows it; a pair as "text || text_pair"."""
    return text if isinstance(text, str) else " || ".join(text)


def _inputs(texts: list[str], pair: bool) -> list[str | tuple[str, str]]:
    """The command line's texts, or with --pair, its consecutive texts as (text, text_pair)."""
    if pair and len(texts) % 2:
        raise typer.BadParameter("--pair needs an even number of texts", param_hint="TEXTS")
    return list(zip(texts[::2], texts[1::2], strict=True)) if pair else list(texts)


class GenerateParams(TypedDict):
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str] | None
    seed: int | None


@app.command()
def generate(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="Task name (or `base`)")],
    prompt: str,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy decoding")] = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable)")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream",
                                         help="Print text as it is generated")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON answer (one JSON "
                                                         "chunk a line when streaming)")] = False,
) -> None:
    """Generate text from PROMPT with a task."""
    params = GenerateParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop=stop, seed=seed)
    with _session(ctx) as client:
        if not stream:
            result = client.generate(task, prompt, **params)
            if as_json:
                _echo_json(result)
            else:
                typer.echo(result.text)
            return
        with client.generate_stream(task, prompt, **params) as chunks:
            if as_json:
                for chunk in chunks.chunks():
                    typer.echo(chunk.model_dump_json())
                return
            try:
                for piece in chunks:
                    typer.echo(piece, nl=False)
            finally:
                typer.echo("")  # end the line even when the stream breaks off
        if chunks.usage is not None:
            typer.echo(f"[{chunks.finish_reason}, {chunks.usage.completion_tokens} tokens]",
                       err=True)


@app.command()
def embed(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="Task name (or `base`)")],
    texts: Annotated[list[str], typer.Argument(help="Texts to embed")],
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Embed texts with a task (prints the first values; --json for all)."""
    with _session(ctx) as client:
        result = client.embed(task, texts, normalize=normalize)
    if as_json:
        _echo_json(result)
        return
    out = _out()
    out.print(f"{len(result.embeddings)} embeddings, dim {result.dim}", markup=False)
    for text, vec in zip(texts, result.embeddings, strict=False):
        head = ", ".join(f"{v:+.4f}" for v in vec[:6])
        out.print(f"{text[:40]!r}: [{head}{', ...' if len(vec) > 6 else ''}]", markup=False)


@app.command()
def health(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Is the server up, and ready to serve? Exits 1 when it is not ready."""
    with _session(ctx) as client:
        client.health()
        ready = client.ready()
    if as_json:
        _echo_json(ready)
    else:
        parts = [f"base {ready.base}" if ready.base else "no base",
                 f"model {'loaded' if ready.model_loaded else 'not loaded'}",
                 f"redis {'ok' if ready.redis else 'down'}"]
        _out().print(f"{'ready' if ready.ready else 'NOT ready'}: {', '.join(parts)}",
                     markup=False)
    if not ready.ready:
        raise typer.Exit(1)


@keys_app.command("new")
def keys_new() -> None:
    """A fresh random API key and its digest (give the key to the tenant, the digest to the server)."""
    key = new_api_key()
    typer.echo(f"key:    {key}\ndigest: {hash_api_key(key)}")


@keys_app.command("hash")
def keys_hash(key: str) -> None:
    """The digest of an API key, as the server's keys file stores it."""
    typer.echo(hash_api_key(key))


@app.command()
def version() -> None:
    """Print the installed taskdelta version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("taskdelta"))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LAZY:
        module, hint = LAZY[argv[0]]
        try:
            sub = importlib.import_module(module).app
        except ImportError as exc:
            typer.echo(f"error: `taskdelta {argv[0]}` needs the server extra ({exc.name} is "
                       f"missing): {hint}", err=True)
            raise SystemExit(2) from None
        sub(args=argv[1:], prog_name=f"taskdelta {argv[0]}")
        return
    app(args=argv, prog_name="taskdelta")


if __name__ == "__main__":
    main()
