"""`soup greedy`: the paper's Recipe 1 over checkpoint files, scored by an eval command.

Selection runs first (resumably, logged to `SOUP.history.jsonl`); only then is the mean of
the chosen ingredients streamed to the output, with `SOUP.report.json` next to it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..errors import SoupError
from .common import STATE, err, say
from .evaluate import command_evaluator, merged_for, scoring_evaluators
from .options import (
    AdapterOutput,
    AverageOptions,
    Inputs,
    Output,
    Quiet,
    ReadOptions,
    SearchOptions,
    SelectionOptions,
    TestOptions,
    WriteOptions,
    expand_bundles,
    parse_memory,
)
from .outputs import check_outputs, scoring_reads, sidecar, work_name, write_mean, write_report

if TYPE_CHECKING:
    from ..guard import InputGuard
    from ..metrics import MetricEvaluator
    from ..recipes.greedy import GreedyResult
    from ..types import SoupResult


@expand_bundles
def greedy(
    inputs: Inputs,
    output: Output,
    *,
    search: SearchOptions,
    select: SelectionOptions,
    test: TestOptions,
    read: ReadOptions,
    write: WriteOptions,
    adapters: AdapterOutput,
    quiet: Quiet = False,
) -> None:
    """Greedy soup (paper's Recipe 1): add ingredients, best first, while held-out score holds."""
    from ..candidate import candidate_folder
    from ..guard import InputGuard
    from ..io import expand_inputs

    STATE["quiet"] = STATE["quiet"] or quiet
    scoring, records = search.scoring, search.records
    started, paths = time.perf_counter(), expand_inputs(inputs)
    reads = [select.scores, *scoring_reads(search.scoring, test)]
    check_outputs(output, paths, write, records, reads, adapters, workdir=select.workdir)
    if not scoring.given:
        raise SoupError("greedy needs --eval or --metric to score candidate soups (--scores "
                        "only replaces the N individual evaluations)")  # fmt: skip
    metric_evaluators = scoring_evaluators(scoring, paths[0], test)
    hist = sidecar(output, ".history.jsonl", records.history)
    memory = parse_memory(select.memory)
    guard = InputGuard([*paths, *filter(None, [adapters.merge_into])])
    with candidate_folder(work_name(output, select.workdir)) as work:
        r = _run_selection(paths, work, hist, metric_evaluators, memory, guard, search=search,
                           test=test, select=select, read=read, adapters=adapters)  # fmt: skip
    guard.check("before the final write")
    r.soup.close()  # frees the running sum (or the inputs it reads) before the final write
    for w in r.warnings:
        err(f"soup: warning: {w}")
    evaluated = time.perf_counter()
    chosen = [p for p, n in zip(paths, r.names, strict=True) if n in r.selected]
    result = write_mean(chosen, output, None, recipe="greedy", read=read, write=write,
                        average=AverageOptions(allow_nonfinite=select.allow_nonfinite),
                        shown=r.warnings, adapters=adapters)  # fmt: skip
    best = max(r.ingredient_scores.values())
    say(f"greedy soup of {len(r.selected)}/{len(r.names)}: {records.dataset} {r.score:.6g} "
        f"(best ingredient {best:.6g}); history {hist}")  # fmt: skip
    say(_store_summary(r))
    seconds = {"evaluate": evaluated - started, "write": result.seconds,
               "total": time.perf_counter() - started}  # fmt: skip
    report = _report(r, paths, output, hist, result, seconds, select, records.dataset)
    report["scorer"] = {"held_out": scorer(metric_evaluators[0], scoring.eval_command),
                        "test": scorer(metric_evaluators[1], test.test_eval)}  # fmt: skip
    write_report(sidecar(output, ".report.json", records.report), report)


def scorer(metric: MetricEvaluator | None, command: str | None) -> dict[str, Any] | None:
    """What scored (the report's record): a metric with its data file, or a command."""
    return metric.spec() if metric is not None else None if command is None else {"eval": command}


def _store_summary(r: GreedyResult) -> str:
    """Where the soup's sum lived, in one line, e.g. for `--memory` tuning."""
    need, budget = r.in_memory_bytes / 2**30, r.memory / 2**30
    if r.store == "memory":
        return f"running sum in memory: {need:.2f} GiB (--memory {budget:.2f} GiB)"
    return (f"candidates streamed from the inputs: a running sum would take {need:.2f} GiB "
            f"> --memory {budget:.2f} GiB")  # fmt: skip


def _run_selection(
    paths: list[Path],
    work: Path,
    hist: Path,
    metric_evaluators: tuple[MetricEvaluator | None, MetricEvaluator | None],
    memory: int,
    guard: InputGuard,
    *,
    search: SearchOptions,
    test: TestOptions,
    select: SelectionOptions,
    read: ReadOptions,
    adapters: AdapterOutput,
) -> GreedyResult:
    """Run `greedy_soup` on the files with `soup greedy`'s options (candidates are written
    under `work`); returns its result."""
    from ..guard import GuardedEvaluator
    from ..ingredients import ingredient_names
    from ..recipes.greedy import greedy_soup
    from ..scores import load_scores

    names = ingredient_names(paths)
    held_out, test_metric = metric_evaluators
    timeout = search.scoring.eval_timeout
    merge = adapters.merge_into
    command = command_evaluator(search.scoring.eval_command, timeout, work)
    evaluator = held_out or merged_for(command, merge)
    assert evaluator is not None  # checked by the caller: --eval or --metric was given
    tester = test_metric or merged_for(command_evaluator(test.test_eval, timeout, work), merge)
    return greedy_soup(
        paths,
        GuardedEvaluator(evaluator, guard),
        names=names,
        scores=load_scores(select.scores, names) if select.scores is not None else None,
        accept=select.accept,
        tolerance=select.tolerance,
        dataset=search.records.dataset,
        history=str(hist),
        resume=search.resume,
        executor=search.parallel.executor(),
        test_evaluator=GuardedEvaluator(tester, guard) if tester is not None else None,
        memory=memory,
        allow_nonfinite=select.allow_nonfinite,
        key=read.key,
        unsafe_pickle=read.unsafe_pickle,
        scorer=scorer(held_out, search.scoring.eval_command),
        allow_different_base=adapters.allow_different_base,
    )


def _report(
    r: GreedyResult,
    paths: list[Path],
    output: Path,
    hist: Path,
    written: SoupResult,
    seconds: dict[str, float],
    select: SelectionOptions,
    dataset: str,
) -> dict[str, Any]:
    """`SOUP.report.json` of `soup greedy`: every ingredient's score and weight, the soup's."""
    return {
        "recipe": "greedy", "output": str(output), "accept": select.accept,
        "tolerance": select.tolerance,
        "ingredients": [{"name": n, "path": str(p), dataset: r.ingredient_scores[n],
                         "weight": w} for n, p, w in zip(r.names, paths, r.weights, strict=True)],
        "selected": r.selected, "weights": r.weights, "dataset": dataset,
        "held_out": r.score, "test": None if r.test is None else {"score": r.test.score,
                                                                   **r.test.metrics},
        "history": str(hist), "warnings": r.warnings + written.warnings, "seconds": seconds,
        "memory": {"store": r.store, "budget": r.memory, "in_memory_bytes": r.in_memory_bytes,
                   "candidate_bytes": r.soup.nbytes},
    }  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command()(greedy)
