"""Model Stock's two passes over one tensor, in cache-sized slices (the algorithm: `stock.py`).

Pass 1, `delta_gram`: a slice of θ₀ and of each θᵢ is widened into one row each of a
k×SLICE matrix, whose rows are then the deltas θᵢ − θ₀; their k×k Gram matrix is summed
over the slices. Given `sums`, pass 1 also keeps Σθᵢ of each slice there, before the
subtraction (float32, one array of the tensor), so that pass 2, `mix`, reads only θ₀ and
that sum: (1 − t)·θ₀ + (t/k)·Σθᵢ, rounded to the output dtype. Each fine-tune is then read
once; without `sums` (`accumulate="float64"`), pass 2 is the weighted mean of all k + 1
inputs (`soup_tensor`).

bf16 slices are read two elements at a time (`pairs`): the odd elements first, then the
even ones, an order neither the Gram nor Σθᵢ sees; `mix` reads θ₀ in the same order and
puts the elements back in theirs as it rounds them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from numpy.typing import DTypeLike

from ..average import all_finite, narrow, widen, widen_buffer
from ..dtypes import BF16, F32, F64, DType

__all__ = ["SLICE", "delta_gram", "mix", "paired"]

# Float32 slices of 2¹⁸ elements (rows of k MiB, in the L3 cache). Slices of 2¹⁶ fit in L2
# and are as fast on one thread, but two threads on 2 cores then took 1.8-3× as long for
# twice the work as one thread for once: they hand the GIL over at 4× as many numpy calls
# (measured on 11M-element tensors; 2¹⁸: 1.2-1.5×). Float64 slices of 2¹⁶ (rows of
# k·512 KiB): the first pass at 2¹⁴ took 3.2× as long on two threads, at 2¹⁶ 1.8×.
SLICE = {F32: 1 << 18, F64: 1 << 16}


_LOCAL = threading.local()


def _room(name: str, shape: tuple[int, ...], dtype: DTypeLike) -> np.ndarray:
    """This thread's buffer `name`, reused by every tensor (fresh pages cost a fault and a
    zeroing each time); at most a few slices."""
    rooms: dict[tuple[object, ...], np.ndarray] = _LOCAL.__dict__.setdefault("rooms", {})
    key = (name, shape, np.dtype(dtype))
    if key not in rooms:
        rooms[key] = np.empty(shape, dtype)
    return rooms[key]


def paired(arrays: Sequence[np.ndarray], dtypes: Sequence[DType]) -> bool:
    """Whether float32 passes may read these 1-d slices two bf16 at a time: all bf16, of
    even length, 4-byte aligned (their slices, of even `SLICE`, then are too)."""
    return (
        all(d == BF16 for d in dtypes)
        and arrays[0].size % 2 == 0
        and all(a.ctypes.data % 4 == 0 for a in arrays)
    )


def delta_gram(
    base: np.ndarray,
    base_dtype: DType,
    finetuned: Sequence[np.ndarray],
    dtypes: Sequence[DType],
    *,
    accumulate: DType = F32,
    sums: np.ndarray | None = None,
    pairs: bool | None = None,
) -> np.ndarray:
    """G[i, j] = ⟨θᵢ − θ₀, θⱼ − θ₀⟩ over a whole tensor, slice by slice, as float64; with
    `sums` (float32, one per element), Σθᵢ of each slice is left there in float32.

    `accumulate=F32`: each slice's deltas and their products in float32 (the difference of
    two bf16 or fp16 values is exact there), the slices' Gram matrices summed in float64.
    `F64`: everything in float64 (exact products; the recipe's `--accumulate float64`).
    Arrays are in their storage type (`DType.storage`); memory is a few slices.
    """
    k, numel, f32 = len(finetuned), base.size, accumulate == F32
    if pairs is None:
        pairs = f32 and paired([base, *finetuned], [base_dtype, *dtypes])
    step, acc = SLICE[accumulate], accumulate.numpy
    flat_base, flats = base.reshape(-1), [a.reshape(-1) for a in finetuned]
    wide, wide_base = widen_buffer(), _room("base", (step,), acc)
    rows, gram = _room("rows", (k, step), acc), np.zeros((k, k), np.float64)
    with np.errstate(all="ignore"):  # a NaN or overflow shows in the Gram; checked by the caller
        for start in range(0, numel, step):
            stop = min(start + step, numel)
            m = stop - start
            b = load(flat_base[start:stop], base_dtype, wide_base if f32 else wide, pairs)
            if b.dtype != acc:  # float64, or fp16 into float32: the base once, not k times
                np.copyto(wide_base[:m], b, casting="unsafe")
                b = wide_base[:m]
            for i, (a, d) in enumerate(zip(flats, dtypes, strict=True)):
                row = rows[i, :m]  # bf16: widened into the row itself, then the difference
                x = load(a[start:stop], d, row if f32 else wide, pairs)
                if sums is not None:  # the same additions, in the same order, as soup_tensor's
                    s = sums[start:stop]
                    np.add(s, x, out=s, dtype=np.float32) if i else np.copyto(s, x)
                np.subtract(x, b, out=row, dtype=acc)
            _add_gram(gram, rows[:, :m])
    return gram


def _add_gram(gram: np.ndarray, rows: np.ndarray) -> None:
    """gram += rows·rowsᵀ. For float32 rows of k ≤ 6 as k(k+1)/2 dot products: BLAS's syrk
    first copies (packs) the rows, 1.8× slower at k = 4."""
    k = rows.shape[0]
    if rows.dtype != np.float32 or k > 6:
        gram += rows @ rows.T
        return
    for i in range(k):
        for j in range(i, k):
            v = float(np.dot(rows[i], rows[j]))
            gram[i, j] += v
            if i != j:
                gram[j, i] += v


def mix(
    base: np.ndarray,
    base_dtype: DType,
    sums: np.ndarray,
    weights: tuple[float, float],
    out: np.ndarray,
    out_dtype: DType,
    *,
    pairs: bool,
) -> bool:
    """out = w₀·θ₀ + w·Σθᵢ (`weights` = (w₀, w)), from the `sums` pass 1 left (in its order:
    the same `pairs`), in float32, rounded to `out_dtype`; returns whether all finite.

    Each slice of `sums` is read before its slice of `out` is written, so `out` may share
    memory with `sums` from its start when its itemsize is at most 4 (the streamed writer's
    buffer): a slice of `out` then overwrites only sums already read."""
    numel, step = base.size, SLICE[F32]
    flat_base, flat_out = base.reshape(-1), out.reshape(-1)
    acc, tmp, ordered = (_room(n, (step,), np.float32) for n in ("acc", "tmp", "ordered"))
    by_pairs = pairs and out_dtype == BF16 and out.ctypes.data % 4 == 0
    finite = True
    with np.errstate(all="ignore"):  # overflow gives inf, as in torch; checked below
        for start in range(0, numel, step):
            stop = min(start + step, numel)
            m, a, t = stop - start, acc[: stop - start], tmp[: stop - start]
            np.multiply(sums[start:stop], weights[1], out=a, dtype=np.float32)
            np.multiply(load(flat_base[start:stop], base_dtype, t, pairs), weights[0], out=t,
                        dtype=np.float32)  # fmt: skip
            np.add(a, t, out=a)
            o = flat_out[start:stop]
            if by_pairs:  # θ₀'s term is added: its buffer takes the rounding's bits
                _narrow_pairs(a, o, tmp.view(np.uint32)[:m])
            else:
                if pairs:  # back to the elements' order
                    ordered[1:m:2], ordered[0:m:2] = a[: m // 2], a[m // 2 :]
                    a = ordered[:m]
                narrow(a, o, out_dtype)
            finite = finite and all_finite(o, out_dtype)
    return finite


def load(x: np.ndarray, dtype: DType, buffer: np.ndarray, pairs: bool) -> np.ndarray:
    """The 1-d slice `x` as floats: `widen(x, dtype, buffer)`, or with `pairs`, read two
    elements at a time as uint32 into `buffer`: the odd elements first, then the even ones,
    without widening each uint16 to uint32 first (a third less work)."""
    if not pairs:
        return widen(x, dtype, buffer)
    u, out, half = x.view(np.uint32), buffer[: x.size], x.size // 2
    np.bitwise_and(u, 0xFFFF0000, out=out[:half].view(np.uint32))
    np.left_shift(u, 16, out=out[half:].view(np.uint32))
    return out


def _narrow_pairs(acc: np.ndarray, out: np.ndarray, bits: np.ndarray) -> None:
    """Round float32 `acc` (odd elements, then even: `load`'s order) to bf16 bits in `out`,
    in the elements' order, as `narrow` rounds (to nearest, ties to even), two at a time.
    A NaN here is never an input's (those fail the Gram check first) but the processor's
    own, whose payload this rounding keeps a NaN; `all_finite` then refuses it."""
    u, half = acc.view(np.uint32), acc.size // 2
    np.right_shift(u, 16, out=bits)
    np.bitwise_and(bits, 1, out=bits)
    np.add(bits, 0x7FFF, out=bits)
    np.add(bits, u, out=bits)
    o = out.view(np.uint32)
    np.bitwise_and(bits[:half], 0xFFFF0000, out=o)
    np.right_shift(bits[half:], 16, out=bits[half:])
    np.bitwise_or(o, bits[half:], out=o)
