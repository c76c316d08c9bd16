"""The weighted mean at the heart of every soup, on tensors and on in-memory state dicts.

`weighted_sum` is the kernel shared by the streaming file path (`soup.py`) and the in-memory
API below: it accumulates in float32 (or float64) whatever the input dtype, so bf16/fp16
ingredients lose nothing in the sum, and integer buffers never reach it (they are copied).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .check import check_compatible, check_non_float, resolve_weights
from .errors import NonFiniteError, SoupError
from .io.base import Checkpoint, TensorInfo

if TYPE_CHECKING:
    from torch import nn

    from .types import StateDict

__all__ = [
    "accumulate_dtype",
    "check_finite",
    "load_soup",
    "soup_tensor",
    "uniform_state_dict",
    "weighted_state_dict",
    "weighted_sum",
]


def accumulate_dtype(name: str | torch.dtype) -> torch.dtype:
    """`"float32"` (default everywhere) or `"float64"` as a torch dtype."""
    table = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(name, torch.dtype) and name in table.values():
        return name
    if name not in table:
        raise SoupError(f"accumulate must be 'float32' or 'float64', got {name!r}")
    return table[str(name)]


# Tensors are summed in slices of this many elements: each slice of the accumulator stays in
# cache while the N inputs are added to it, and a bf16/fp16 input is widened one slice at a
# time instead of into a full-size float32 temporary (which torch's type promotion makes).
CHUNK = 1 << 18


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    accumulate: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Return Σ wᵢ·tᵢ, accumulated in `accumulate`, as a new tensor of `out_dtype`.

    `out_dtype` defaults to `accumulate`. Inputs are read once each and never modified.
    Extra memory beyond the result is one slice of `CHUNK` elements, whatever the dtypes.
    """
    out = torch.empty(tensors[0].shape, dtype=out_dtype or accumulate)
    flat_out, flats = out.view(-1), [t.reshape(-1) for t in tensors]
    numel = flat_out.numel()
    direct = out.dtype == accumulate
    scratch = None if direct else torch.empty(min(CHUNK, numel), dtype=accumulate)
    uniform = all(w == weights[0] for w in weights)
    for start in range(0, numel, CHUNK):
        stop = min(start + CHUNK, numel)
        acc = flat_out[start:stop] if scratch is None else scratch[: stop - start]
        acc.copy_(flats[0][start:stop])
        if uniform:  # sum first, scale once
            for t in flats[1:]:
                acc.add_(_addable(t[start:stop], accumulate))
            acc.mul_(weights[0])
        else:
            acc.mul_(weights[0])
            for t, w in zip(flats[1:], weights[1:], strict=True):
                acc.add_(_addable(t[start:stop], accumulate), alpha=w)
        if scratch is not None:
            flat_out[start:stop].copy_(acc)
    return out


def _addable(t: torch.Tensor, accumulate: torch.dtype) -> torch.Tensor:
    """Inputs in another float dtype are widened first (a slice at a time): torch would make
    the same temporary internally, and has no type promotion at all for float8."""
    return t.to(accumulate) if t.is_floating_point() and t.dtype != accumulate else t


def soup_tensor(
    name: str,
    ckpts: Sequence[Checkpoint],
    weights: Sequence[float],
    *,
    accumulate: torch.dtype = torch.float32,
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """One tensor of the soup: the weighted mean of `name` across `ckpts`, in `dtype`
    (default: the first input's); integer tensors are copied from the first input."""
    info = ckpts[0].infos[name]
    if not info.is_float:
        return ckpts[0].get(name)
    out_dtype = dtype or info.dtype
    out = weighted_sum([c.get(name) for c in ckpts], weights, accumulate=accumulate,
                       out_dtype=out_dtype)  # fmt: skip
    if not allow_nonfinite:
        check_finite(name, out, ckpts)
    return out


def _all_finite(t: torch.Tensor) -> bool:
    t = _addable(t, torch.float32) if t.element_size() == 1 else t  # no isfinite for float8
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(name: str, out: torch.Tensor, ckpts: Sequence[Checkpoint]) -> None:
    """Raise `NonFiniteError` if the soup tensor `out` holds a NaN or Inf, naming the input
    that holds one, or else saying that the soup overflows its dtype."""
    if _all_finite(out):
        return
    for c in ckpts:
        if not _all_finite(c.get(name)):
            raise NonFiniteError(
                f"{c.path}: tensor {name!r} contains NaN or Inf; fix the ingredient or pass "
                "--allow-nonfinite"
            )
    raise NonFiniteError(
        f"tensor {name!r}: the soup overflows {out.dtype} (weights too large, or values "
        "beyond the output dtype's range); write a wider --dtype or pass --allow-nonfinite"
    )


class _Memory(Checkpoint):
    def __init__(self, index: int, sd: StateDict) -> None:
        super().__init__(Path(f"<state dict {index}>"), "memory")
        self._sd = sd
        for k, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise SoupError(f"{self.path}: {k!r} is a {type(t).__name__}, not a tensor")
            self.infos[k] = TensorInfo(k, tuple(t.shape), t.dtype, self.path)

    def get(self, name: str) -> torch.Tensor:
        return self._sd[name]


def _as_state_dict(x: StateDict | nn.Module) -> StateDict:
    return x if isinstance(x, dict) else dict(x.state_dict())


def weighted_state_dict(
    state_dicts: Sequence[StateDict | nn.Module],
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
    allow_negative: bool = False,
    accumulate: str | torch.dtype = "float32",
    dtype: torch.dtype | None = None,
    non_float: str = "error",
    allow_nonfinite: bool = False,
) -> StateDict:
    """Weighted mean of in-memory state dicts (or modules), checked like files are.

    Args:
        state_dicts: ingredients; `nn.Module`s are read through `.state_dict()`.
        weights: one per ingredient; `None` is uniform. Normalised unless `normalize=False`.
        accumulate: `"float32"` or `"float64"`. dtype: output float dtype (default: input's).
        non_float: `"error"` if integer buffers differ, or `"first"` to copy the first's.

    Returns:
        A new state dict; tensors that share storage in the first input share it here too.

    Example:
        >>> soup = weighted_state_dict([m1, m2, m3], [0.5, 0.3, 0.2])  # doctest: +SKIP
    """
    ckpts = [_Memory(i, _as_state_dict(s)) for i, s in enumerate(state_dicts)]
    w = resolve_weights(weights, len(ckpts), normalize=normalize, allow_negative=allow_negative)
    check_compatible(ckpts)
    check_non_float(ckpts, non_float=non_float)
    acc_dtype = accumulate_dtype(accumulate)
    out: StateDict = {}
    seen: dict[tuple[object, ...], str] = {}
    for name, info in ckpts[0].infos.items():
        first = ckpts[0].get(name)
        tie = (
            first.untyped_storage().data_ptr(),
            first.storage_offset(),
            tuple(first.shape),
            first.stride(),
        )
        if first.numel() and tie in seen:  # tied weights stay tied
            out[name] = out[seen[tie]]
            continue
        seen[tie] = name
        if not info.is_float:
            out[name] = first.clone()
            continue
        out[name] = soup_tensor(name, ckpts, w, accumulate=acc_dtype, dtype=dtype,
                                allow_nonfinite=allow_nonfinite)  # fmt: skip
    return out


def uniform_state_dict(
    state_dicts: Sequence[StateDict | nn.Module],
    *,
    accumulate: str | torch.dtype = "float32",
    dtype: torch.dtype | None = None,
    non_float: str = "error",
    allow_nonfinite: bool = False,
) -> StateDict:
    """The uniform soup (paper §3): the plain mean of all ingredients.

    Example:
        >>> model.load_state_dict(uniform_state_dict([sd1, sd2, sd3]))  # doctest: +SKIP
    """
    return weighted_state_dict(
        state_dicts,
        None,
        accumulate=accumulate,
        dtype=dtype,
        non_float=non_float,
        allow_nonfinite=allow_nonfinite,
    )


def load_soup(module: nn.Module, state_dict: StateDict, *, strict: bool = True) -> nn.Module:
    """Load a soup into `module` in place and return it.

    BatchNorm running statistics are averaged like any weight and go stale: recalibrate
    them on training data (`recalibrate_bn`) before trusting the soup's accuracy.
    """
    module.load_state_dict(state_dict, strict=strict)
    return module
