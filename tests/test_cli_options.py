"""cli/options.py: a bundle parameter is shown to typer as its fields, and comes back built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import pytest
import typer
import typer.main

from modelsoups.cli.options import ReadOptions, expand_bundles

Depth = Annotated[int, typer.Option(help="How deep.")]
Name = Annotated[str | None, typer.Option("--name", help="A name.")]


@dataclass(frozen=True)
class Inner:
    depth: Depth = 3


@dataclass(frozen=True)
class Outer:
    name: Name = None
    inner: Inner = field(default_factory=Inner)


def _run(command: object, args: list[str]) -> None:
    app = typer.Typer()
    app.command()(command)
    app.command("other")(lambda: None)  # a group, so the command is named on the line
    typer.main.get_command(app).main(["command", *args], standalone_mode=False)


def test_nested_bundles_become_options_with_their_defaults_and_come_back_built() -> None:
    seen = []

    @expand_bundles
    def command(path: str, *, outer: Outer, read: ReadOptions, flag: bool = False) -> None:
        seen.append((path, outer, read, flag))

    _run(command, ["p", "--name", "n", "--depth", "5", "--unsafe-pickle"])
    _run(command, ["q"])
    assert seen == [
        ("p", Outer("n", Inner(5)), ReadOptions(None, True), False),
        ("q", Outer(), ReadOptions(), False),
    ]
    app = typer.Typer(add_completion=False)
    app.command()(command)  # one command: get_command gives the command itself
    options = [p.name for p in typer.main.get_command(app).params]
    assert options == ["path", "name", "depth", "key", "unsafe_pickle", "flag"]


def test_an_option_in_two_bundles_is_refused_when_the_command_is_declared() -> None:
    def command(*, a: ReadOptions, b: ReadOptions) -> None:
        del a, b

    with pytest.raises(TypeError, match="two bundles"):
        expand_bundles(command)
