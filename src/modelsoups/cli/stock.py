"""`soup stock`: Model Stock over checkpoint files, streamed; optionally scored once."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Any

import typer

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
    parse_size,
    progress_bar,
    say,
)
from .evaluate import BatchSize, Data, Device, MaxLength, Metric, ModelDir, scoring
from .recipes import (
    Dataset,
    Eval,
    EvalTimeout,
    History,
    Report,
    evaluator,
    prepare,
    sidecar,
    write_report,
)


def stock(
    finetuned: Inputs,
    output: Output,
    base: Annotated[str, typer.Option(help="The pretrained checkpoint θ₀.")],
    eval_command: Eval = None,
    eval_timeout: EvalTimeout = None,
    metric: Metric = None,
    data: Data = None,
    device: Device = "auto",
    batch_size: BatchSize = 8,
    max_length: MaxLength = 512,
    model: ModelDir = None,
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
    from ..history import check_dataset, record
    from ..io import expand_inputs

    opts = dict(locals())
    STATE["quiet"] = STATE["quiet"] or quiet
    check_dataset(dataset)
    started, paths = time.perf_counter(), [Path(base), *expand_inputs(finetuned)]
    prepare(output, paths, overwrite, max_shard_size, opts)
    metric_ev, _ = scoring(opts, paths[0])
    ratios = _write_stock(paths, output, opts)
    say(f"wrote {output} (model stock of {len(paths) - 1} over {paths[0]}, mean t = "
        f"{sum(t for _, t in ratios.values()) / max(len(ratios), 1):.3f})")  # fmt: skip
    held_out = None
    if eval_command is not None or metric_ev is not None:
        score = _score(metric_ev or evaluator(eval_command, eval_timeout, output.parent), output)
        held_out = score.score
        with Log(sidecar(output, ".history.jsonl", history), resume=True,
                 dataset=dataset) as log:  # fmt: skip
            log.append(record("final", "model_stock", dataset, score.score, score.metrics))
    write_report(sidecar(output, ".report.json", report), {
        "recipe": "model-stock", "output": str(output), "base": str(paths[0]),
        "ingredients": [str(p) for p in paths[1:]], "held_out": held_out, "dataset": dataset,
        "ratios": {k: {"cos": c, "t": t} for k, (c, t) in ratios.items()},
        "seconds": {"total": time.perf_counter() - started},
    })  # fmt: skip


def _score(ev: Any, output: Path) -> Any:
    """The held-out score of the written soup (a command reads the file, a metric loads it)."""
    if not hasattr(ev, "run"):
        from ..io import open_checkpoint

        with contextlib.closing(open_checkpoint(output)) as soup:
            return ev.evaluate(soup, name="model stock")
    return ev.run(output, "model stock")


def _write_stock(
    paths: list[Path], output: Path, opts: dict[str, Any]
) -> dict[str, tuple[float, float]]:
    """Stream Model Stock of `paths` (base first) into `output`; the per-tensor (cos θ, t)."""
    from ..recipes.stock import write_model_stock

    with progress_bar("model stock") as bar:
        _, ratios = write_model_stock(
            paths[0], paths[1:], output, dtype=parse_dtype(opts["dtype"]),
            max_shard_size=parse_size(opts["max_shard_size"]), key=opts["key"],
            unsafe_pickle=opts["unsafe_pickle"], overwrite=opts["overwrite"], progress=bar,
        )  # fmt: skip
    return ratios


def register(app: typer.Typer) -> None:
    app.command()(stock)
