"""`soup learned`: the paper's learned soup from the command line.

The mixing coefficients α = softmax(a) are learned by gradient descent (AdamW) on the loss
behind a built-in metric — token NLL for `lm-loss`, cross-entropy for `accuracy` and
`image-accuracy` — over the held-out `--data` (`recipes/learned.py`). The model is built
once from the first ingredient's config (or `--model`); the soup and its coefficients
JSON are written atomically, and the summary gives the held-out score of the uniform soup
(α's starting point) and of the learned one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..errors import SoupError
from .common import STATE, say
from .evaluate import metric_evaluator
from .options import (
    ByLayer,
    Coefficients,
    Epochs,
    Inputs,
    LearnData,
    LearnMetric,
    Lr,
    MetricRun,
    Output,
    Overwrite,
    Quiet,
    ReadOptions,
    RecordOptions,
    Report,
    WriteOptions,
    expand_bundles,
)
from .outputs import check_outputs, sidecar, write_report

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..candidate import LazyCheckpoint
    from ..metrics import MetricEvaluator
    from ..recipes.learned import LearnedSoupResult

LEARNABLE = ("lm-loss", "accuracy", "image-accuracy")
MAX_EPOCHS = 100_000  # passes over the data: more is a typo, and would never end


@expand_bundles
def learned(
    inputs: Inputs,
    output: Output,
    metric: LearnMetric,
    data: LearnData,
    by_layer: ByLayer = False,
    epochs: Epochs = 5,
    lr: Lr = 0.05,
    *,
    run: MetricRun,
    coefficients: Coefficients = None,
    report: Report = None,
    read: ReadOptions,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Learned soup (paper §3): learn the mixing coefficients on held-out data."""
    from ..io import expand_inputs

    STATE["quiet"] = STATE["quiet"] or quiet
    started, paths = time.perf_counter(), expand_inputs(inputs)
    if metric not in LEARNABLE:
        raise SoupError(f"soup learned learns from the loss of {', '.join(LEARNABLE)}; "
                        f"got --metric {metric!r}")  # fmt: skip
    if not (0 <= epochs <= MAX_EPOCHS and 0 < lr < float("inf")):
        raise SoupError(f"--epochs must be from 0 to {MAX_EPOCHS} and --lr a positive number, "
                        f"got {str(epochs)[:40]}, {lr}")  # fmt: skip
    coefs_path = sidecar(output, ".coefficients.json", coefficients)
    check_outputs(output, paths, WriteOptions(overwrite=overwrite), RecordOptions(report=report),
                  [data, run.model], sidecars=[coefs_path])  # fmt: skip
    ev = metric_evaluator(metric, data, run, paths[0])
    assert ev is not None
    if ev.settings.dtype not in ("float32", "fp32"):
        raise SoupError(f"soup learned learns in float32; --metric-dtype {ev.settings.dtype} "
                        "is for scoring (soup eval, greedy, wise-ft, stock, ...)")  # fmt: skip
    before = _uniform_score(ev, paths, read)
    result, after = _learn(ev, paths, output, coefs_path, by_layer=by_layer, epochs=epochs,
                           lr=lr, read=read, overwrite=overwrite)  # fmt: skip
    say(f"wrote {output} (learned soup of {len(paths)}, {epochs} epoch(s)); held-out "
        f"{metric} score {before:.6g} (uniform) -> {after:.6g} (learned); "
        f"coefficients {coefs_path}")  # fmt: skip
    write_report(sidecar(output, ".report.json", report), {
        "recipe": "learned", "output": str(output), "ingredients": [str(p) for p in paths],
        "metric": metric, "data": str(data), "by_layer": by_layer, "epochs": epochs, "lr": lr,
        "coefficients": result.coefficients, "losses": result.losses,
        "held_out": {"uniform": before, "learned": after},
        "seconds": {"total": time.perf_counter() - started},
    })  # fmt: skip


def _uniform_score(ev: MetricEvaluator, paths: list[Path], read: ReadOptions) -> float:
    """The held-out score of the uniform soup (where the learned coefficients start)."""
    from ..average import weighted_sum
    from ..candidate import LazyCheckpoint, model_files_source
    from ..ingredients import close_all, open_ingredients

    ckpts = open_ingredients(paths, key=read.key, unsafe_pickle=read.unsafe_pickle)
    try:
        w = [1.0 / len(ckpts)] * len(ckpts)

        def compute(k: str) -> torch.Tensor:
            if not ckpts[0].infos[k].is_float:
                return ckpts[0].get(k)
            return weighted_sum([c.get(k) for c in ckpts], w)

        soup = LazyCheckpoint("<uniform soup>", ckpts[0].infos, compute,
                              model_files_from=model_files_source(ckpts))  # fmt: skip
        return float(ev.evaluate(soup, name="uniform soup").score)
    finally:
        close_all(ckpts)


def _learn(
    ev: MetricEvaluator,
    paths: list[Path],
    output: Path,
    coefs_path: Path,
    *,
    by_layer: bool,
    epochs: int,
    lr: float,
    read: ReadOptions,
    overwrite: bool,
) -> tuple[LearnedSoupResult, float]:
    """Learn α with `learned_soup`, write the soup and coefficients; the learned score."""
    import torch

    from ..candidate import write_candidate
    from ..io import MemoryCheckpoint
    from ..recipes.learned import learned_soup

    model = ev.module()
    metric: Any = ev.metric  # one of LEARNABLE: these have batches() and loss()
    batches = metric.batches(ev._prepare(), ev.settings, next(model.parameters()).device)
    views: list[LazyCheckpoint] = []
    try:
        for p in paths:
            views.append(_model_names(model, p, read))
    except BaseException:
        for v in views:
            v.close()
        raise
    with torch.enable_grad():  # learned_soup closes the views once it has stacked them
        result = learned_soup(views, model, metric.loss, batches, by_layer=by_layer,
                              epochs=epochs, lr=lr)  # fmt: skip
    soup = MemoryCheckpoint(result.state_dict, "<learned soup>")
    after = float(ev.evaluate(soup, name="learned soup").score)
    folder = next((p for p in paths if p.is_dir()), None)
    folder = folder if output.suffix != ".safetensors" else None
    meta = {"recipe": "learned", "ingredients": ",".join(str(p) for p in paths)}
    write_candidate(soup, output, metadata=meta, overwrite=overwrite,
                    model_files_from=folder)  # fmt: skip
    coefs = {"ingredients": [str(p) for p in paths], "by_layer": by_layer,
             "coefficients": result.coefficients, "losses": result.losses}  # fmt: skip
    write_report(coefs_path, coefs)
    return result, after


def _model_names(model: nn.Module, path: Path, read: ReadOptions) -> LazyCheckpoint:
    """An ingredient under the model's tensor names, tied weights filled in (what
    `learned_soup`, which maps names one to one, expects), read from the file when
    `learned_soup` stacks it: the ingredients are held once, in its stack."""
    from ..candidate import LazyCheckpoint
    from ..io import open_checkpoint
    from ..metrics.model import checkpoint_names

    target = model.state_dict()
    ckpt = open_checkpoint(path, key=read.key, unsafe_pickle=read.unsafe_pickle)
    try:
        source = {m: k for k, m in checkpoint_names(model, list(ckpt.infos), target).items()}
        by_storage = {(t.data_ptr(), tuple(t.shape)): k for k, t in target.items() if k in source}
        for k, t in target.items():
            twin = by_storage.get((t.data_ptr(), tuple(t.shape)))
            if k not in source and twin is not None:
                source[k] = source[twin]
    except BaseException:
        ckpt.close()
        raise
    infos = {m: ckpt.infos[k] for m, k in source.items()}
    return LazyCheckpoint(str(path), infos, lambda m: ckpt.get(source[m]), on_close=ckpt.close)


def register(app: typer.Typer) -> None:
    app.command()(learned)
