"""The root `soup` command group and its global options; the subcommands register
themselves on it when the `cli` package is imported (`cli/__init__.py`)."""

from __future__ import annotations

import typer

from .common import STATE

__all__ = ["app"]

app = typer.Typer(
    name="soup",
    help="Model soups: average fine-tuned checkpoints into one better model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summaries."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    STATE["quiet"] = STATE["quiet"] or quiet
    STATE["debug"] = STATE["debug"] or debug
