"""`soup wise-ft` and `soup task-arithmetic`: a linear mix of checkpoints, one value or a
held-out sweep.

A sweep scores each mixing value (α or the scale) with the eval command, computing each
candidate tensor by tensor, logs every score to `SOUP.history.jsonl` (resumable), then
streams the best mix to the output.
"""

from __future__ import annotations

import functools
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
    say,
)
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


def _score_mix(evaluator: Any, paths: list[Path], opts: dict[str, Any], item: Any) -> Any:
    """Score Σ wᵢ·θᵢ of checkpoint files, computed tensor by tensor (runs in a worker)."""
    from ..average import weighted_sum
    from ..candidate import LazyCheckpoint, model_files_source
    from ..errors import EvaluationError
    from ..ingredients import close_all, open_ingredients

    name, weights = item
    ckpts = open_ingredients(paths, **opts)
    try:

        def compute(k: str) -> Any:
            if not ckpts[0].infos[k].is_float:
                return ckpts[0].get(k)
            return weighted_sum([c.get(k) for c in ckpts], weights)

        folder = model_files_source(ckpts)
        cand = LazyCheckpoint(f"<{name}>", ckpts[0].infos, compute, model_files_from=folder)
        return evaluator.evaluate(cand, name=name)
    except EvaluationError as e:
        return e
    finally:
        close_all(ckpts)


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
    from ..errors import EvaluationError
    from ..evaluate import Score
    from ..executor_ray import make_executor
    from ..history import History

    dataset = opts["dataset"]
    log = History(sidecar(output, ".history.jsonl", opts["history"]), resume=opts["resume"])
    done = {r["model_name"]: r for r in log.records if r.get("kind") == "sweep"}
    todo = [(f"{recipe}_{what}={v:g}", weights_of(v)) for v in values]
    todo = [t for t in todo if t[0] not in done]
    executor = make_executor(opts["workers"], ray=opts["ray"], ray_address=opts["ray_address"])
    with candidate_folder(output) as work:
        ev = evaluator(opts["eval_command"], opts["eval_timeout"], work)
        fn = functools.partial(_score_mix, ev, paths, {"key": opts["key"],
                               "unsafe_pickle": opts["unsafe_pickle"]})  # fmt: skip
        results = executor.map(fn, todo)
    for (name, _), s in zip(todo, results, strict=True):
        if isinstance(s, Score):
            v = values[[f"{recipe}_{what}={x:g}" for x in values].index(name)]
            log.append({"kind": "sweep", "model_name": name, dataset: s.score, **s.metrics,
                        what: v})  # fmt: skip
    errors = [s for s in results if isinstance(s, EvaluationError)]
    if errors:
        raise errors[0]
    by_name = {r["model_name"]: r for r in log.records if r.get("kind") == "sweep"}
    scored = [by_name[f"{recipe}_{what}={v:g}"] for v in values]
    best = max(scored, key=lambda r: r[dataset])  # the first of the best on ties
    return float(best[what]), scored


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
    prepare(output, paths, opts["overwrite"], opts["max_shard_size"])
    scored: list[dict[str, Any]] = []
    if sweep is not None:
        if opts["eval_command"] is None:
            raise SoupError(f"a sweep needs --eval to choose the best {what} on held-out data")
        value, scored = _sweep(recipe, what, paths, output, parse_alphas(sweep), weights_of, opts)
        say(f"best {what} = {value:g} (held-out {opts['dataset']} "
            f"{max(r[opts['dataset']] for r in scored):.6g})")  # fmt: skip
    elif opts["eval_command"] is not None:
        raise SoupError(f"--eval scores a sweep: give --{what}s, e.g. 0:1:0.1")
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
