"""Soup candidates: checkpoints computed tensor by tensor when read, never stored whole.

A recipe describes a candidate soup as a `LazyCheckpoint` whose `get(key)` computes that one
tensor (e.g. `(Σθ + θₖ)/(k+1)` for a greedy step). Evaluators read it one tensor at a time
(`load_candidate` into a module), all at once (`materialize`), or stream it to disk
(`write_candidate`), so scoring or writing a candidate costs one pass over the weights.
An eval command reads them from files in `candidate_folder`, a temporary next to the output.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .dtypes import to_numpy
from .errors import IncompatibleError
from .io import HFFolder
from .io.base import Checkpoint, TensorInfo
from .io.writer import (
    Entry,
    OutputPlan,
    ShardedWriter,
    atomic_path,
    check_sharding,
    remove_stale_partials,
    temporary_name,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .types import StateDict

__all__ = [
    "LazyCheckpoint",
    "candidate_folder",
    "load_candidate",
    "materialize",
    "model_files_source",
    "write_candidate",
]


class LazyCheckpoint(Checkpoint):
    """A checkpoint whose tensors are computed on `get` (a candidate soup, never stored).

    `model_files_from` names an HF folder whose config/tokenizer files go with the candidate
    when it is written out, so that a folder-based eval command can load it.
    """

    def __init__(
        self,
        label: str,
        infos: Mapping[str, TensorInfo],
        compute: Callable[[str], torch.Tensor],
        *,
        model_files_from: Path | None = None,
        on_close: Callable[[], None] | None = None,
        compute_array: Callable[[str], np.ndarray] | None = None,
    ) -> None:
        super().__init__(Path(label), "memory", dict(infos))
        self._compute, self.model_files_from = compute, model_files_from
        self._compute_array = compute_array
        self._on_close = on_close
        self.extra: dict[str, Any] = {}  # what a recipe learns while computing (e.g. ratios)

    def get(self, name: str) -> torch.Tensor:
        return self._compute(name)

    def close(self) -> None:
        """Release what computing it holds (buffers, open inputs); reading it then fails."""
        if self._on_close is not None:
            self._on_close()
        self._on_close = self._compute_array = None
        self._compute = _closed(self.path)

    def array(self, name: str) -> np.ndarray:
        """Tensor `name` in its declared dtype (`get` may return it wider), as numpy
        (`compute_array`, if given, computes it so without a wider copy)."""
        if self._compute_array is not None:
            return self._compute_array(name)
        return to_numpy(self.get(name).to(self.infos[name].dtype.to_torch()))


def _closed(label: Path) -> Callable[[str], torch.Tensor]:
    def compute(name: str) -> torch.Tensor:
        raise RuntimeError(f"{label}: tensor {name!r} read after the checkpoint was closed")

    return compute


def model_files_source(ckpts: Sequence[Checkpoint]) -> Path | None:
    """The first input that is an HF folder: its config/tokenizer files go with the soup."""
    return next((c.path for c in ckpts if isinstance(c, HFFolder)), None)


def materialize(candidate: Checkpoint) -> StateDict:
    """Every tensor of `candidate` in its declared dtype, as a plain state dict."""
    return {k: candidate.get(k).to(i.dtype.to_torch()) for k, i in candidate.infos.items()}


def write_candidate(
    candidate: Checkpoint,
    out: Path,
    *,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    model_files_from: Path | None = None,
    max_shard_size: int | None = None,
) -> None:
    """Stream `candidate` into `out` (a `.safetensors` file, else an HF folder), atomically.

    `max_shard_size` (bytes) shards the folder as `save_pretrained` does.
    """
    from .io.folder import copy_model_files

    folder = out.suffix != ".safetensors"
    check_sharding(out, max_shard_size)
    entries = [Entry(n, i.dtype, i.shape) for n, i in candidate.infos.items()]
    plan = OutputPlan(out, entries, {"format": "pt", **(metadata or {})}, folder, max_shard_size)
    with atomic_path(out, folder=folder, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, plan)
        try:
            for name in candidate.infos:
                writer.write(name, candidate.array(name))
            writer.close()
        finally:
            writer.abort()
        if folder and model_files_from is not None:
            copy_model_files(model_files_from, tmp)


CANDIDATES = ".soup-candidate-"


@contextlib.contextmanager
def candidate_folder(out: Path) -> Iterator[Path]:
    """This run's folder for candidate files next to `out`: `.NAME.soup-candidate-HOST-PID`.

    Removed when the block ends; one left by a killed run is removed by the next run on
    this host for the same output once its process is gone, as partial outputs are.
    """
    remove_stale_partials(out, CANDIDATES)
    folder = temporary_name(out, CANDIDATES)
    folder.mkdir(exist_ok=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_candidate(module: nn.Module, candidate: Checkpoint) -> nn.Module:
    """Copy `candidate` into `module`'s existing tensors in place (one tensor at a time)."""
    import torch  # here, not at the top: `soup stock` and greedy's checks never need it

    target = module.state_dict()
    missing = [k for k in target if k not in candidate.infos]
    unexpected = [k for k in candidate.infos if k not in target]
    if missing or unexpected:
        raise IncompatibleError(
            f"{candidate.path}: does not fit the model from model_factory "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(candidate.get(k))
    return module
