"""The weighted mean at the heart of every soup, on arrays and on in-memory state dicts.

`weighted_sum_arrays` is the one kernel, shared by the streaming file path (`stream.py`)
and the in-memory torch API below (`weighted_sum`, `weighted_state_dict`, which view their
tensors as numpy arrays and their results as tensors, without copies). It is numpy, so
that a soup of safetensors files never imports torch: it accumulates in float32 (or
float64) whatever the input dtype, so bf16/fp16 ingredients lose nothing in the sum, and
integer buffers never reach it (they are copied). bf16 is widened and rounded here, on its
bits: exactly what torch does (round to nearest, ties to even). float8 goes through torch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .check import check_compatible, check_non_float, resolve_weights
from .dtypes import BF16, F32, F64, DType, as_dtype, to_numpy, to_torch
from .errors import NonFiniteError, SoupError
from .io.base import Checkpoint
from .io.memory import MemoryCheckpoint

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .types import StateDict

__all__ = [
    "accumulate_dtype",
    "check_finite",
    "load_soup",
    "narrow",
    "output_dtype",
    "result_array",
    "soup_tensor",
    "uniform_state_dict",
    "weighted_state_dict",
    "weighted_sum",
    "weighted_sum_arrays",
    "widen",
    "widen_buffer",
]


def accumulate_dtype(name: str | DType | torch.dtype) -> DType:
    """`"float32"` (default everywhere) or `"float64"` (or those torch dtypes) as a `DType`."""
    try:
        dtype = as_dtype(name)
    except ValueError:
        dtype = None
    if dtype is None or dtype not in (F32, F64):
        raise SoupError(f"accumulate must be 'float32' or 'float64', got {name!r}")
    return dtype


def output_dtype(dtype: str | DType | torch.dtype | None) -> DType | None:
    """The output dtype of floating tensors (`None`: each input's own) as a `DType`."""
    if dtype is None:
        return None
    try:
        found = as_dtype(dtype)
    except ValueError:
        found = None
    if found is None or not found.is_float:
        raise SoupError(f"unknown output dtype {dtype!r}; use one of fp32, fp16, bf16, fp64")
    return found


# Arrays are summed in slices of this many elements: each slice of the accumulator stays in
# cache while the N inputs are added to it, and a bf16/fp16 input is widened one slice at a
# time instead of into a full-size float32 temporary.
CHUNK = 1 << 18


class _Scratch:
    """One thread's buffers of one slice, allocated once and reused by every call on that
    thread (fresh pages cost a fault and a zeroing each time): `acc`/`tmp` per accumulator
    dtype, `wide` (float32: a widened bf16/float8 slice), `bits` (uint32: bf16 rounding)."""

    def __init__(self) -> None:
        self.wide = np.empty(CHUNK, np.float32)
        self.bits = np.empty(CHUNK, np.uint32)
        self._acc: dict[str, np.ndarray] = {}
        self._tmp: dict[str, np.ndarray] = {}

    def acc(self, dtype: DType) -> np.ndarray:
        return self._acc.setdefault(dtype.name, np.empty(CHUNK, dtype.numpy))

    def tmp(self, dtype: DType) -> np.ndarray:
        return self._tmp.setdefault(dtype.name, np.empty(CHUNK, dtype.numpy))


_LOCAL = threading.local()


def _scratch() -> _Scratch:
    s: _Scratch | None = getattr(_LOCAL, "scratch", None)
    if s is None:
        s = _LOCAL.scratch = _Scratch()
    return s


def widen_buffer() -> np.ndarray:
    """This thread's float32 buffer of `CHUNK` elements for `widen`."""
    return _scratch().wide


def result_array(shape: tuple[int, ...], dtype: DType, buffer: np.ndarray | None) -> np.ndarray:
    """An array of `shape` holding `dtype`: new, or the start of the caller's byte `buffer`."""
    if buffer is None:
        return np.empty(shape, dtype=dtype.numpy)
    size = math.prod(shape) * dtype.itemsize
    return buffer.reshape(-1).view(np.uint8)[:size].view(dtype.numpy).reshape(shape)


def weighted_sum_arrays(
    arrays: Sequence[np.ndarray],
    dtypes: Sequence[DType],
    weights: Sequence[float],
    *,
    accumulate: DType = F32,
    out_dtype: DType | None = None,
    buffer: np.ndarray | None = None,
) -> tuple[np.ndarray, bool]:
    """Return Σ wᵢ·aᵢ, accumulated in `accumulate`, as a new array of `out_dtype`, and
    whether it is all finite.

    Arrays hold `dtypes[i]` in its storage type (`DType.storage`: bf16 as uint16 bits);
    the result holds `out_dtype` (default `accumulate`) the same way, in a new array or in
    the start of `buffer` (bytes, reused by the caller). Inputs are read once each and never
    modified. Extra memory beyond the result is a few slices of `CHUNK`.
    """
    out_dtype = out_dtype or accumulate
    out = result_array(arrays[0].shape, out_dtype, buffer)
    flat_out, flats = out.reshape(-1), [a.reshape(-1) for a in arrays]
    numel = flat_out.size
    s = _scratch()
    acc_buf = None if out_dtype == accumulate else s.acc(accumulate)
    uniform = all(w == weights[0] for w in weights)
    # w₀·a₀ + w·Σ aᵢ (Model Stock, task arithmetic, WiSE-FT): sum the rest first, scale once
    rest_uniform = not uniform and all(w == weights[-1] for w in weights[1:])
    acc_np, finite, acc_f32 = accumulate.numpy, True, accumulate == F32
    with np.errstate(all="ignore"):  # overflow gives inf, as in torch; checked below
        for start in range(0, numel, CHUNK):
            stop = min(start + CHUNK, numel)
            m = stop - start
            acc = flat_out[start:stop] if acc_buf is None else acc_buf[:m]
            first = 1 if rest_uniform else 0
            x = widen(flats[first][start:stop], dtypes[first], acc if acc_f32 else s.wide)
            if dtypes[first].native or not acc_f32:  # else bf16 was widened into acc itself
                np.copyto(acc, x, casting="unsafe")
            if uniform:  # sum first, scale once
                for a, d in zip(flats[1:], dtypes[1:], strict=True):
                    np.add(acc, widen(a[start:stop], d, s.wide), out=acc, dtype=acc_np)
                np.multiply(acc, weights[0], out=acc, dtype=acc_np)
            elif rest_uniform:  # w·(a₁ + … + aₙ), then + w₀·a₀
                for a, d in zip(flats[2:], dtypes[2:], strict=True):
                    np.add(acc, widen(a[start:stop], d, s.wide), out=acc, dtype=acc_np)
                np.multiply(acc, weights[-1], out=acc, dtype=acc_np)
                tmp = s.tmp(accumulate)[:m]
                np.multiply(widen(flats[0][start:stop], dtypes[0], s.wide), weights[0], out=tmp,
                            dtype=acc_np)  # fmt: skip
                np.add(acc, tmp, out=acc, dtype=acc_np)
            else:
                np.multiply(acc, weights[0], out=acc, dtype=acc_np)
                for a, d, w in zip(flats[1:], dtypes[1:], weights[1:], strict=True):
                    tmp = s.tmp(accumulate)[:m]
                    np.multiply(widen(a[start:stop], d, s.wide), w, out=tmp, dtype=acc_np)
                    np.add(acc, tmp, out=acc, dtype=acc_np)
            if acc_buf is not None:
                narrow(acc, flat_out[start:stop], out_dtype, s)
            finite = finite and _chunk_finite(flat_out[start:stop], out_dtype, s)
    return out, finite


def widen(x: np.ndarray, dtype: DType, buffer: np.ndarray) -> np.ndarray:
    """A float view of the 1-d slice `x`: itself if numpy computes in its dtype, else
    widened to float32 in `buffer` (float32, at least as long; bf16: its 16 bits are the
    top half of a float32's)."""
    if dtype.native:
        return x
    wide = buffer[: x.size]
    if dtype == BF16:
        np.left_shift(x, 16, out=wide.view(np.uint32), dtype=np.uint32)
    else:  # float8: rare enough to go through torch
        import torch

        t = torch.from_numpy(x).view(dtype.to_torch())
        np.copyto(wide, t.to(torch.float32).numpy())
    return wide


def narrow(acc: np.ndarray, out: np.ndarray, dtype: DType, s: _Scratch | None = None) -> None:
    """Round the accumulated slice `acc` (at most `CHUNK` elements) into `out`, of `dtype`,
    as torch's `.to` does."""
    s = s or _scratch()
    if dtype.itemsize >= 4:
        np.copyto(out, acc, casting="unsafe")  # round to nearest even; overflow gives inf
        return
    f32 = acc if acc.dtype == np.float32 else s.wide[: acc.size]
    if f32 is not acc:  # float64 -> float32 first, as torch does for 16- and 8-bit floats
        np.copyto(f32, acc, casting="unsafe")
    if dtype.native:
        np.copyto(out, f32, casting="unsafe")
        return
    if dtype == BF16:  # round to nearest, ties to even, on the bits (c10's BFloat16)
        u, b = f32.view(np.uint32), s.bits[: acc.size]
        np.right_shift(u, 16, out=b)
        np.bitwise_and(b, 1, out=b)
        np.add(b, 0x7FFF, out=b)
        np.add(b, u, out=b)
        np.right_shift(b, 16, out=b)
        np.copyto(out, b, casting="unsafe")
        nan = np.isnan(f32)
        if nan.any():  # the rounding would carry a NaN's payload into the exponent
            out[nan] = 0x7FC0
    else:
        import torch

        t = torch.from_numpy(f32).to(dtype.to_torch())
        np.copyto(out, t.view(torch.uint8).numpy())


def _chunk_finite(x: np.ndarray, dtype: DType, s: _Scratch) -> bool:
    """True if slice `x` (of `dtype`, at most `CHUNK` elements) holds no NaN or Inf."""
    if not x.size:
        return True
    if dtype == BF16:  # exponent bits all ones
        low = s.bits[: x.size]
        np.bitwise_and(x, 0x7FFF, out=low, dtype=np.uint32)
        return bool(low.max() < 0x7F80)
    x = widen(x, dtype, s.wide)
    with np.errstate(all="ignore"):  # the sum may overflow although every term is finite
        total = np.add.reduce(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)
        return bool(np.isfinite(total)) or bool(np.isfinite(x).all())


def all_finite(x: np.ndarray, dtype: DType) -> bool:
    """True if array `x` (of `dtype`, in its storage type) holds no NaN or Inf."""
    flat = x.reshape(-1)
    s = _scratch()
    return all(_chunk_finite(flat[i : i + CHUNK], dtype, s) for i in range(0, flat.size, CHUNK))


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    accumulate: str | torch.dtype = "float32",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Return Σ wᵢ·tᵢ, accumulated in `accumulate`, as a new tensor of `out_dtype`.

    `out_dtype` defaults to `accumulate`. Inputs are read once each and never modified.
    Extra memory beyond the result is a few slices of `CHUNK` elements, whatever the dtypes.

    Example:
        >>> weighted_sum([sd1["w"], sd2["w"]], [0.5, 0.5])  # doctest: +SKIP
    """
    acc = accumulate_dtype(accumulate)
    out = as_dtype(out_dtype) if out_dtype is not None else acc
    dtypes = [as_dtype(t.dtype) for t in tensors]
    result, _ = weighted_sum_arrays([to_numpy(t) for t in tensors], dtypes, weights,
                                    accumulate=acc, out_dtype=out)  # fmt: skip
    return to_torch(result, out)


def soup_tensor(
    name: str,
    ckpts: Sequence[Checkpoint],
    weights: Sequence[float],
    *,
    accumulate: DType = F32,
    dtype: DType | None = None,
    allow_nonfinite: bool = False,
    buffer: np.ndarray | None = None,
    suggest_allow: bool = True,
) -> np.ndarray:
    """One tensor of the soup: the weighted mean of `name` across `ckpts`, in `dtype`
    (default: the first input's), as an array in its storage type (in `buffer` if given);
    integer tensors are the first input's (a view). A NaN or Inf in the result raises
    `NonFiniteError` (see `check_finite`) unless `allow_nonfinite`."""
    info = ckpts[0].infos[name]
    if not info.is_float:
        return ckpts[0].array(name)
    out, finite = weighted_sum_arrays(
        [c.array(name) for c in ckpts],
        [c.infos[name].dtype for c in ckpts],
        weights,
        accumulate=accumulate,
        out_dtype=dtype or info.dtype,
        buffer=buffer,
    )
    if not finite and not allow_nonfinite:
        check_finite(name, dtype or info.dtype, ckpts, suggest_allow=suggest_allow)
    return out


def check_finite(
    name: str, dtype: DType, ckpts: Sequence[Checkpoint], *, suggest_allow: bool = True
) -> None:
    """Raise `NonFiniteError` for a soup tensor `name` of `dtype` that holds a NaN or Inf,
    naming the input that holds one, or else saying that the soup overflows its dtype.
    `suggest_allow`: the message mentions `--allow-nonfinite` (recipes that have it)."""
    allow = " or pass --allow-nonfinite" if suggest_allow else ""
    for c in ckpts:
        if not all_finite(c.array(name), c.infos[name].dtype):
            raise NonFiniteError(
                f"{c.path}: tensor {name!r} contains NaN or Inf; fix the ingredient{allow}"
            )
    raise NonFiniteError(
        f"tensor {name!r}: the soup overflows {dtype} (weights too large, or values "
        f"beyond the output dtype's range); write a wider --dtype{allow}"
    )


def weighted_state_dict(
    state_dicts: Sequence[StateDict | nn.Module | Checkpoint],
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
    allow_negative: bool = False,
    accumulate: str | torch.dtype = "float32",
    dtype: str | torch.dtype | None = None,
    non_float: str = "error",
    allow_nonfinite: bool = False,
) -> StateDict:
    """Weighted mean of in-memory state dicts (or modules), checked like files are.

    Args:
        state_dicts: ingredients; `nn.Module`s are read through `.state_dict()`, lazy
            `Checkpoint`s (e.g. `AdapterSpace.state_dicts`) one tensor at a time.
        weights: one per ingredient; `None` is uniform. Normalised unless `normalize=False`.
        accumulate: `"float32"` or `"float64"`. dtype: output float dtype (default: input's).
        non_float: `"error"` if integer buffers differ, or `"first"` to copy the first's.

    Returns:
        A new state dict; tensors that share storage in the first input share it here too.

    Example:
        >>> soup = weighted_state_dict([m1, m2, m3], [0.5, 0.3, 0.2])  # doctest: +SKIP
    """
    ckpts = [s if isinstance(s, Checkpoint) else MemoryCheckpoint(s, f"<state dict {i}>")
             for i, s in enumerate(state_dicts)]  # fmt: skip
    w = resolve_weights(weights, len(ckpts), normalize=normalize, allow_negative=allow_negative)
    check_compatible(ckpts)
    check_non_float(ckpts, non_float=non_float)
    acc_dtype, out_dtype = accumulate_dtype(accumulate), output_dtype(dtype)
    out: StateDict = {}
    seen: dict[tuple[object, ...], str] = {}
    for name, info in ckpts[0].infos.items():
        first = ckpts[0].get(name)
        storage = first.untyped_storage().data_ptr()
        tie = (storage, first.storage_offset(), tuple(first.shape), first.stride())
        # tied weights stay tied (a lazy checkpoint's tensors are new: addresses mean nothing)
        if first.numel() and tie in seen and isinstance(ckpts[0], MemoryCheckpoint):
            out[name] = out[seen[tie]]
            continue
        seen[tie] = name
        if not info.is_float:
            out[name] = first.clone()
            continue
        soup = soup_tensor(name, ckpts, w, accumulate=acc_dtype, dtype=out_dtype,
                           allow_nonfinite=allow_nonfinite)  # fmt: skip
        out[name] = to_torch(soup, out_dtype or info.dtype)
    return out


def uniform_state_dict(
    state_dicts: Sequence[StateDict | nn.Module],
    *,
    accumulate: str | torch.dtype = "float32",
    dtype: str | torch.dtype | None = None,
    non_float: str = "error",
    allow_nonfinite: bool = False,
) -> StateDict:
    """The uniform soup (paper §3): the plain mean of all ingredients.

    Example:
        >>> model.load_state_dict(uniform_state_dict([sd1, sd2, sd3]))  # doctest: +SKIP
    """
    return weighted_state_dict(state_dicts, None, accumulate=accumulate, dtype=dtype,
                               non_float=non_float, allow_nonfinite=allow_nonfinite)  # fmt: skip


def load_soup(module: nn.Module, state_dict: StateDict, *, strict: bool = True) -> nn.Module:
    """Load a soup into `module` in place and return it.

    BatchNorm running statistics are averaged like any weight and go stale: recalibrate
    them on training data (`recalibrate_bn`) before trusting the soup's accuracy.
    """
    module.load_state_dict(state_dict, strict=strict)
    return module
