"""`MetricEvaluator`: a built-in metric as an `Evaluator`, scoring candidates in process.

The model is built once (per process) from a folder's config, each candidate's tensors
are copied into it, and the metric runs under `torch.no_grad()`. It pickles as its spec
(metric name, data path, options): a Ray or local worker rebuilds and keeps its own model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..candidate import adapter_config
from ..errors import EvaluationError, SoupError
from ..evaluate import Score, to_score
from .base import Metric, Settings
from .classify import Accuracy, ImageAccuracy
from .harness import PREFIX, parse
from .lm import LMChoice, LMLoss
from .model import build_model, find_model_dir, load_config, load_into, resolve_device

if TYPE_CHECKING:
    from torch import nn

    from ..io.base import Checkpoint
    from ..types import PathLike

__all__ = ["METRICS", "MetricEvaluator", "get_metric"]

METRICS: dict[str, Metric] = {
    m.name: m for m in (LMLoss(), LMChoice(), Accuracy(), ImageAccuracy())
}


def get_metric(name: str) -> Metric:
    """The built-in metric called `name` (or `lm-eval:TASK[,TASK…]`, lm-evaluation-harness
    tasks); an unknown name lists the known ones."""
    if name.startswith(PREFIX):
        return parse(name)
    if name not in METRICS:
        raise SoupError(f"unknown metric {name!r}; known: {', '.join(METRICS)}, {PREFIX}TASK")
    return METRICS[name]


class MetricEvaluator:
    """Score candidates with a built-in metric on held-out `data` (higher is better).

    Args:
        metric: "lm-loss", "lm-choice", "accuracy" or "image-accuracy" (see `METRICS`).
        data: the held-out file (JSONL/CSV) or ImageFolder.
        model: folder with config.json and tokenizer/image processor (default: the first
            candidate's HF folder, or the folder a soup's model files come from).
        device: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N".
        batch_size, max_length: see `Settings`.
        dtype: what the model runs in: "float32" (default), "bfloat16"/"bf16" or
            "float16"/"fp16" (half the memory; scores then differ in the last digits).
        progress: called as progress(examples done, total) during each evaluation.

    Example:
        >>> ev = MetricEvaluator("lm-loss", "val.jsonl", model="runs/a")  # doctest: +SKIP
        >>> greedy_soup(["runs/a", "runs/b"], ev).selected  # doctest: +SKIP
    """

    def __init__(
        self,
        metric: str,
        data: PathLike,
        *,
        model: PathLike | None = None,
        device: str = "auto",
        batch_size: int = 8,
        max_length: int = 512,
        dtype: str = "float32",
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.metric = get_metric(metric)
        self.data, self.device = Path(data), device
        self.model_dir = None if model is None else Path(model)
        self.settings = Settings(batch_size=batch_size, max_length=max_length, dtype=dtype)
        self.progress = progress
        resolve_device(device)  # an unknown or missing device fails now
        self._prepared: Any = None

    def check(self, first: Checkpoint | None = None) -> None:
        """Read the data, config and tokenizer now (before any soup is computed): any bad
        input fails here. `first` gives the model folder when `model` was not."""
        self.model_dir = find_model_dir(self.model_dir, first)
        self._prepare()

    def module(self, candidate: Checkpoint | None = None) -> nn.Module:
        """The live model (built on first use, then kept by this process)."""
        if self.model_dir is None:
            self.check(candidate)
        assert self.model_dir is not None
        device, dtype = resolve_device(self.device), self.settings.torch_dtype
        return build_model(self.model_dir, self.metric.auto_class, device, dtype)

    def evaluate(self, candidate: Checkpoint, *, name: str) -> Score:
        if adapter_config(candidate) is not None:  # a PEFT adapter: loaded over its base
            from .peft_model import adapter_model

            model = adapter_model(self, candidate)
        else:
            model = self.module(candidate)
            assert self.model_dir is not None
            load_into(model, candidate, self.model_dir)
        prepared = self._prepare()
        try:
            with torch.no_grad():
                value = self.metric.run(model, prepared, self.settings, self.progress)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise EvaluationError(
                f"candidate {name!r}: {self.metric.name} failed: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"
            ) from e
        return to_score(value, name)

    def _prepare(self) -> Any:
        if self._prepared is None:
            assert self.model_dir is not None
            config = load_config(self.model_dir, self.metric.auto_class)
            self._prepared = self.metric.prepare(self.data, self.model_dir, config, self.settings)
        return self._prepared

    def spec(self) -> dict[str, Any]:
        """What scores (for reports): the metric, its data and how its model runs."""
        s = self.settings
        return {"metric": self.metric.name, "data": str(self.data), "model": str(self.model_dir),
                "device": self.device, "dtype": s.dtype, "batch_size": s.batch_size,
                "max_length": s.max_length}  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:  # the spec: workers re-read data, build a model
        return {**self.__dict__, "_prepared": None, "progress": None}

    def __repr__(self) -> str:
        return f"MetricEvaluator({self.metric.name!r}, {str(self.data)!r})"
