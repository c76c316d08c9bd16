"""`soup eval`: score checkpoints with a built-in metric, in process; and the evaluators
(built-in metric or eval command) that `soup greedy`, `wise-ft`, `task-arithmetic`,
`stock` and `learned` build from their options.

The model is built once from the first checkpoint's config (or `--model`), and every
checkpoint's tensors are copied into it: no candidate file, no new process.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..errors import SoupError
from .common import STATE
from .options import (
    EvalData,
    EvalMetric,
    EvalOptions,
    Inputs,
    Json,
    MetricRun,
    ReadOptions,
    TestOptions,
    expand_bundles,
)

if TYPE_CHECKING:
    from ..adapter_space import MergedEvaluator
    from ..evaluate import CommandEvaluator
    from ..metrics import MetricEvaluator
    from ..types import Progress


def check_scoring(scoring: EvalOptions, test: TestOptions = TestOptions()) -> None:
    """`--metric` and `--eval` exclude each other; a metric needs its data."""
    if scoring.metric is not None and scoring.eval_command is not None:
        raise SoupError("--metric and --eval both score candidates; give one of them")
    if test.test_metric is not None and test.test_eval is not None:
        raise SoupError("--test-metric and --test-eval both score the soup; give one")
    for metric, data, flag in ((scoring.metric, scoring.data, "--data"),
                               (test.test_metric, test.test_data, "--test-data")):  # fmt: skip
        if metric is not None and data is None:
            raise SoupError(f"metric {metric!r} needs {flag} (the held-out data)")
        if metric is None and data is not None:
            raise SoupError(f"{flag} {data} is the data of a metric; give the metric too")
    if scoring.run.metric_dtype is not None and scoring.metric is test.test_metric is None:
        raise SoupError("--metric-dtype is what a --metric's model runs in; give the metric too")


def metric_evaluator(
    metric: str | None, data: Path | None, run: MetricRun, first: Path
) -> MetricEvaluator | None:
    """The `MetricEvaluator` of `metric` on `data`, data and model checked now; None
    without a metric. The model is `--model`, else the first input's folder."""
    if metric is None or data is None:
        return None
    from ..metrics import MetricEvaluator

    quiet_transformers()
    model = (run.model if run.model is not None else first).resolve()
    if run.model is None and not first.is_dir():
        raise SoupError(f"{first}: a file, so there is no config.json to build the model "
                        "from; pass --model FOLDER with config and tokenizer")  # fmt: skip
    dtype = "float32" if run.metric_dtype is None else run.metric_dtype
    ev = MetricEvaluator(metric, data.resolve(), model=model, device=run.device,
                         batch_size=run.batch_size, max_length=run.max_length,
                         dtype=dtype)  # fmt: skip
    ev.check()
    return ev


def scoring_evaluators(
    scoring: EvalOptions,
    first: Path,
    test: TestOptions = TestOptions(),
) -> tuple[MetricEvaluator | None, MetricEvaluator | None]:
    """A soup command's metric evaluators (held-out, test), built and checked NOW, before
    anything is computed or written; None where a command (`--eval`) or nothing scores."""
    check_scoring(scoring, test)
    run = scoring.run
    return (metric_evaluator(scoring.metric, scoring.data, run, first),
            metric_evaluator(test.test_metric, test.test_data, run, first))  # fmt: skip


def command_evaluator(
    command: str | None, timeout: float | None, workdir: Path
) -> CommandEvaluator | None:
    """A `CommandEvaluator` writing its candidates under `workdir` (a `candidate_folder`),
    or None without a command."""
    if command is None:
        return None
    from ..evaluate import CommandEvaluator

    return CommandEvaluator(command, timeout=timeout, workdir=workdir)


def merged_for(
    command: CommandEvaluator | None, merge_into: Path | None
) -> CommandEvaluator | MergedEvaluator | None:
    """With `merge_into` (adapters: `--merge-into BASE`) an eval command gets each adapter
    candidate merged into that base: the kind of model the output will be."""
    if command is None or merge_into is None:
        return command
    from ..adapter_space import MergedEvaluator

    return MergedEvaluator(command, merge_into)


def quiet_transformers() -> None:
    """transformers' (and lm-eval's) own warnings and bars stay off the CLI's output."""
    import logging

    import transformers

    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@contextlib.contextmanager
def example_bar(description: str) -> Iterator[Progress | None]:
    """A rich progress bar on stderr counting examples; nothing when quiet or not a TTY."""
    if STATE["quiet"] or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(),
                   MofNCompleteColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                   transient=True)  # fmt: skip
    task = bar.add_task(description, total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


@expand_bundles
def eval_(
    inputs: Inputs,
    metric: EvalMetric,
    data: EvalData,
    *,
    run: MetricRun,
    json_: Json = False,
    read: ReadOptions,
) -> None:
    """Score checkpoints with a built-in metric, in process (higher is better)."""
    from ..candidate import open_candidate
    from ..io import expand_inputs

    paths = expand_inputs(inputs)
    ev = metric_evaluator(metric, data, run, paths[0])
    assert ev is not None
    rows = []
    for path, given in zip(paths, _given(inputs, paths), strict=True):
        with (
            open_candidate(path, key=read.key, unsafe_pickle=read.unsafe_pickle) as ckpt,
            example_bar(f"{metric} {given}") as bar,
        ):  # a checkpoint, or a PEFT adapter folder (scored over its base)
            ev.progress = bar
            s = ev.evaluate(ckpt, name=given)
        rows.append({"checkpoint": given, "score": s.score, "metrics": s.metrics})
    if json_:
        print(json.dumps(rows))
        return
    _table(metric, rows)


def _given(inputs: list[str], paths: list[Path]) -> list[str]:
    """Each checkpoint as the user wrote it (globs and list files: the path found)."""
    return inputs if len(inputs) == len(paths) else [str(p) for p in paths]


def _table(metric: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    table = Table("checkpoint", f"score ({metric})", *names)
    for r in rows:
        cells = [f"{r['metrics'][n]:.6g}" if n in r["metrics"] else "" for n in names]
        table.add_row(r["checkpoint"], f"{r['score']:.6g}", *cells)
    Console(width=max(100, sum(len(n) + 12 for n in names) + 60)).print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)
