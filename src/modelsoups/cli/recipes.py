"""`soup greedy`, `soup wise-ft`, `soup stock`, `soup task-arithmetic`.

Each writes the soup with the streaming atomic writer, a JSON report next to it
(`SOUP.report.json`: recipe, ingredients, weights, scores, times) and, when something is
scored, the evaluation history (`SOUP.history.jsonl`, resumable with `--resume`). Nothing
is written to the output name until selection has finished.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import OutputError, SoupError
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
    err,
    parse_dtype,
    parse_size,
    progress_bar,
    report_result,
    say,
)

Eval = Annotated[
    str | None,
    typer.Option("--eval", help='Held-out eval command, e.g. "python eval.py --ckpt {ckpt}".'),
]
EvalTimeout = Annotated[float | None, typer.Option(help="Seconds before an eval is killed.")]
Workers = Annotated[int, typer.Option(help="Parallel evaluations of independent candidates.")]
Ray = Annotated[
    bool, typer.Option("--ray", help="Evaluate on a local Ray runtime (modelsoups[ray]).")
]
RayAddress = Annotated[
    str | None,
    typer.Option(help="Evaluate on this Ray cluster; checkpoints go by path (shared disk)."),
]
Dataset = Annotated[str, typer.Option(help="Name of the held-out metric in the history.")]
History = Annotated[Path | None, typer.Option(help="History JSONL [default: SOUP.history.jsonl].")]
Report = Annotated[Path | None, typer.Option(help="JSON report [default: SOUP.report.json].")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from an existing history.")]


def _sidecar(out: Path, suffix: str, given: Path | None) -> Path:
    return (
        given
        if given is not None
        else out.with_name(out.name.removesuffix(".safetensors") + suffix)
    )


def _prepare(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Fail before any evaluation if the output could not be written at the end."""
    from ..stream import check_output

    check_output(out, inputs, folder=out.suffix != ".safetensors")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: output folder {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; choose another name or pass --overwrite")


def _evaluator(command: str | None, timeout: float | None, out: Path) -> Any:
    if command is None:
        return None
    from ..evaluate import CommandEvaluator

    return CommandEvaluator(command, timeout=timeout, workdir=out.parent)


def _write_report(path: Path, report: dict[str, Any]) -> None:
    from .. import __version__

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({**report, "modelsoups_version": __version__}, indent=2) + "\n")
    os.replace(tmp, path)


def _write_mean(paths: list[Path], out: Path, weights: list[float] | None, **opts: Any) -> Any:
    from ..stream import average_checkpoints

    opts["dtype"] = parse_dtype(opts.pop("dtype"))
    opts["max_shard_size"] = parse_size(opts.pop("max_shard_size"))
    with progress_bar(f"{opts['recipe']} soup") as bar:
        result = average_checkpoints(paths, out, weights=weights, progress=bar, **opts)
    report_result(result)
    return result


def greedy(
    inputs: Inputs,
    output: Output,
    eval_command: Eval = None,
    eval_timeout: EvalTimeout = None,
    scores: Annotated[
        Path | None, typer.Option(help="CSV/JSON of held-out scores: skips N evaluations.")
    ] = None,
    workers: Workers = 1,
    ray: Ray = False,
    ray_address: RayAddress = None,
    accept: Annotated[str, typer.Option(help="'ge' keeps ties (paper), 'gt' (code).")] = "ge",
    tolerance: Annotated[float, typer.Option(help="Accept drops up to this much.")] = 0.0,
    dataset: Dataset = "held_out",
    history: History = None,
    report: Report = None,
    resume: Resume = False,
    test_eval: Annotated[
        str | None, typer.Option(help="Test eval command: scores the final soup, never selects.")
    ] = None,
    key: Key = None,
    unsafe_pickle: UnsafePickle = False,
    dtype: Dtype = None,
    max_shard_size: MaxShardSize = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Greedy soup (paper's Recipe 1): add ingredients, best first, while held-out score holds."""
    from ..io import expand_inputs

    opts = dict(locals())
    STATE["quiet"] = STATE["quiet"] or quiet
    started, paths = time.perf_counter(), expand_inputs(inputs)
    _prepare(output, paths, overwrite)
    if eval_command is None:
        raise SoupError("greedy needs --eval to score candidate soups (--scores only replaces "
                        "the N individual evaluations)")  # fmt: skip
    hist = _sidecar(output, ".history.jsonl", history)
    r = _greedy_select(paths, output, hist, opts)
    for w in r.warnings:
        err(f"soup: warning: {w}")
    evaluated = time.perf_counter()
    chosen = [p for p, n in zip(paths, r.names, strict=True) if n in r.selected]
    write = {"key": key, "unsafe_pickle": unsafe_pickle, "overwrite": overwrite}
    result = _write_mean(chosen, output, None, recipe="greedy", dtype=dtype,
                         max_shard_size=max_shard_size, **write)  # fmt: skip
    best = max(r.ingredient_scores.values())
    say(f"greedy soup of {len(r.selected)}/{len(r.names)}: {dataset} {r.score:.6g} "
        f"(best ingredient {best:.6g}); history {hist}")  # fmt: skip
    seconds = {"evaluate": evaluated - started, "write": result.seconds,
               "total": time.perf_counter() - started}  # fmt: skip
    _write_report(_sidecar(output, ".report.json", report),
                  _greedy_report(r, paths, hist, result.warnings, seconds, opts))  # fmt: skip


def _greedy_select(paths: list[Path], output: Path, hist: Path, opts: dict[str, Any]) -> Any:
    """Run `greedy_soup` on the files with `soup greedy`'s options; returns its result."""
    from ..executor_ray import make_executor
    from ..ingredients import ingredient_names
    from ..recipes.greedy import greedy_soup
    from ..scores import load_scores

    names = ingredient_names(paths)
    scores = opts["scores"]
    return greedy_soup(
        paths,
        _evaluator(opts["eval_command"], opts["eval_timeout"], output),
        names=names,
        scores=load_scores(scores, names) if scores is not None else None,
        accept=opts["accept"],
        tolerance=opts["tolerance"],
        dataset=opts["dataset"],
        history=str(hist),
        resume=opts["resume"],
        executor=make_executor(opts["workers"], ray=opts["ray"], ray_address=opts["ray_address"]),
        test_evaluator=_evaluator(opts["test_eval"], opts["eval_timeout"], output),
        key=opts["key"],
        unsafe_pickle=opts["unsafe_pickle"],
    )


def _greedy_report(
    r: Any,
    paths: list[Path],
    hist: Path,
    write_warnings: list[str],
    seconds: dict[str, float],
    opts: dict[str, Any],
) -> dict[str, Any]:
    """`SOUP.report.json` of `soup greedy`: every ingredient's score and weight, the soup's."""
    dataset = opts["dataset"]
    return {
        "recipe": "greedy", "output": str(opts["output"]), "accept": opts["accept"],
        "tolerance": opts["tolerance"],
        "ingredients": [{"name": n, "path": str(p), dataset: r.ingredient_scores[n],
                         "weight": w} for n, p, w in zip(r.names, paths, r.weights, strict=True)],
        "selected": r.selected, "weights": r.weights, "dataset": dataset,
        "held_out": r.score, "test": None if r.test is None else {"score": r.test.score,
                                                                   **r.test.metrics},
        "history": str(hist), "warnings": r.warnings + write_warnings, "seconds": seconds,
    }  # fmt: skip


def _score_mix(evaluator: Any, paths: list[Path], opts: dict[str, Any], item: Any) -> Any:
    """Score Σ wᵢ·θᵢ of checkpoint files, computed tensor by tensor (runs in a worker)."""
    from ..average import weighted_sum
    from ..candidate import LazyCheckpoint, model_files_source
    from ..errors import EvaluationError
    from ..ingredients import close_all
    from ..stream import open_all

    name, weights = item
    ckpts = open_all(paths, **opts)
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
    from ..errors import EvaluationError
    from ..evaluate import Score
    from ..executor_ray import make_executor
    from ..history import History

    dataset = opts["dataset"]
    log = History(_sidecar(output, ".history.jsonl", opts["history"]), resume=opts["resume"])
    done = {r["model_name"]: r for r in log.records if r.get("kind") == "sweep"}
    todo = [(f"{recipe}_{what}={v:g}", weights_of(v)) for v in values]
    todo = [t for t in todo if t[0] not in done]
    ev = _evaluator(opts["eval_command"], opts["eval_timeout"], output)
    fn = functools.partial(_score_mix, ev, paths, {"key": opts["key"],
                           "unsafe_pickle": opts["unsafe_pickle"]})  # fmt: skip
    executor = make_executor(opts["workers"], ray=opts["ray"], ray_address=opts["ray_address"])
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
    _prepare(output, paths, opts["overwrite"])
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
    result = _write_mean(paths, output, weights, recipe=recipe, normalize=False,
                         allow_negative=True, accumulate="float64", **write)  # fmt: skip
    _write_report(_sidecar(output, ".report.json", opts["report"]), {
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


def stock(
    finetuned: Inputs,
    output: Output,
    base: Annotated[str, typer.Option(help="The pretrained checkpoint θ₀.")],
    eval_command: Eval = None,
    eval_timeout: EvalTimeout = None,
    dataset: Dataset = "held_out",
    history: History = None,
    report: Report = None,
    key: Key = None,
    unsafe_pickle: UnsafePickle = False,
    dtype: Dtype = None,
    max_shard_size: MaxShardSize = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Model Stock: per layer, pull the fine-tunes' mean towards θ₀ by their angle."""
    from ..history import History as Log
    from ..io import expand_inputs

    opts = dict(locals())
    STATE["quiet"] = STATE["quiet"] or quiet
    started, paths = time.perf_counter(), [Path(base), *expand_inputs(finetuned)]
    _prepare(output, paths, overwrite)
    ratios = _write_stock(paths, output, opts)
    say(f"wrote {output} (model stock of {len(paths) - 1} over {paths[0]}, mean t = "
        f"{sum(t for _, t in ratios.values()) / max(len(ratios), 1):.3f})")  # fmt: skip
    held_out = None
    if eval_command is not None:
        score = _evaluator(eval_command, eval_timeout, output).run(output, "model stock")
        held_out = score.score
        Log(_sidecar(output, ".history.jsonl", history), resume=True).append(
            {"kind": "final", "model_name": "model_stock", dataset: score.score, **score.metrics}
        )
    _write_report(_sidecar(output, ".report.json", report), {
        "recipe": "model-stock", "output": str(output), "base": str(paths[0]),
        "ingredients": [str(p) for p in paths[1:]], "held_out": held_out, "dataset": dataset,
        "ratios": {k: {"cos": c, "t": t} for k, (c, t) in ratios.items()},
        "seconds": {"total": time.perf_counter() - started},
    })  # fmt: skip


def _write_stock(
    paths: list[Path], output: Path, opts: dict[str, Any]
) -> dict[str, tuple[float, float]]:
    """Stream Model Stock of `paths` (base first) into `output`; the per-tensor (cos θ, t)."""
    import dataclasses

    from ..candidate import model_files_source, write_candidate
    from ..ingredients import close_all
    from ..recipes.stock import stock_checkpoint
    from ..stream import open_all, provenance

    out_dtype, shard = parse_dtype(opts["dtype"]), parse_size(opts["max_shard_size"])
    ckpts = open_all(paths, key=opts["key"], unsafe_pickle=opts["unsafe_pickle"])
    try:
        lazy = stock_checkpoint(ckpts[0], ckpts[1:])
        if out_dtype is not None:
            lazy.infos = {k: dataclasses.replace(i, dtype=out_dtype) if i.is_float else i
                          for k, i in lazy.infos.items()}  # fmt: skip
        meta = provenance("model-stock", ckpts, [])
        write_candidate(lazy, output, metadata=meta, overwrite=opts["overwrite"],
                        model_files_from=model_files_source(ckpts),
                        max_shard_size=shard)  # fmt: skip
    finally:
        close_all(ckpts)
    ratios: dict[str, tuple[float, float]] = lazy.extra["ratios"]
    return ratios


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


def register(app: typer.Typer) -> None:
    app.command()(greedy)
    app.command("wise-ft")(wise_ft)
    app.command()(stock)
    app.command("task-arithmetic")(task_arithmetic)
