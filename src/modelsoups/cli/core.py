"""`soup inspect`, `soup uniform`, `soup weighted`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from .common import STATE, err
from .options import (
    AllowDifferentBase,
    CompareBase,
    Inputs,
    MeanOptions,
    Output,
    Quiet,
    ReadOptions,
    WeightOptions,
    expand_bundles,
    linear_weights,
)


@expand_bundles
def inspect(
    inputs: Inputs,
    *,
    read: ReadOptions,
    base: CompareBase = None,
    allow_different_base: AllowDifferentBase = False,
) -> None:
    """Format, tensors, dtypes and size of each checkpoint; can the set be souped?

    Exits 1 if the set is incompatible (keys, shapes or dtypes differ), and prints how
    similar the ingredients are: ingredients fine-tuned from different initialisations
    make useless soups, and a low weight cosine similarity says so before you spend time.
    """
    from rich.console import Console
    from rich.table import Table

    _no_blas_threads()
    from ..adapters import is_adapter_set
    from ..errors import IncompatibleError
    from ..inspect import human_bytes, inspect_checkpoints
    from ..io import expand_inputs
    from .lora import print_adapters

    paths = expand_inputs(inputs)
    if is_adapter_set(paths):
        return print_adapters(paths, allow_different_base)
    report = inspect_checkpoints(paths, key=read.key, unsafe_pickle=read.unsafe_pickle, base=base)
    table = Table("checkpoint", "format", "tensors", "parameters", "dtypes", "on disk")
    for s in report.checkpoints:
        dtypes = ", ".join(f"{d}×{n}" for d, n in s.dtypes.items())
        table.add_row(
            str(s.path),
            s.format,
            str(s.tensors),
            f"{s.parameters:,}",
            dtypes,
            human_bytes(s.size_on_disk),
        )
    console = Console()
    console.print(table)
    for s in report.checkpoints:
        for note in s.notes:
            console.print(f"{s.path}: {note}", markup=False)
    if not report.compatible:
        raise IncompatibleError(report.verdict.removeprefix("incompatible: "))
    console.print(report.verdict, markup=False)
    if "similarity" in report.extra:
        print_similarity(console, report.extra["similarity"])


def print_similarity(console: Any, sim: Any) -> None:
    """`soup inspect`'s similarity tables (a `SimilarityReport`) and its warning."""
    from rich.table import Table

    short = [Path(n).name for n in sim.names]
    tables = [("weights", sim.cosine)]
    if sim.delta_cosine is not None:
        tables.append(("deltas from the base", sim.delta_cosine))
    for what, matrix in tables:
        table = Table("", *short, title=f"cosine similarity of {what} (sampled)")
        for name, row in zip(short, matrix, strict=True):
            table.add_row(name, *(f"{x:.3f}" for x in row))
        console.print(table)
    if sim.warning:
        err(f"soup: warning: {sim.warning}")


def _no_blas_threads() -> None:
    """Before numpy is imported: these commands never call BLAS, whose idle threads would
    otherwise spin on the cores the soup uses (measured: 1-4% of a soup's CPU)."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _average(
    inputs: list[str], output: Path, recipe: str, mean: MeanOptions, weighting: WeightOptions | None
) -> None:
    """`soup uniform` (no `weighting`) and `soup weighted`: the streamed mean of files, or
    of adapters."""
    weights, normalize, allow_negative = linear_weights(weighting)  # a typo fails first
    _no_blas_threads()
    from ..adapters import is_adapter_set
    from ..io import expand_inputs
    from .lora import refuse_lora_options, soup_adapters
    from .outputs import write_mean

    paths = expand_inputs(inputs)
    if is_adapter_set(paths):
        return soup_adapters(paths, output, recipe, mean, weighting)
    refuse_lora_options(mean.lora)
    write_mean(paths, output, weights, recipe=recipe, read=mean.read, write=mean.write,
               average=mean.average, normalize=normalize,
               allow_negative=allow_negative)  # fmt: skip


@expand_bundles
def uniform(inputs: Inputs, output: Output, *, mean: MeanOptions, quiet: Quiet = False) -> None:
    """Uniform soup: the plain mean of all checkpoints (streamed, one tensor at a time)."""
    STATE["quiet"] = STATE["quiet"] or quiet
    _average(inputs, output, "uniform", mean, None)


@expand_bundles
def weighted(
    inputs: Inputs,
    output: Output,
    *,
    weighting: WeightOptions,
    mean: MeanOptions,
    quiet: Quiet = False,
) -> None:
    """Weighted soup: Σ wᵢ·θᵢ with your weights (normalised to sum 1 unless --no-normalize)."""
    STATE["quiet"] = STATE["quiet"] or quiet
    _average(inputs, output, "weighted", mean, weighting)


def register(app: typer.Typer) -> None:
    app.command()(inspect)
    app.command()(uniform)
    app.command()(weighted)
