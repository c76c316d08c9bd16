"""Options and helpers shared by `soup greedy`, `soup wise-ft`, `soup task-arithmetic` and
`soup stock` (the commands live in `greedy.py`, `sweeps.py` and `stock.py`).

Each writes the soup with the streaming atomic writer, a JSON report next to it
(`SOUP.report.json`: recipe, ingredients, weights, scores, times) and, when something is
scored, the evaluation history (`SOUP.history.jsonl`, resumable with `--resume`). Nothing
is written to the output name until selection has finished.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import OutputError
from .common import parse_dtype, parse_size, progress_bar, report_result

Eval = Annotated[
    str | None,
    typer.Option("--eval", help='Held-out eval command, e.g. "python eval.py --ckpt {ckpt}".'),
]
EvalTimeout = Annotated[float | None, typer.Option(help="Seconds before an eval is killed.")]
Workers = Annotated[int, typer.Option(help="Parallel evaluations of independent candidates.")]
Ray = Annotated[
    bool, typer.Option("--ray", help="Evaluate on a local Ray runtime (the ray extra).")
]
RayAddress = Annotated[
    str | None,
    typer.Option(help="Evaluate on this Ray cluster; checkpoints go by path (shared disk)."),
]
Dataset = Annotated[str, typer.Option(help="Name of the held-out metric in the history.")]
History = Annotated[Path | None, typer.Option(help="History JSONL (default: SOUP.history.jsonl).")]
Report = Annotated[Path | None, typer.Option(help="JSON report (default: SOUP.report.json).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from an existing history.")]


def sidecar(out: Path, suffix: str, given: Path | None) -> Path:
    """`given`, else `out` with its `.safetensors` suffix replaced by `suffix`."""
    return (
        given
        if given is not None
        else out.with_name(out.name.removesuffix(".safetensors") + suffix)
    )


def prepare(
    out: Path,
    inputs: list[Path],
    overwrite: bool,
    max_shard_size: str | None,
    opts: dict[str, Any] | None = None,
) -> None:
    """Fail before any evaluation if the output could not be written at the end, or if any
    path the run writes (report, history, candidate folder) is an input or another output.
    `opts`: the command's options (`report`, `history`, `scores`)."""
    from ..candidate import CANDIDATES
    from ..io.writer import check_destination, check_output, check_sharding, temporary_name

    opts = opts or {}
    sidecars = [sidecar(out, ".report.json", opts.get("report")),
                sidecar(out, ".history.jsonl", opts.get("history")),
                temporary_name(out, CANDIDATES)]  # fmt: skip
    given = [Path(opts["scores"])] if opts.get("scores") is not None else []
    check_output(out, [*inputs, *given], sidecars=sidecars)
    check_sharding(out, parse_size(max_shard_size))
    check_destination(out, overwrite=overwrite)
    try:  # the candidate folder, history and report go there too: fail now, not at the end
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name[:64]}.soup-check-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"{out}: cannot write in {out.parent} ({e.strerror})") from None


def evaluator(command: str | None, timeout: float | None, workdir: Path) -> Any:
    """A `CommandEvaluator` writing its candidates under `workdir` (a `candidate_folder`),
    or None without a command."""
    if command is None:
        return None
    from ..evaluate import CommandEvaluator

    return CommandEvaluator(command, timeout=timeout, workdir=workdir)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write `report` (plus the version) as JSON to `path`, atomically."""
    from ..io.writer import write_json
    from ..version import __version__

    write_json(path, {**report, "modelsoups_version": __version__})


def write_mean(
    paths: list[Path],
    out: Path,
    weights: list[float] | None,
    shown: Sequence[str] = (),
    **opts: Any,
) -> Any:
    """Stream the (weighted) mean of `paths` into `out` with a progress bar; print the result.

    Warnings in `shown` (printed already, e.g. by the selection) are dropped, not repeated.
    """
    from ..recipes.uniform import soup_files  # models, or LoRA adapters (exact)

    opts["dtype"] = parse_dtype(opts.pop("dtype"))
    opts["max_shard_size"] = parse_size(opts.pop("max_shard_size"))
    with progress_bar(f"{opts['recipe']} soup") as bar:
        result = soup_files(paths, out, weights=weights, progress=bar, **opts)
    result.warnings = [w for w in result.warnings if w not in shown]
    report_result(result)
    return result
