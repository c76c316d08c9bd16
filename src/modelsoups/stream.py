"""Checkpoint files in, checkpoint file out: the streaming weighted mean.

The data path is a straight line: open every input lazily (headers only) → check weights,
keys, shapes and integer buffers → plan the output header → for each tensor, read it from
every input (zero-copy views of memory maps), accumulate in float32, write it → rename the
temporary output into place. Memory holds one accumulated tensor at a time, whatever N is.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .average import accumulate_dtype, output_dtype, soup_tensor
from .check import check_compatible, check_non_float, resolve_weights
from .errors import SoupError
from .ingredients import close_all, open_ingredients
from .io import HFFolder
from .io.base import Checkpoint
from .io.folder import copy_model_files
from .io.writer import (
    Entry,
    OutputPlan,
    ShardedWriter,
    atomic_path,
    check_output,
    check_sharding,
)
from .similarity import init_warning
from .types import PathLike, Progress, SoupResult
from .version import __version__

if TYPE_CHECKING:
    import torch

    from .dtypes import DType

__all__ = ["average_checkpoints", "provenance", "write_streamed"]


def provenance(
    recipe: str, ckpts: Sequence[Checkpoint], weights: Sequence[float], **extra: object
) -> dict[str, str]:
    """Metadata stored in the output header: recipe, inputs, weights, version."""
    meta = {
        "format": "pt",
        "modelsoups_version": __version__,
        "recipe": recipe,
        "ingredients": json.dumps([{"path": str(c.path), "bytes": c.nbytes} for c in ckpts]),
        "weights": json.dumps([round(w, 10) for w in weights]),
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


# Computes one output tensor into (the start of) a byte buffer and returns it as an array.
TensorOf = Callable[[str, np.ndarray], np.ndarray]


def _stream_tensors(
    ckpts: Sequence[Checkpoint],
    soup_of: TensorOf,
    writer: ShardedWriter,
    progress: Progress | None,
    threads: int = 2,
    room: int = 0,
) -> None:
    """Compute tensor after tensor on `threads` workers; write them in order as they finish.

    Each worker's result goes into one of `threads` buffers of the largest output tensor
    (or of `room` bytes per element of the largest tensor, if more), reused for the whole
    run: memory stays that whatever the number of inputs, and no tensor faults in fresh
    pages.
    """
    largest = max((max(e.nbytes, room * e.nbytes // e.dtype.itemsize) for e in writer.entries),
                  default=0)  # fmt: skip
    free = [np.empty(largest, np.uint8) for _ in range(threads)]
    total, done = sum(c.nbytes for c in ckpts), 0
    pending: deque[tuple[str, np.ndarray, Future[np.ndarray]]] = deque()

    def write_oldest() -> None:
        nonlocal done
        name, buffer, future = pending.popleft()
        writer.write(name, future.result())
        free.append(buffer)  # written: the next tensor may overwrite it
        done += sum(c.infos[name].nbytes for c in ckpts)
        if progress is not None:
            progress(done, total)

    # numpy releases the GIL in its loops: the workers use both cores.
    with ThreadPoolExecutor(threads) as pool:
        try:
            for name in ckpts[0].infos:
                buffer = free.pop()
                pending.append((name, buffer, pool.submit(soup_of, name, buffer)))
                if not free:
                    write_oldest()
            while pending:
                write_oldest()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def write_streamed(
    ckpts: Sequence[Checkpoint],
    out: Path,
    soup_of: TensorOf,
    dtype: DType | None,
    metadata: dict[str, str],
    *,
    max_shard_size: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    room: int = 0,
) -> SoupResult:
    """Write `soup_of(name, buffer)` for every tensor of `ckpts[0]` into `out`, atomically:
    floating tensors in `dtype` (default: the first input's), two tensors computed at a
    time, config/tokenizer files copied from the first input that is an HF folder. The
    inputs are closed (unmapped) while the output is flushed. Each buffer has at least
    `room` bytes per element of the tensor (Model Stock keeps a float32 sum there)."""
    folder = out.suffix != ".safetensors"
    entries = [
        Entry(n, dtype if (dtype is not None and i.is_float) else i.dtype, i.shape)
        for n, i in ckpts[0].infos.items()
    ]
    plan = OutputPlan(out, entries, metadata, folder, max_shard_size)
    with atomic_path(out, folder=folder, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, plan)
        try:
            _stream_tensors(ckpts, soup_of, writer, progress, room=room)
            for c in ckpts:  # an input rewritten meanwhile gave a mix of old and new bytes
                c.check_unchanged()
            # unmapping the inputs (CPU: page tables of every input) overlaps the fsync
            closer = threading.Thread(target=close_all, args=(ckpts,))
            closer.start()
            try:
                writer.close()
            finally:
                closer.join()
        finally:
            writer.abort()
        source = next((c for c in ckpts if isinstance(c, HFFolder)), None)
        copied = copy_model_files(source.path, tmp) if folder and source else []
    result = SoupResult(out, metadata.get("recipe", ""), [c.path for c in ckpts], [],
                        len(entries), sum(e.nbytes for e in entries))  # fmt: skip
    result.notes = sorted({f"{c.path}: {n}" for c in ckpts for n in c.notes})
    if copied:
        result.notes.append(
            f"copied {len(copied)} model files from {source.path if source else ''}"
        )
    return result


# Over 60 lines: half of it is the keyword list (one per `soup uniform/weighted` option)
# and the docstring; the body is checks first, then one streamed write.
def average_checkpoints(
    inputs: Sequence[PathLike],
    out: PathLike,
    *,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    allow_negative: bool = False,
    accumulate: str = "float32",
    dtype: str | DType | torch.dtype | None = None,
    non_float: str = "error",
    allow_nonfinite: bool = False,
    max_shard_size: int | None = None,
    key: str | None = None,
    unsafe_pickle: bool = False,
    overwrite: bool = False,
    recipe: str = "weighted",
    progress: Progress | None = None,
) -> SoupResult:
    """Write the (weighted) mean of checkpoint files, streaming one tensor at a time.

    Args:
        inputs: safetensors files, HF model folders or PyTorch pickles of one architecture.
        out: `*.safetensors` for one file; any other name is an HF-style folder (sharded
            when `max_shard_size` bytes is given), with config/tokenizer files copied from
            the first input that is a folder.
        weights: one per input (`None`: uniform); normalised to sum 1 unless told not to.
        dtype: output dtype of floating tensors (default: the first input's): a torch
            dtype or a name (`"bf16"`, `"float32"`, `"F16"`).

    Returns:
        A `SoupResult`; the output header also carries the recipe, inputs and weights.
    """
    started = time.perf_counter()
    paths, out = [Path(p) for p in inputs], Path(out)
    check_sharding(out, max_shard_size)
    if not paths:
        raise SoupError("no ingredients: give at least one checkpoint")
    check_output(out, paths)
    ckpts = open_ingredients(paths, key=key, unsafe_pickle=unsafe_pickle)
    try:
        w = resolve_weights(weights, len(ckpts), normalize=normalize, allow_negative=allow_negative)
        check_compatible(ckpts)
        check_non_float(ckpts, non_float=non_float)
        different_inits = init_warning(ckpts)  # a fixed sample per tensor, not a pass
        acc_dtype, out_dtype = accumulate_dtype(accumulate), output_dtype(dtype)
        meta = provenance(recipe, ckpts, w, accumulate=accumulate)

        def soup_of(name: str, buffer: np.ndarray) -> np.ndarray:
            return soup_tensor(name, ckpts, w, accumulate=acc_dtype, dtype=out_dtype,
                               allow_nonfinite=allow_nonfinite, buffer=buffer)  # fmt: skip

        result = write_streamed(ckpts, out, soup_of, out_dtype, meta, max_shard_size=max_shard_size,
                                overwrite=overwrite, progress=progress)  # fmt: skip
    finally:
        close_all(ckpts)
    result.recipe, result.ingredients, result.weights = recipe, paths, w
    result.seconds = time.perf_counter() - started
    if len(ckpts) == 1:
        result.warnings.append("only one ingredient: the soup is a copy of it")
    if different_inits:
        result.warnings.append(different_inits)
    return result
