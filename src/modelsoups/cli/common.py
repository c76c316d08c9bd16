"""Option types, parsers and output helpers shared by every `soup` subcommand.

Each option mirrors a keyword of the Python function of the same name, one to one.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import SoupError

if TYPE_CHECKING:
    from ..dtypes import DType
    from ..types import Progress

STATE: dict[str, bool] = {"quiet": False, "debug": False}

Inputs = Annotated[
    list[str],
    typer.Argument(help="Checkpoints: files, HF folders, globs, or .txt files listing paths."),
]
Output = Annotated[Path, typer.Option("--output", "-o", help="*.safetensors file or a folder.")]
Key = Annotated[
    str | None, typer.Option(help="Pickles: nested key holding the weights, e.g. state_dict.")
]
UnsafePickle = Annotated[
    bool, typer.Option("--unsafe-pickle", help="Allow pickles that run code. Trusted files only!")
]
Dtype = Annotated[
    str | None, typer.Option(help="Output dtype of float tensors: fp32, fp16, bf16, fp64.")
]
Accumulate = Annotated[str, typer.Option(help="Accumulator dtype: float32 or float64.")]
NonFloat = Annotated[
    str, typer.Option(help="Integer buffers that differ: 'error' or take the 'first' input's.")
]
AllowNonfinite = Annotated[
    bool, typer.Option("--allow-nonfinite", help="Average NaN/Inf weights instead of failing.")
]
MaxShardSize = Annotated[
    str | None, typer.Option(help="Write an HF sharded folder, shards up to this size (5GB).")
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summaries.")]


def parse_dtype(name: str | None) -> DType | None:
    """'bf16' -> the BF16 `DType`; None stays None (keep the inputs' dtype). The library's
    `output_dtype`, minus float8: readable as an input, not offered as an output here."""
    from ..average import output_dtype

    dtype = output_dtype(name)
    if dtype is not None and dtype.name.startswith("F8"):
        raise SoupError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16, fp64")
    return dtype


def parse_size(text: str | None) -> int | None:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2*2**30, '1000' -> 1000 bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise SoupError(f"cannot read size {text!r}; write e.g. 500MB, 5GB or 2GiB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    value = float(m.group(1)) * base**power
    if not math.isfinite(value) or value >= 2**63:
        raise SoupError(f"size {text[:40]!r} is too large")
    size = int(value)
    if size <= 0:
        raise SoupError(f"size must be positive, got {text!r}")
    return size


def parse_floats(text: str, what: str) -> list[float]:
    """'0.5,0.3,0.2' -> [0.5, 0.3, 0.2]."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SoupError(
            f"cannot read {what} {text[:80]!r}; write numbers separated by commas"
        ) from None


def err(message: str) -> None:
    """A line on stderr (warnings, notes); errors are printed by `main`."""
    print(message, file=sys.stderr)


def say(message: str) -> None:
    if not STATE["quiet"]:
        print(message)


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


def report_result(result: Any) -> None:
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
