"""Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522, Eq. 6-7).

Per layer, from the angle θ between the fine-tuned weights' deltas from the pretrained
weights θ₀ (averaged over pairs):

    cos θ = mean_{i<j} cos(θᵢ − θ₀, θⱼ − θ₀)
    t     = k·cos θ / (1 + (k − 1)·cos θ)
    θ     = t·mean(θᵢ) + (1 − t)·θ₀

Few, nearly orthogonal fine-tunes (small cos θ) are pulled towards θ₀; agreeing ones keep
their average (identical ingredients: cos θ = 1, t = 1).

Each tensor takes two passes, in cache-sized slices (`stock_slices.py`): the first sums
the k×k Gram matrix ⟨θᵢ − θ₀, θⱼ − θ₀⟩ (its diagonal gives the norms), the second is the
weighted mean with weights (1 − t) on θ₀ and t/k on each θᵢ, with the same non-finite and
overflow checks as every soup. By default the first pass also keeps Σθᵢ in float32 (in
the buffer the output is then written over: 4 bytes per element of the largest tensor,
per thread), so the second reads only θ₀ and that sum, and each fine-tune is read once.

Rounding follows the uniform soup's `accumulate` (docs/guarantees.md, "Rounding"). By
default both passes run in float32 (each slice's Gram by dot products, the slices summed
in float64): t is then within ~1e-7 of its float64 value (a float32 dot product's error)
and the soup within (k + 2)·2⁻²⁴·Σ|wᵢ·xᵢ| of the weighted mean with that t, the bound of
a uniform soup of k + 1 inputs (Σθᵢ is summed in the order and precision of that soup).
`accumulate="float64"` runs both in float64, the second pass reading every input again:
every element is Eq. 6-7 evaluated exactly, rounded once to the output dtype.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..average import accumulate_dtype, check_finite, output_dtype, result_array, soup_tensor
from ..check import check_compatible, check_non_float
from ..dtypes import F32, DType, to_torch
from ..errors import SoupError
from ..ingredients import Ingredient, close_all, open_ingredients
from ..io.base import Checkpoint
from ..types import PathLike, Progress, SoupResult, StateDict
from .stock_slices import delta_gram, mix, paired

if TYPE_CHECKING:
    import torch


__all__ = ["delta_gram", "model_stock", "stock_ratio", "write_model_stock"]

Ratios = dict[str, tuple[float, float]]  # tensor name -> (cos θ, t), rounded to 6 digits


def model_stock(
    base: Ingredient,
    finetuned: Sequence[Ingredient],
    *,
    dtype: str | DType | torch.dtype | None = None,
    accumulate: str = "float32",
) -> tuple[StateDict, Ratios]:
    """Model Stock of in-memory state dicts, modules or checkpoint paths.

    Returns the soup (floating tensors in `dtype`, default the base's) and the per-tensor
    `(cos θ, t)` ratios. `accumulate="float64"`: the Gram matrices and the mean in float64,
    each element the exact formula rounded once (see `stock_tensor`).

    Example:
        >>> sd, ratios = model_stock(pretrained_sd, [ft1_sd, ft2_sd])  # doctest: +SKIP
    """
    acc, out_dtype = accumulate_dtype(accumulate), output_dtype(dtype)
    ckpts = open_ingredients([base, *finetuned])
    try:
        _check(ckpts)
        ratios: Ratios = {}
        soup = {}
        for name, info in ckpts[0].infos.items():
            array = stock_tensor(name, ckpts[0], ckpts[1:], ratios, dtype=out_dtype,
                                 accumulate=acc)  # fmt: skip
            if info.is_float:
                soup[name] = to_torch(array, out_dtype or info.dtype)
            else:  # the base's own buffer: copied, so that the soup owns its tensors
                soup[name] = to_torch(array.copy(), info.dtype)
    finally:
        close_all(ckpts)
    return soup, ratios


def write_model_stock(
    base: PathLike,
    finetuned: Sequence[PathLike],
    out: PathLike,
    *,
    dtype: str | DType | torch.dtype | None = None,
    accumulate: str = "float32",
    max_shard_size: int | None = None,
    key: str | None = None,
    unsafe_pickle: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> tuple[SoupResult, Ratios]:
    """Stream Model Stock of checkpoint files into `out` (as `average_checkpoints` writes a
    mean: one tensor at a time, atomically); returns the result and the per-tensor ratios."""
    from ..io.writer import check_output, check_sharding
    from ..stream import provenance, write_streamed

    started, out, paths = time.perf_counter(), Path(out), [Path(base), *map(Path, finetuned)]
    check_sharding(out, max_shard_size)
    check_output(out, paths)
    acc, out_dtype = accumulate_dtype(accumulate), output_dtype(dtype)
    ckpts = open_ingredients(paths, key=key, unsafe_pickle=unsafe_pickle)
    try:
        _check(ckpts)
        ratios: Ratios = {}

        def soup_of(name: str, buffer: np.ndarray) -> np.ndarray:
            return stock_tensor(name, ckpts[0], ckpts[1:], ratios, dtype=out_dtype,
                                accumulate=acc, buffer=buffer)  # fmt: skip

        meta = provenance("model-stock", ckpts, [], accumulate=np.dtype(acc.numpy).name)
        result = write_streamed(ckpts, out, soup_of, out_dtype, meta,
                                max_shard_size=max_shard_size, overwrite=overwrite,
                                progress=progress, room=4 if acc == F32 else 0)  # fmt: skip
    finally:
        close_all(ckpts)
    result.seconds = time.perf_counter() - started
    return result, dict(sorted(ratios.items()))


def stock_tensor(
    name: str,
    base: Checkpoint,
    finetuned: Sequence[Checkpoint],
    ratios: Ratios,
    *,
    dtype: DType | None = None,
    accumulate: DType = F32,
    buffer: np.ndarray | None = None,
) -> np.ndarray:
    """One tensor of Model Stock, as an array in its storage type (in `buffer` if given);
    records its `(cos θ, t)` in `ratios`. Integer tensors are the base's.

    Pass 1 sums the Gram matrix of the deltas (`delta_gram`); pass 2 is the weighted mean
    with weights (1 − t, t/k, …, t/k). In float32, pass 1 also keeps Σθᵢ (in `buffer`'s
    first 4 bytes per element when it has them, the output then overwriting it slice by
    slice) and pass 2 reads only θ₀ and that sum (`mix`); in float64 it reads every input
    again (`soup_tensor`)."""
    info = base.infos[name]
    if not info.is_float:
        return base.array(name)
    out_dtype, k = dtype or info.dtype, len(finetuned)
    arrays, dtypes = [c.array(name) for c in finetuned], [c.infos[name].dtype for c in finetuned]
    fused = accumulate == F32
    pairs = fused and paired([base.array(name), *arrays], [info.dtype, *dtypes])
    sums = _sums(info.numel, out_dtype, buffer) if fused else None
    gram = delta_gram(base.array(name), info.dtype, arrays, dtypes, accumulate=accumulate,
                      sums=sums, pairs=pairs)  # fmt: skip
    if not np.isfinite(gram).all():  # a NaN/Inf in an input: name it
        check_finite(name, out_dtype, [base, *finetuned], suggest_allow=False)
    cos, t = ratio_from_gram(gram)
    ratios[name] = (round(cos, 6), round(t, 6))
    if sums is None:
        return soup_tensor(name, [base, *finetuned], [1.0 - t] + [t / k] * k,
                           accumulate=accumulate, dtype=dtype, buffer=buffer,
                           suggest_allow=False)  # fmt: skip
    out = result_array(info.shape, out_dtype, buffer)
    if not mix(base.array(name), info.dtype, sums, (1.0 - t, t / k), out, out_dtype, pairs=pairs):
        check_finite(name, out_dtype, [base, *finetuned], suggest_allow=False)
    return out


def _sums(numel: int, out_dtype: DType, buffer: np.ndarray | None) -> np.ndarray:
    """Float32 room for Σθᵢ: the start of `buffer` when the output, no wider than 4 bytes,
    overwrites it from there (see `mix`), else a new array."""
    if buffer is not None and out_dtype.itemsize <= 4 and buffer.nbytes >= 4 * numel:
        return buffer.reshape(-1).view(np.uint8)[: 4 * numel].view(np.float32)
    return np.empty(numel, np.float32)


def ratio_from_gram(gram: np.ndarray) -> tuple[float, float]:
    """(cos θ, t) from the k×k Gram matrix of the deltas (Eq. 6-7)."""
    k = gram.shape[0]
    sq_norms = np.diagonal(gram)
    if bool((sq_norms == 0).any()):  # an ingredient equal to the base on this layer
        cos = 1.0 if bool((sq_norms == 0).all()) else 0.0
    else:
        cosines = gram / np.sqrt(np.outer(sq_norms, sq_norms))
        cos = float((cosines.sum() - np.trace(cosines)) / (k * (k - 1)))
    cos = max(min(cos, 1.0), 0.0)  # opposed deltas (cos < 0) fall back to the base: t = 0
    return cos, k * cos / (1 + (k - 1) * cos)


def stock_ratio(deltas: torch.Tensor) -> tuple[float, float]:
    """(cos θ, t) for `deltas` of shape (k, n): the fine-tuned minus the base, one row each."""
    d = deltas.detach().to("cpu").double().reshape(deltas.shape[0], -1).numpy()
    return ratio_from_gram(d @ d.T)


def _check(ckpts: Sequence[Checkpoint]) -> None:
    """Base and at least two fine-tunes with the same keys, shapes and integer buffers."""
    if len(ckpts) < 3:
        raise SoupError("Model Stock needs at least two fine-tuned models (and the base)")
    check_compatible(ckpts)
    check_non_float(ckpts)
