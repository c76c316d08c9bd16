"""The root `soup` command group and its global options; the subcommands register
themselves on it when the `cli` package is imported (`cli/__init__.py`)."""

from __future__ import annotations

from typing import Any

import typer
import typer.main
from typer.core import TyperArgument, TyperGroup, TyperOption

from .common import STATE

__all__ = ["app", "command"]

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


def command() -> TyperGroup:
    """The click group of `app`, drawn in click's usual help style.

    This typer draws every option's type, flags included (`--resume <bool>`), and required
    arguments as `{inputs}...`; flags are shown bare and arguments as `INPUTS...` instead.
    """
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)  # `app` has subcommands (typer's own click)
    for sub in [group, *group.commands.values()]:
        setattr(sub, "get_help_option", _bare_help(sub.get_help_option))  # noqa: B010
        for param in sub.params:
            if isinstance(param, TyperOption) and param.is_flag:
                param.metavar = ""  # typer shows a set metavar instead of the type
            elif isinstance(param, TyperArgument):
                usage = str(param.name).upper() + ("..." if param.nargs != 1 else "")
                usage = usage if param.required else f"[{usage}]"
                # click calls these with ctx (by keyword): the name must stay
                setattr(param, "get_usage_pieces", lambda ctx, usage=usage: [usage])  # noqa: ARG005, B010
                setattr(param, "display_type_rich", lambda ctx: None)  # noqa: ARG005, B010
    return group


def _bare_help(get_help_option: Any) -> Any:
    """`--help` is a flag too, made afresh for each context (click's types are typer's
    private copy, hence Any)."""

    def bare(ctx: Any) -> Any:
        option = get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    return bare
