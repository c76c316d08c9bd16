"""`soup greedy`: the paper's Recipe 1 over checkpoint files, scored by an eval command.

Selection runs first (resumably, logged to `SOUP.history.jsonl`); only then is the mean of
the chosen ingredients streamed to the output, with `SOUP.report.json` next to it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import OutputError, SoupError
from .common import (
    STATE,
    AllowNonfinite,
    Dtype,
    Inputs,
    Key,
    MaxShardSize,
    Output,
    Overwrite,
    Quiet,
    UnsafePickle,
    err,
    parse_size,
    say,
)
from .evaluate import (
    BatchSize,
    Data,
    Device,
    MaxLength,
    Metric,
    ModelDir,
    TestData,
    TestMetric,
    scoring,
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


def greedy(
    inputs: Inputs,
    output: Output,
    eval_command: Eval = None,
    eval_timeout: EvalTimeout = None,
    metric: Metric = None,
    data: Data = None,
    device: Device = "auto",
    batch_size: BatchSize = 8,
    max_length: MaxLength = 512,
    model: ModelDir = None,
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
    test_metric: TestMetric = None,
    test_data: TestData = None,
    memory: Annotated[
        str,
        typer.Option(
            help="RAM for the running sum (12 bytes/param); larger models stream, 0: always."
        ),
    ] = "2GiB",
    workdir: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the candidate files the eval command reads (default: beside -o)."
        ),
    ] = None,
    allow_nonfinite: AllowNonfinite = False,
    key: Key = None,
    unsafe_pickle: UnsafePickle = False,
    dtype: Dtype = None,
    max_shard_size: MaxShardSize = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Greedy soup (paper's Recipe 1): add ingredients, best first, while held-out score holds."""
    from ..candidate import candidate_folder
    from ..io import expand_inputs

    opts = dict(locals())
    STATE["quiet"] = STATE["quiet"] or quiet
    started, paths = time.perf_counter(), expand_inputs(inputs)
    prepare(output, paths, overwrite, max_shard_size, opts)
    if eval_command is None and metric is None:
        raise SoupError("greedy needs --eval or --metric to score candidate soups (--scores "
                        "only replaces the N individual evaluations)")  # fmt: skip
    opts["metric_evaluators"] = scoring(opts, paths[0])
    hist = sidecar(output, ".history.jsonl", history)
    opts["memory"] = parse_memory(memory)
    with candidate_folder(_work_name(output, workdir)) as work:
        r = _run_selection(paths, work, hist, opts)
    r.soup.close()  # frees the running sum (or the inputs it reads) before the final write
    for w in r.warnings:
        err(f"soup: warning: {w}")
    evaluated = time.perf_counter()
    chosen = [p for p, n in zip(paths, r.names, strict=True) if n in r.selected]
    write = {"key": key, "unsafe_pickle": unsafe_pickle, "overwrite": overwrite,
             "allow_nonfinite": allow_nonfinite}  # fmt: skip
    result = write_mean(chosen, output, None, r.warnings, recipe="greedy", dtype=dtype,
                        max_shard_size=max_shard_size, **write)  # fmt: skip
    best = max(r.ingredient_scores.values())
    say(f"greedy soup of {len(r.selected)}/{len(r.names)}: {dataset} {r.score:.6g} "
        f"(best ingredient {best:.6g}); history {hist}")  # fmt: skip
    say(_store_summary(r))
    seconds = {"evaluate": evaluated - started, "write": result.seconds,
               "total": time.perf_counter() - started}  # fmt: skip
    write_report(sidecar(output, ".report.json", report),
                 _report(r, paths, hist, result.warnings, seconds, opts))  # fmt: skip


def parse_memory(text: str) -> int:
    """`--memory`: a size ('2GiB', '500MB') or 0."""
    return 0 if text.strip() == "0" else parse_size(text) or 0


def _work_name(output: Path, workdir: Path | None) -> Path:
    """Candidate files go in a folder named after `output`, beside it or in `workdir`."""
    if workdir is None:
        return output
    if not workdir.is_dir():
        raise OutputError(f"{workdir}: --workdir is not an existing folder")
    return workdir / output.name


def _store_summary(r: Any) -> str:
    """Where the soup's sum lived, in one line, e.g. for `--memory` tuning."""
    need, budget = r.in_memory_bytes / 2**30, r.memory / 2**30
    if r.store == "memory":
        return f"running sum in memory: {need:.2f} GiB (--memory {budget:.2f} GiB)"
    return (f"candidates streamed from the inputs: a running sum would take {need:.2f} GiB "
            f"> --memory {budget:.2f} GiB")  # fmt: skip


def _run_selection(paths: list[Path], work: Path, hist: Path, opts: dict[str, Any]) -> Any:
    """Run `greedy_soup` on the files with `soup greedy`'s options (candidates are written
    under `work`); returns its result."""
    from ..executor_ray import make_executor
    from ..ingredients import ingredient_names
    from ..recipes.greedy import greedy_soup
    from ..scores import load_scores

    names = ingredient_names(paths)
    scores = opts["scores"]
    held_out, test = opts["metric_evaluators"]
    return greedy_soup(
        paths,
        held_out or evaluator(opts["eval_command"], opts["eval_timeout"], work),
        names=names,
        scores=load_scores(scores, names) if scores is not None else None,
        accept=opts["accept"],
        tolerance=opts["tolerance"],
        dataset=opts["dataset"],
        history=str(hist),
        resume=opts["resume"],
        executor=make_executor(opts["workers"], ray=opts["ray"], ray_address=opts["ray_address"]),
        test_evaluator=test or evaluator(opts["test_eval"], opts["eval_timeout"], work),
        memory=opts["memory"],
        allow_nonfinite=opts["allow_nonfinite"],
        key=opts["key"],
        unsafe_pickle=opts["unsafe_pickle"],
    )


def _report(
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
        "memory": {"store": r.store, "budget": r.memory, "in_memory_bytes": r.in_memory_bytes,
                   "candidate_bytes": r.soup.nbytes},
    }  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command()(greedy)
