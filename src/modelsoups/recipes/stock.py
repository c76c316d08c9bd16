"""Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522, Eq. 6-7).

Per layer, from the angle θ between the fine-tuned weights' deltas from the pretrained
weights θ₀ (averaged over pairs):

    cos θ = mean_{i<j} cos(θᵢ − θ₀, θⱼ − θ₀)
    t     = k·cos θ / (1 + (k − 1)·cos θ)
    θ     = t·mean(θᵢ) + (1 − t)·θ₀

Few, nearly orthogonal fine-tunes (small cos θ) are pulled towards θ₀; agreeing ones keep
their average (identical ingredients: cos θ = 1, t = 1).

Each tensor takes two passes over its inputs, in cache-sized slices, and never a copy of a
whole tensor: the first sums the k×k Gram matrix ⟨θᵢ − θ₀, θⱼ − θ₀⟩ (its diagonal gives
the norms), the second is the weighted mean of `average.py` with weights (1 − t) on θ₀
and t/k on each θᵢ, with the same non-finite and overflow checks as every soup.

Rounding follows the uniform soup's `accumulate` (docs/guarantees.md, "Rounding"). By
default both passes run in float32 (each slice's Gram by BLAS, the slices summed in
float64): t is then within ~1e-7 of its float64 value (a float32 dot product's error) and
the soup within (k + 2)·2⁻²⁴·Σ|wᵢ·xᵢ| of the weighted mean with that t, the bound of a
uniform soup of k + 1 inputs. `accumulate="float64"` runs both in float64: every element
is Eq. 6-7 evaluated exactly, rounded once to the output dtype (at 1.6× the compute).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..average import (
    accumulate_dtype,
    check_finite,
    output_dtype,
    soup_tensor,
    widen,
    widen_buffer,
)
from ..check import check_compatible, check_non_float
from ..dtypes import BF16, F32, F64, DType, to_torch
from ..errors import SoupError
from ..ingredients import Ingredient, close_all, open_ingredients
from ..io.base import Checkpoint
from ..types import PathLike, Progress, SoupResult, StateDict

if TYPE_CHECKING:
    import torch


__all__ = ["model_stock", "stock_ratio", "write_model_stock"]

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
                                progress=progress)  # fmt: skip
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

    Two passes over the inputs, both accumulated in `accumulate`: the Gram matrix of the
    deltas (`delta_gram`), then the weighted mean with weights (1 − t, t/k, …, t/k)."""
    if not base.infos[name].is_float:
        return base.array(name)
    gram = delta_gram(base.array(name), base.infos[name].dtype,
                      [c.array(name) for c in finetuned],
                      [c.infos[name].dtype for c in finetuned], accumulate=accumulate)  # fmt: skip
    if not np.isfinite(gram).all():  # a NaN/Inf in an input: name it
        check_finite(name, dtype or base.infos[name].dtype, [base, *finetuned], suggest_allow=False)
    cos, t = ratio_from_gram(gram)
    ratios[name] = (round(cos, 6), round(t, 6))
    k = len(finetuned)
    weights = [1.0 - t] + [t / k] * k
    return soup_tensor(name, [base, *finetuned], weights, accumulate=accumulate, dtype=dtype,
                       buffer=buffer, suggest_allow=False)  # fmt: skip


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


# Pass 1 puts a slice of each fine-tune's delta into one row of a k×SLICE matrix that BLAS
# then multiplies by its transpose. Float32 rows: k·256 KiB, in a core's L2 cache for the
# few fine-tunes Model Stock is used with; float64 rows: k·128 KiB.
SLICE = {F32: 1 << 16, F64: 1 << 14}


def delta_gram(
    base: np.ndarray,
    base_dtype: DType,
    finetuned: Sequence[np.ndarray],
    dtypes: Sequence[DType],
    *,
    accumulate: DType = F32,
) -> np.ndarray:
    """G[i, j] = ⟨θᵢ − θ₀, θⱼ − θ₀⟩ over a whole tensor, slice by slice, as float64.

    `accumulate=F32`: each slice's deltas and their products in float32 (the difference of
    two bf16 or fp16 values is exact there), the slices' Gram matrices summed in float64.
    `F64`: everything in float64 (exact products; the recipe's `--accumulate float64`).
    Arrays are in their storage type (`DType.storage`); memory is a few slices, never a
    whole tensor.
    """
    k, numel = len(finetuned), base.size
    step = min(SLICE[accumulate], max(numel, 1))
    acc, f32 = accumulate.numpy, accumulate == F32
    pairs = f32 and numel % 2 == 0 and all(d == BF16 for d in (base_dtype, *dtypes))
    pairs = pairs and all(a.ctypes.data % 4 == 0 for a in (base, *finetuned))
    flat_base, flats = base.reshape(-1), [a.reshape(-1) for a in finetuned]
    wide, wide_base = widen_buffer(), np.empty(step, acc)
    deltas, gram = np.empty((k, step), acc), np.zeros((k, k), np.float64)
    with np.errstate(all="ignore"):  # a NaN or overflow shows in the Gram; checked by the caller
        for start in range(0, numel, step):
            stop = min(start + step, numel)
            m = stop - start
            b = _load(flat_base[start:stop], base_dtype, wide_base if f32 else wide, pairs)
            if b.dtype != acc:  # float64, or fp16 into float32: the base once, not k times
                np.copyto(wide_base[:m], b, casting="unsafe")
                b = wide_base[:m]
            for i, (a, d) in enumerate(zip(flats, dtypes, strict=True)):
                row = deltas[i, :m]  # bf16: widened into the row itself, then the difference
                np.subtract(_load(a[start:stop], d, row if f32 else wide, pairs), b, out=row,
                            dtype=acc)  # fmt: skip
            rows = deltas[:, :m]
            gram += rows @ rows.T
    return gram


def _load(x: np.ndarray, dtype: DType, buffer: np.ndarray, pairs: bool) -> np.ndarray:
    """The 1-d slice `x` as floats: `widen(x, dtype, buffer)`, or with `pairs` (bf16, even
    length, 4-byte aligned), read two elements at a time as uint32 into `buffer`: the odd
    elements first, then the even ones, an order the Gram does not see, without widening
    each uint16 to uint32 first (a third less work)."""
    if not pairs:
        return widen(x, dtype, buffer)
    u, out, half = x.view(np.uint32), buffer[: x.size], x.size // 2
    np.bitwise_and(u, 0xFFFF0000, out=out[:half].view(np.uint32))
    np.left_shift(u, 16, out=out[half:].view(np.uint32))
    return out


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
