"""`soup wise-ft` and `soup task-arithmetic`: a linear mix of checkpoints, one value or a
held-out sweep.

A sweep (`recipes/sweep.py`, the library's one sweep) scores each mixing value (α or the
scale) with the eval command, each candidate written tensor by tensor in the output dtype,
logs every score to `SOUP.history.jsonl` (resumable), then streams the best mix to the
output.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import SoupError
from .common import (
    STATE,
    Dtype,
    Inputs,
    Key,
    MaxShardSize,
    Output,
    Overwrite,
    Quiet,
    UnsafePickle,
    parse_dtype,
    say,
)
from .evaluate import BatchSize, Data, Device, MaxLength, Metric, ModelDir, scoring
from .recipes import (
    Dataset,
    Eval,
    EvalTimeout,
    History,
    Ray,
    RayAddress,
    Report,
    Resume,
    Workers,
    evaluator,
    prepare,
    sidecar,
    write_mean,
    write_report,
)


def _sweep(
    recipe: str,
    what: str,
    paths: list[Path],
    output: Path,
    values: list[float],
    weights_of: Any,
    opts: dict[str, Any],
) -> tuple[float, list[dict[str, Any]]]:
    """Score each mixing value on held-out data (resumably); return the best and the log."""
    from ..candidate import candidate_folder
    from ..executor_ray import make_executor
    from ..recipes.sweep import sweep

    executor = make_executor(opts["workers"], ray=opts["ray"], ray_address=opts["ray_address"])
    with candidate_folder(output) as work:
        result = sweep(
            paths, weights_of,
            opts["metric_evaluator"] or evaluator(opts["eval_command"], opts["eval_timeout"], work),
            values, name=what, recipe=recipe, dtype=parse_dtype(opts["dtype"]),
            dataset=opts["dataset"], history=sidecar(output, ".history.jsonl", opts["history"]),
            resume=opts["resume"], executor=executor, keep_best=False, key=opts["key"],
            unsafe_pickle=opts["unsafe_pickle"],
        )  # fmt: skip
    return result.best, result.records


def _linear(
    recipe: str,
    what: str,
    paths: list[Path],
    output: Path,
    value: float,
    sweep: str | None,
    weights_of: Any,
    opts: dict[str, Any],
) -> None:
    """WiSE-FT and task arithmetic: one value, or a held-out sweep, then a streamed write."""
    from ..recipes.wise_ft import parse_alphas

    STATE["quiet"] = STATE["quiet"] or opts.pop("quiet")
    started = time.perf_counter()
    prepare(output, paths, opts["overwrite"], opts["max_shard_size"], opts)
    scored: list[dict[str, Any]] = []
    opts["metric_evaluator"], _ = scoring(opts, paths[0])
    scores = opts["eval_command"] is not None or opts["metric"] is not None
    if sweep is not None:
        if not scores:
            raise SoupError(f"a sweep needs --eval or --metric to choose the best {what} on "
                            "held-out data")  # fmt: skip
        value, scored = _sweep(recipe, what, paths, output, parse_alphas(sweep), weights_of, opts)
        say(f"best {what} = {value:g} (held-out {opts['dataset']} "
            f"{max(r[opts['dataset']] for r in scored):.6g})")  # fmt: skip
    elif scores:
        raise SoupError(f"--eval/--metric score a sweep: give --{what}s, e.g. 0:1:0.1")
    weights = weights_of(value)
    write = {k: opts[k] for k in ("key", "unsafe_pickle", "dtype", "max_shard_size", "overwrite")}
    result = write_mean(paths, output, weights, recipe=recipe, normalize=False,
                        allow_negative=True, accumulate="float64", **write)  # fmt: skip
    write_report(sidecar(output, ".report.json", opts["report"]), {
        "recipe": recipe, "output": str(output), what: value, "weights": weights,
        "ingredients": [str(p) for p in paths], "sweep": scored, "dataset": opts["dataset"],
        "warnings": result.warnings, "seconds": {"total": time.perf_counter() - started},
    })  # fmt: skip


def wise_ft(
    zeroshot: Annotated[str, typer.Argument(help="Zero-shot / pretrained checkpoint (α=0).")],
    finetuned: Annotated[str, typer.Argument(help="Fine-tuned checkpoint (α=1).")],
    output: Output,
    alpha: Annotated[float, typer.Option(help="θ = (1-α)·zero-shot + α·fine-tuned.")] = 0.5,
    alphas: Annotated[
        str | None, typer.Option(help="Sweep, e.g. 0:1:0.1 or 0.3,0.5 (needs --eval).")
    ] = None,
    eval_command: Eval = None,
    eval_timeout: EvalTimeout = None,
    metric: Metric = None,
    data: Data = None,
    device: Device = "auto",
    batch_size: BatchSize = 8,
    max_length: MaxLength = 512,
    model: ModelDir = None,
    workers: Workers = 1,
    ray: Ray = False,
    ray_address: RayAddress = None,
    dataset: Dataset = "held_out",
    history: History = None,
    report: Report = None,
    resume: Resume = False,
    key: Key = None,
    unsafe_pickle: UnsafePickle = False,
    dtype: Dtype = None,
    max_shard_size: MaxShardSize = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """WiSE-FT: interpolate zero-shot and fine-tuned weights; sweep α on held-out data."""
    opts = dict(locals())
    paths = [Path(opts.pop("zeroshot")), Path(opts.pop("finetuned"))]
    _linear("wise-ft", "alpha", paths, output, alpha, alphas, lambda a: [1.0 - a, a], opts)


def task_arithmetic(
    finetuned: Inputs,
    output: Output,
    base: Annotated[str, typer.Option(help="The pretrained checkpoint θ₀.")],
    scale: Annotated[float, typer.Option(help="θ = θ₀ + scale·Σ(θᵢ − θ₀).")] = 1.0,
    scales: Annotated[str | None, typer.Option(help="Sweep, e.g. 0:1:0.1 (needs --eval).")] = None,
    eval_command: Eval = None,
    eval_timeout: EvalTimeout = None,
    metric: Metric = None,
    data: Data = None,
    device: Device = "auto",
    batch_size: BatchSize = 8,
    max_length: MaxLength = 512,
    model: ModelDir = None,
    workers: Workers = 1,
    ray: Ray = False,
    ray_address: RayAddress = None,
    dataset: Dataset = "held_out",
    history: History = None,
    report: Report = None,
    resume: Resume = False,
    key: Key = None,
    unsafe_pickle: UnsafePickle = False,
    dtype: Dtype = None,
    max_shard_size: MaxShardSize = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Task arithmetic: add the scaled sum of task vectors θᵢ − θ₀ to the base θ₀."""
    from ..io import expand_inputs
    from ..recipes.task_arithmetic import task_arithmetic_weights

    opts = dict(locals())
    paths = [Path(base), *expand_inputs(opts.pop("finetuned"))]
    n = len(paths) - 1
    _linear("task-arithmetic", "scale", paths, output, scale, scales,
            lambda s: task_arithmetic_weights(n, s), opts)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("wise-ft")(wise_ft)
    app.command("task-arithmetic")(task_arithmetic)
