"""`taskdelta serve` / `python -m taskdelta.server`: settings from env and flags, then uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Run the taskdelta server.", pretty_exceptions_enable=False)


@app.command()
def serve(
    base: Annotated[str | None, typer.Option(help="minilm | smollm2-135m | a model folder")] = None,
    device: Annotated[str | None, typer.Option(help="cuda | cpu (default: cuda if available)")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Embedded Redis data and state")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Use this Redis instead of the embedded one")] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    max_batch: Annotated[int | None, typer.Option()] = None,
    max_queue: Annotated[int | None, typer.Option()] = None,
    cache_bytes: Annotated[int | None, typer.Option()] = None,
    keys_file: Annotated[Path | None, typer.Option(help="JSON keys file (tenants -> key hashes)")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Local quickstart: no API keys")] = False,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Serve the REST API. Flags override TASKDELTA_* environment variables."""
    import uvicorn

    from taskdelta.deltas import BaseModelError, resolve_base

    from .app import create_app
    from .settings import get_settings

    given = {"base": base, "device": device, "dtype": dtype, "data_dir": data_dir,
             "redis_url": redis_url, "host": host, "port": port, "max_batch": max_batch,
             "max_queue": max_queue, "cache_bytes": cache_bytes, "keys_file": keys_file}
    overrides = {k: v for k, v in given.items() if v is not None}
    if no_auth:
        overrides["auth"] = False
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = get_settings(**overrides)
        resolve_base(settings.base)  # a wrong --base is one line here, not a startup traceback
        api = create_app(settings)
    except (ValueError, BaseModelError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    uvicorn.run(api, host=settings.host, port=settings.port, log_level=log_level,
                timeout_graceful_shutdown=10)


def main() -> None:
    app(prog_name="taskdelta serve")
