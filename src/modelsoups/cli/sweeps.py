"""`soup wise-ft` and `soup task-arithmetic`: a linear mix of checkpoints, one value or a
held-out sweep.

A sweep (`recipes/sweep.py`, the library's one sweep) scores each mixing value (α or the
scale) with the eval command, each candidate written tensor by tensor in the output dtype,
logs every score to `SOUP.history.jsonl` (resumable), then streams the best mix to the
output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..errors import SoupError
from .common import STATE, say
from .evaluate import command_evaluator, merged_for, scoring_evaluators
from .greedy import scorer
from .options import (
    Alpha,
    Alphas,
    AverageOptions,
    Base,
    Finetuned,
    Inputs,
    Output,
    Quiet,
    Scale,
    Scales,
    SweepOptions,
    Zeroshot,
    expand_bundles,
)
from .outputs import (
    check_outputs,
    naming_output,
    scoring_reads,
    sidecar,
    write_mean,
    write_report,
)

if TYPE_CHECKING:
    from ..metrics import MetricEvaluator


@dataclass(frozen=True)
class Mix:
    """A linear mix of checkpoints: `weights_of(value)` are the weights of `paths` for one
    value of the mixing coefficient (`coefficient`: alpha or scale)."""

    recipe: str
    coefficient: str
    paths: list[Path]
    weights_of: Callable[[float], list[float]]


@expand_bundles
def wise_ft(
    zeroshot: Zeroshot,
    finetuned: Finetuned,
    output: Output,
    alpha: Alpha = 0.5,
    alphas: Alphas = None,
    *,
    sweep: SweepOptions,
    quiet: Quiet = False,
) -> None:
    """WiSE-FT: interpolate zero-shot and fine-tuned weights; sweep α on held-out data."""
    STATE["quiet"] = STATE["quiet"] or quiet
    mix = Mix("wise-ft", "alpha", [Path(zeroshot), Path(finetuned)], lambda a: [1.0 - a, a])
    _write_mix(mix, output, alpha, alphas, sweep)


@expand_bundles
def task_arithmetic(
    finetuned: Inputs,
    output: Output,
    base: Base,
    scale: Scale = 1.0,
    scales: Scales = None,
    *,
    sweep: SweepOptions,
    quiet: Quiet = False,
) -> None:
    """Task arithmetic: add the scaled sum of task vectors θᵢ − θ₀ to the base θ₀."""
    from ..io import expand_inputs
    from ..recipes.task_arithmetic import task_arithmetic_weights

    STATE["quiet"] = STATE["quiet"] or quiet
    paths = [Path(base), *expand_inputs(finetuned)]
    n = len(paths) - 1
    mix = Mix("task-arithmetic", "scale", paths, lambda s: task_arithmetic_weights(n, s))
    _write_mix(mix, output, scale, scales, sweep)


def _write_mix(
    mix: Mix,
    output: Path,
    value: float,
    values: str | None,
    options: SweepOptions,
) -> None:
    """WiSE-FT and task arithmetic: one value, or a held-out sweep of `values`, then a
    streamed write."""
    from ..recipes.wise_ft import parse_alphas

    search, read, write = options.search, options.read, options.write
    started, what, records = time.perf_counter(), mix.coefficient, search.records
    reads = scoring_reads(search.scoring)
    check_outputs(output, mix.paths, write, records, reads, options.adapters)
    scored: list[dict[str, Any]] = []
    metric, _ = scoring_evaluators(search.scoring, mix.paths[0])
    if values is not None:
        if not search.scoring.given:
            raise SoupError(f"a sweep needs --eval or --metric to choose the best {what} on "
                            "held-out data")  # fmt: skip
        value, scored = _sweep(mix, output, parse_alphas(values), metric, options)
        say(f"best {what} = {value:g} (held-out {records.dataset} "
            f"{max(r[records.dataset] for r in scored):.6g})")  # fmt: skip
    elif search.scoring.given:
        raise SoupError(f"--eval/--metric score a sweep: give --{what}s, e.g. 0:1:0.1")
    weights = mix.weights_of(value)
    result = write_mean(mix.paths, output, weights, recipe=mix.recipe, read=read, write=write,
                        average=AverageOptions(accumulate="float64"), normalize=False,
                        allow_negative=True, adapters=options.adapters)  # fmt: skip
    write_report(sidecar(output, ".report.json", records.report), {
        "recipe": mix.recipe, "output": str(output), what: value, "weights": weights,
        "ingredients": [str(p) for p in mix.paths], "sweep": scored, "dataset": records.dataset,
        "warnings": result.warnings, "seconds": {"total": time.perf_counter() - started},
    })  # fmt: skip


def _sweep(
    mix: Mix,
    output: Path,
    values: list[float],
    metric: MetricEvaluator | None,
    options: SweepOptions,
) -> tuple[float, list[dict[str, Any]]]:
    """Score each mixing value on held-out data (resumably); return the best and the log.
    The inputs (and a --merge-into base) must stay as they were until the soup is written."""
    from ..candidate import candidate_folder
    from ..guard import GuardedEvaluator, InputGuard
    from ..recipes.sweep import sweep

    search, read, write = options.search, options.read, options.write
    scoring, records = search.scoring, search.records
    executor = search.parallel.executor()
    guard = InputGuard([*mix.paths, *filter(None, [options.adapters.merge_into])])
    with candidate_folder(output) as work, naming_output(output):
        command = command_evaluator(scoring.eval_command, scoring.eval_timeout, work)
        evaluator = metric or merged_for(command, options.adapters.merge_into)
        assert evaluator is not None  # checked by the caller: --eval or --metric was given
        guarded = GuardedEvaluator(evaluator, guard)
        result = sweep(
            mix.paths, mix.weights_of, guarded, values, name=mix.coefficient,
            recipe=mix.recipe, dtype=write.output_dtype(), dataset=records.dataset,
            history=sidecar(output, ".history.jsonl", records.history), resume=search.resume,
            executor=executor, keep_best=False, key=read.key, unsafe_pickle=read.unsafe_pickle,
            allow_different_base=options.adapters.allow_different_base,
            scorer=scorer(metric, scoring.eval_command),
        )  # fmt: skip
    guard.check("before the final write")
    return result.best, result.records


def register(app: typer.Typer) -> None:
    app.command("wise-ft")(wise_ft)
    app.command("task-arithmetic")(task_arithmetic)
