"""`soup inspect`, `soup uniform`, `soup weighted`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import (
    STATE,
    Accumulate,
    AllowNonfinite,
    Dtype,
    Inputs,
    Key,
    MaxShardSize,
    NonFloat,
    Output,
    Overwrite,
    Quiet,
    UnsafePickle,
    err,
    parse_dtype,
    parse_floats,
    parse_size,
    progress_bar,
    report_result,
)
from .lora import AllowDifferentBase, LoraAverage, MergeInto, Rank, lora_options


def inspect(
    inputs: Inputs,
    key: Key = None,
    unsafe_pickle: UnsafePickle = False,
    base: Annotated[
        str | None, typer.Option(help="Pretrained checkpoint: also compare deltas from it.")
    ] = None,
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
    report = inspect_checkpoints(paths, key=key, unsafe_pickle=unsafe_pickle, base=base)
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
    inputs: list[str],
    output: typer.models.OptionInfo | object,
    weights: list[float] | None,
    recipe: str,
    **options: object,
) -> None:
    _no_blas_threads()
    from ..adapters import is_adapter_set
    from ..io import expand_inputs
    from ..stream import average_checkpoints
    from .lora import refuse_lora_options, soup_adapters

    paths, lora = expand_inputs(inputs), options.pop("lora")
    if is_adapter_set(paths):
        options["dtype"] = parse_dtype(options.pop("dtype_name"))  # type: ignore[arg-type]
        return soup_adapters(paths, output, weights, recipe, lora, options)  # type: ignore[arg-type]
    refuse_lora_options(lora)  # type: ignore[arg-type]
    options["dtype"] = parse_dtype(options.pop("dtype_name"))  # type: ignore[arg-type]
    options["max_shard_size"] = parse_size(options["max_shard_size"])  # type: ignore[arg-type]
    with progress_bar(f"{recipe} soup") as bar:
        result = average_checkpoints(
            paths,
            output,  # type: ignore[arg-type]
            weights=weights,
            recipe=recipe,
            progress=bar,
            **options,  # type: ignore[arg-type]
        )
    report_result(result)


def uniform(
    inputs: Inputs,
    output: Output,
    key: Key = None,
    unsafe_pickle: UnsafePickle = False,
    dtype: Dtype = None,
    accumulate: Accumulate = "float32",
    non_float: NonFloat = "error",
    allow_nonfinite: AllowNonfinite = False,
    max_shard_size: MaxShardSize = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    merge_into: MergeInto = None,
    rank: Rank = None,
    lora_average: LoraAverage = "exact",
    allow_different_base: AllowDifferentBase = False,
) -> None:
    """Uniform soup: the plain mean of all checkpoints (streamed, one tensor at a time)."""
    STATE["quiet"] = STATE["quiet"] or quiet
    _average(
        inputs,
        output,
        None,
        "uniform",
        key=key,
        unsafe_pickle=unsafe_pickle,
        dtype_name=dtype,
        accumulate=accumulate,
        non_float=non_float,
        allow_nonfinite=allow_nonfinite,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        lora=lora_options(merge_into, rank, lora_average, allow_different_base),
    )


def weighted(
    inputs: Inputs,
    output: Output,
    weights: Annotated[str, typer.Option(help="One weight per input: 0.5,0.3,0.2")],
    normalize: Annotated[bool, typer.Option(help="Scale weights to sum to one.")] = True,
    allow_negative: Annotated[
        bool, typer.Option("--allow-negative", help="Allow negative weights.")
    ] = False,
    key: Key = None,
    unsafe_pickle: UnsafePickle = False,
    dtype: Dtype = None,
    accumulate: Accumulate = "float32",
    non_float: NonFloat = "error",
    allow_nonfinite: AllowNonfinite = False,
    max_shard_size: MaxShardSize = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    merge_into: MergeInto = None,
    rank: Rank = None,
    lora_average: LoraAverage = "exact",
    allow_different_base: AllowDifferentBase = False,
) -> None:
    """Weighted soup: Σ wᵢ·θᵢ with your weights (normalised to sum 1 unless --no-normalize)."""
    STATE["quiet"] = STATE["quiet"] or quiet
    _average(
        inputs,
        output,
        parse_floats(weights, "weights"),
        "weighted",
        normalize=normalize,
        allow_negative=allow_negative,
        key=key,
        unsafe_pickle=unsafe_pickle,
        dtype_name=dtype,
        accumulate=accumulate,
        non_float=non_float,
        allow_nonfinite=allow_nonfinite,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        lora=lora_options(merge_into, rank, lora_average, allow_different_base),
    )


def register(app: typer.Typer) -> None:
    app.command()(inspect)
    app.command()(uniform)
    app.command()(weighted)
