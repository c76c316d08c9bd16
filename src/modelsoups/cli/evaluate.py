"""`soup eval`: score checkpoints with a built-in metric, in process; and the metric options
that `soup greedy`, `wise-ft`, `task-arithmetic` and `stock` share with it.

The model is built once from the first checkpoint's config (or `--model`), and every
checkpoint's tensors are copied into it: no candidate file, no new process.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import SoupError
from .common import STATE, Inputs, Key, UnsafePickle

if TYPE_CHECKING:
    from ..metrics import MetricEvaluator

Metric = Annotated[
    str | None,
    typer.Option(
        "--metric", help="Built-in metric (lm-loss, lm-choice, accuracy, image-accuracy)."
    ),
]
Data = Annotated[Path | None, typer.Option(help="Held-out data: JSONL/CSV file or ImageFolder.")]
TestMetric = Annotated[str | None, typer.Option(help="Built-in metric for the final soup only.")]
TestData = Annotated[Path | None, typer.Option(help="Test data of --test-metric.")]
Device = Annotated[str, typer.Option(help="Where the metric runs: auto, cpu, cuda, cuda:N.")]
BatchSize = Annotated[int, typer.Option(help="Examples per forward pass of the metric.")]
MaxLength = Annotated[int, typer.Option(help="Tokens kept per example of the metric.")]
ModelDir = Annotated[
    Path | None,
    typer.Option("--model", help="Folder with config.json and tokenizer (default: 1st input)."),
]


@dataclass(frozen=True)
class MetricOptions:
    """The metric options of a command, as one bundle (`--metric` ... `--model`)."""

    metric: str | None = None
    data: Path | None = None
    device: str = "auto"
    batch_size: int = 8
    max_length: int = 512
    model: Path | None = None
    test_metric: str | None = None
    test_data: Path | None = None

    @classmethod
    def of(cls, opts: dict[str, Any]) -> MetricOptions:
        """The bundle from a command's `locals()` (fields it does not have keep defaults)."""
        return cls(**{k: opts[k] for k in cls.__dataclass_fields__ if k in opts})

    def check(self, eval_command: str | None, test_eval: str | None = None) -> None:
        """`--metric` and `--eval` exclude each other; a metric needs its data."""
        if self.metric is not None and eval_command is not None:
            raise SoupError("--metric and --eval both score candidates; give one of them")
        if self.test_metric is not None and test_eval is not None:
            raise SoupError("--test-metric and --test-eval both score the soup; give one")
        for metric, data, flag in ((self.metric, self.data, "--data"),
                                   (self.test_metric, self.test_data, "--test-data")):  # fmt: skip
            if metric is not None and data is None:
                raise SoupError(f"metric {metric!r} needs {flag} (the held-out data)")
            if metric is None and data is not None:
                raise SoupError(f"{flag} {data} is the data of a metric; give the metric too")

    def evaluator(self, first: Path, *, test: bool = False) -> MetricEvaluator | None:
        """The held-out (or test) `MetricEvaluator`, data and model checked now; or None."""
        metric, data = (self.test_metric, self.test_data) if test else (self.metric, self.data)
        if metric is None or data is None:
            return None
        from ..metrics import MetricEvaluator

        quiet_transformers()
        model = (self.model if self.model is not None else first).resolve()
        if self.model is None and not first.is_dir():
            raise SoupError(f"{first}: a file, so there is no config.json to build the model "
                            "from; pass --model FOLDER with config and tokenizer")  # fmt: skip
        ev = MetricEvaluator(metric, data.resolve(), model=model, device=self.device,
                             batch_size=self.batch_size, max_length=self.max_length)  # fmt: skip
        ev.check()
        return ev


def scoring(opts: dict[str, Any], first: Path) -> tuple[Any, Any]:
    """A soup command's metric evaluators (held-out, test), built and checked NOW, before
    anything is computed or written; None where a command (`--eval`) or nothing scores."""
    m = MetricOptions.of(opts)
    m.check(opts.get("eval_command"), opts.get("test_eval"))
    return m.evaluator(first), m.evaluator(first, test=True)


def quiet_transformers() -> None:
    """transformers' own warnings and bars stay off the CLI's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@contextlib.contextmanager
def example_bar(description: str) -> Iterator[Any]:
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


def eval_(
    inputs: Inputs,
    metric: Annotated[
        str, typer.Option("--metric", help="lm-loss, lm-choice, accuracy or image-accuracy.")
    ],
    data: Annotated[Path, typer.Option(help="Held-out data: JSONL/CSV file or ImageFolder.")],
    device: Device = "auto",
    batch_size: BatchSize = 8,
    max_length: MaxLength = 512,
    model: ModelDir = None,
    json_: Annotated[bool, typer.Option("--json", help="Print only a JSON list.")] = False,
    key: Key = None,
    unsafe_pickle: UnsafePickle = False,
) -> None:
    """Score checkpoints with a built-in metric, in process (higher is better)."""
    from ..candidate import open_candidate
    from ..io import expand_inputs

    paths = expand_inputs(inputs)
    opts = MetricOptions(metric, data, device, batch_size, max_length, model)
    ev = opts.evaluator(paths[0])
    assert ev is not None
    rows = []
    for path, given in zip(paths, _given(inputs, paths), strict=True):
        with (
            open_candidate(path, key=key, unsafe_pickle=unsafe_pickle) as ckpt,  # or adapter
            example_bar(f"{metric} {given}") as bar,
        ):
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
