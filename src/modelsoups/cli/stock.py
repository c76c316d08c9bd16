"""`soup stock`: Model Stock over checkpoint files, streamed; optionally scored once."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .common import STATE, progress_bar, say
from .evaluate import command_evaluator, scoring_evaluators
from .greedy import scorer
from .options import (
    Accumulate,
    Base,
    EvalOptions,
    Inputs,
    Output,
    Quiet,
    ReadOptions,
    RecordOptions,
    WriteOptions,
    expand_bundles,
)
from .outputs import check_outputs, scoring_reads, sidecar, write_report

if TYPE_CHECKING:
    from ..evaluate import CommandEvaluator, Score
    from ..metrics import MetricEvaluator


@expand_bundles
def stock(
    finetuned: Inputs,
    output: Output,
    base: Base,
    *,
    scoring: EvalOptions,
    records: RecordOptions,
    read: ReadOptions,
    write: WriteOptions,
    accumulate: Accumulate = "float32",
    quiet: Quiet = False,
) -> None:
    """Model Stock: per layer, pull the fine-tunes' mean towards θ₀ by their angle."""
    from ..history import History, check_dataset, record
    from ..io import expand_inputs

    STATE["quiet"] = STATE["quiet"] or quiet
    dataset = records.dataset
    check_dataset(dataset)
    started, paths = time.perf_counter(), [Path(base), *expand_inputs(finetuned)]
    check_outputs(output, paths, write, records, scoring_reads(scoring))
    metric, _ = scoring_evaluators(scoring, paths[0])
    ratios = _write_stock(paths, output, read, write, accumulate)
    say(f"wrote {output} (model stock of {len(paths) - 1} over {paths[0]}, mean t = "
        f"{sum(t for _, t in ratios.values()) / max(len(ratios), 1):.3f})")  # fmt: skip
    held_out, spec = None, scorer(metric, scoring.eval_command)
    evaluator = metric or command_evaluator(scoring.eval_command, scoring.eval_timeout,
                                            output.parent)  # fmt: skip
    if evaluator is not None:
        score = _score(evaluator, output)
        held_out = score.score
        with History(sidecar(output, ".history.jsonl", records.history), resume=True,
                     dataset=dataset) as log:  # fmt: skip
            log.append(record("final", "model_stock", dataset, score.score, score.metrics,
                              scorer=spec))  # fmt: skip
    write_report(sidecar(output, ".report.json", records.report), {
        "recipe": "model-stock", "output": str(output), "base": str(paths[0]),
        "ingredients": [str(p) for p in paths[1:]], "held_out": held_out, "dataset": dataset,
        "scorer": spec,
        "ratios": {k: {"cos": c, "t": t} for k, (c, t) in ratios.items()},
        "seconds": {"total": time.perf_counter() - started},
    })  # fmt: skip


def _score(ev: MetricEvaluator | CommandEvaluator, output: Path) -> Score:
    """The held-out score of the written soup: a metric loads it, a command gets a private
    copy (as for any ingredient), so that `rm {ckpt}` cannot delete the soup."""
    from ..io import open_checkpoint

    with contextlib.closing(open_checkpoint(output)) as soup:
        return ev.evaluate(soup, name="model stock")


def _write_stock(
    paths: list[Path], output: Path, read: ReadOptions, write: WriteOptions, accumulate: str
) -> dict[str, tuple[float, float]]:
    """Stream Model Stock of `paths` (base first) into `output`; the per-tensor (cos θ, t)."""
    from ..recipes.stock import write_model_stock

    with progress_bar("model stock") as bar:
        _, ratios = write_model_stock(
            paths[0], paths[1:], output, dtype=write.output_dtype(), accumulate=accumulate,
            max_shard_size=write.shard_bytes(), key=read.key, unsafe_pickle=read.unsafe_pickle,
            overwrite=write.overwrite, progress=bar,
        )  # fmt: skip
    return ratios


def register(app: typer.Typer) -> None:
    app.command()(stock)
