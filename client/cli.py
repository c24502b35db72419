"""The `taskdelta` command. Commands that need torch (`delta`, `serve`) load lazily, so the
bare SDK install (`pip install taskdelta`) runs the client commands without torch."""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(help="taskdelta: many fine-tuned tasks served from one base model.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

# command -> (module with a typer `app`, what to install when it is missing)
LAZY = {
    "delta": ("taskdelta.deltas.cli", "pip install 'taskdelta[server]'"),
}


def _lazy_placeholder(name: str, help_text: str) -> None:
    @app.command(name, help=help_text, context_settings={"allow_extra_args": True,
                                                          "ignore_unknown_options": True})
    def _placeholder() -> None:  # main() dispatches before typer ever gets here
        raise typer.Exit(2)


_lazy_placeholder("delta", "Make and inspect delta files (extract, inspect, random).")


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
