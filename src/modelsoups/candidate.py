"""Soup candidates: checkpoints computed tensor by tensor when read, never stored whole.

A recipe describes a candidate soup as a `LazyCheckpoint` whose `get(key)` computes that one
tensor (e.g. `(Σθ + θₖ)/(k+1)` for a greedy step). Evaluators read it one tensor at a time
(`load_candidate` into a module), all at once (`materialize`), or stream it to disk
(`write_candidate`), so scoring or writing a candidate costs one pass over the weights.
An eval command reads them from files in `candidate_folder`, a temporary next to the output.

A candidate that carries an `adapter_config` (`as_adapter`) is a PEFT LoRA adapter: its
tensors have PEFT's keys, it is written as an adapter folder (`adapter_config.json` +
`adapter_model.safetensors`), and a built-in metric loads it into a `PeftModel` over the
base instead of copying it into a model (`metrics/peft_model.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .dtypes import to_numpy
from .errors import IncompatibleError, OutputError
from .io import HFFolder
from .io.base import Checkpoint, TensorInfo
from .io.files import file_kind
from .io.scratch import ScratchFile, Sink
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
    "adapter_config",
    "as_adapter",
    "candidate_folder",
    "load_candidate",
    "materialize",
    "model_files_source",
    "open_candidate",
    "write_candidate",
    "write_parts",
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
        adapter_config: dict[str, Any] | None = None,
        compute_parts: Callable[[str, Sink], None] | None = None,
    ) -> None:
        super().__init__(Path(label), "memory", dict(infos))
        self._compute, self.model_files_from = compute, model_files_from
        self.adapter_config = adapter_config  # a PEFT LoRA adapter's config (see module doc)
        self._compute_array, self._compute_parts = compute_array, compute_parts
        self._on_close = on_close
        self.extra: dict[str, Any] = {}  # what a recipe learns while computing (e.g. ratios)

    def get(self, name: str) -> torch.Tensor:
        return self._compute(name)

    def close(self) -> None:
        """Release what computing it holds (buffers, open inputs); reading it then fails."""
        if self._on_close is not None:
            self._on_close()
        self._on_close = self._compute_array = self._compute_parts = None
        self._compute = _closed(self.path)

    def array(self, name: str) -> np.ndarray:
        """Tensor `name` in its declared dtype (`get` may return it wider), as numpy
        (`compute_array`, if given, computes it so without a wider copy)."""
        if self._compute_array is not None:
            return self._compute_array(name)
        return to_numpy(self.get(name).to(self.infos[name].dtype.to_torch()))

    def write_parts(self, name: str, sink: Sink) -> None:
        """Tensor `name` in its declared dtype, passed to `sink(first, part)` in flat parts
        (element `first` onwards), maybe from several threads at once, each part valid only
        during the call: `compute_parts` if given, else `array` whole."""
        if self._compute_parts is not None:
            self._compute_parts(name, sink)
        else:
            sink(0, self.array(name).reshape(-1))


def _closed(label: Path) -> Callable[[str], torch.Tensor]:
    def compute(name: str) -> torch.Tensor:
        raise RuntimeError(f"{label}: tensor {name!r} read after the checkpoint was closed")

    return compute


def adapter_config(candidate: Checkpoint) -> dict[str, Any] | None:
    """The PEFT config of a candidate that is a LoRA adapter (`as_adapter`), else None."""
    config = getattr(candidate, "adapter_config", None)
    return config if isinstance(config, dict) else None


def as_adapter(candidate: Checkpoint, config: dict[str, Any]) -> LazyCheckpoint:
    """`candidate` (tensors with PEFT adapter keys) as a LoRA adapter with `config`: read
    through, never copied; written as an adapter folder, scored in a `PeftModel`."""
    return LazyCheckpoint(str(candidate.path), candidate.infos, candidate.get,
                          compute_array=candidate.array, adapter_config=config)  # fmt: skip


@contextlib.contextmanager
def open_candidate(
    path: Path, *, key: str | None = None, unsafe_pickle: bool = False
) -> Iterator[Checkpoint]:
    """A checkpoint to score: a file or HF folder, or a PEFT adapter folder (`as_adapter`)."""
    from .io import open_checkpoint
    from .io.adapter import adapter_folder, open_adapter

    if adapter_folder(path) is not None:
        adapter = open_adapter(path, unsafe_pickle=unsafe_pickle)
        try:
            yield as_adapter(adapter.weights, adapter.config)
        finally:
            adapter.close()
        return
    ckpt = open_checkpoint(path, key=key, unsafe_pickle=unsafe_pickle)
    try:
        yield ckpt
    finally:
        ckpt.close()


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
    scratch: bool = False,
) -> None:
    """Stream `candidate` into `out` (a `.safetensors` file, else an HF folder; a PEFT
    adapter folder if the candidate is an adapter), atomically.

    `max_shard_size` (bytes) shards the folder as `save_pretrained` does. `scratch`: a
    candidate an eval command reads once, deleted after; written into the page cache in
    the parts its computation yields (`write_parts`), never fsynced (`io/scratch.py`).
    """
    from .io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from .io.folder import copy_model_files

    config = adapter_config(candidate)
    folder = config is not None or out.suffix != ".safetensors"
    check_sharding(out, max_shard_size)
    entries = [Entry(n, i.dtype, i.shape) for n, i in candidate.infos.items()]
    meta = {"format": "pt", **(metadata or {})}
    with atomic_path(out, folder=folder, overwrite=overwrite, durable=not scratch) as tmp:
        if config is not None:  # PEFT reads one adapter_model.safetensors
            target = tmp / ADAPTER_WEIGHTS[0]
            root, plan = target, OutputPlan(target, entries, meta, folder=False)
        else:
            target = tmp / "model.safetensors" if folder else tmp
            root, plan = tmp, OutputPlan(out, entries, meta, folder, max_shard_size)
        if scratch and max_shard_size is None:
            _write_scratch(candidate, target, entries, meta)
        else:
            _write_durable(candidate, ShardedWriter(root, plan))
        if config is not None:
            text = json.dumps(config, indent=2, sort_keys=True) + "\n"
            (tmp / ADAPTER_CONFIG).write_text(text)
        elif folder and model_files_from is not None:
            copy_model_files(model_files_from, tmp)


def write_parts(candidate: Checkpoint, name: str, sink: Sink) -> None:
    """Pass tensor `name` of `candidate`, in its declared dtype, to `sink(first, part)`:
    in parts as a `LazyCheckpoint` computes them, else whole."""
    if isinstance(candidate, LazyCheckpoint):
        candidate.write_parts(name, sink)
    else:
        sink(0, candidate.array(name).reshape(-1))


def _write_durable(candidate: Checkpoint, writer: ShardedWriter) -> None:
    try:
        for name in candidate.infos:
            writer.write(name, candidate.array(name))
        writer.close()
    finally:
        writer.abort()


def _write_scratch(candidate: Checkpoint, target: Path, entries: list[Entry],
                   meta: dict[str, str]) -> None:  # fmt: skip
    f = ScratchFile(target, entries, meta)
    try:
        for name in candidate.infos:
            write_parts(candidate, name, f.sink(name))
        f.close()
    finally:
        f.abort()


CANDIDATES = ".soup-candidate-"


@contextlib.contextmanager
def candidate_folder(out: Path) -> Iterator[Path]:
    """This run's folder for candidate files next to `out`: `.NAME.soup-candidate-HOST-PID`.

    Private (mode 0700) and this user's: anything else already at that name (a symbolic
    link planted in a shared --workdir such as /tmp, another user's folder) is refused,
    never written through. Removed when the block ends; one left by a killed run is
    removed by the next run on this host for the same output once its process is gone, as
    partial outputs are.
    """
    remove_stale_partials(out, CANDIDATES)
    folder = temporary_name(out, CANDIDATES)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:  # this process's own (an earlier block), or not ours at all
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise OutputError(
                f"{folder}: is already there and is not this run's candidate folder "
                f"({file_kind(st.st_mode)}, owner uid {st.st_uid}); remove it"
            ) from None
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
