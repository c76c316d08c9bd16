"""What every `soup` subcommand shares: the global quiet/debug state and output helpers.

The options themselves are declared in `options.py`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..types import Progress, SoupResult

STATE: dict[str, bool] = {"quiet": False, "debug": False}


def printable(message: str) -> str:
    """`message` on one line: newlines and control characters (in a file name, say) shown
    escaped, as in error lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def err(message: str) -> None:
    """A line on stderr (warnings, notes); errors are printed by `main`."""
    print(printable(message), file=sys.stderr)


def say(message: str) -> None:
    if not STATE["quiet"]:
        print(printable(message))


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Progress | None]:
    """A rich progress bar on stderr, fed with (done, total) bytes; nothing when quiet."""
    if STATE["quiet"] or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield update


def report_result(result: SoupResult) -> None:
    """Print a soup's summary, warnings and notes (stderr for the latter two)."""
    from ..inspect import human_bytes

    for w in result.warnings:
        err(f"soup: warning: {w}")
    if STATE["quiet"]:
        return
    for n in result.notes:
        err(f"soup: note: {n}")
    say(
        f"wrote {result.output} ({result.recipe} soup of {len(result.ingredients)}, "
        f"{result.tensors} tensors, {human_bytes(result.bytes_written)}) "
        f"in {result.seconds:.1f} s"
    )
