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
    "cast_checked",
    "check_finite",
    "load_soup",
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


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    accumulate: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return Σ wᵢ·tᵢ as a new tensor of dtype `accumulate`.

    Inputs are read once each and never modified; mixed input dtypes are upcast on the fly
    by the in-place add (no per-input temporary copy).
    """
    acc = torch.empty(tensors[0].shape, dtype=accumulate)
    acc.copy_(tensors[0])
    if all(w == weights[0] for w in weights):  # uniform: sum first, scale once
        for t in tensors[1:]:
            acc.add_(_addable(t, accumulate))
        acc.mul_(weights[0])
    else:
        acc.mul_(weights[0])
        for t, w in zip(tensors[1:], weights[1:], strict=True):
            acc.add_(_addable(t, accumulate), alpha=w)
    return acc


def _addable(t: torch.Tensor, accumulate: torch.dtype) -> torch.Tensor:
    """torch has no type promotion for float8: widen those inputs first (one temporary)."""
    return t.to(accumulate) if t.is_floating_point() and t.element_size() == 1 else t


def cast_checked(
    name: str, acc: torch.Tensor, dtype: torch.dtype, *, allow_nonfinite: bool = False
) -> torch.Tensor:
    """`acc` in the output `dtype`; a cast that overflows to Inf/NaN is a `NonFiniteError`
    (a finite float32 soup written as fp16 can hold values above 65504)."""
    out = acc.to(dtype)
    if allow_nonfinite or out is acc or not acc.is_floating_point():
        return out
    wide = _addable(out, torch.float32)
    if bool(torch.isfinite(wide.sum())) or bool(torch.isfinite(wide).all()):
        return out
    raise NonFiniteError(
        f"tensor {name!r}: the soup overflows {dtype} (largest magnitude "
        f"{acc.abs().max().item():.4g}); write a wider --dtype or pass --allow-nonfinite"
    )


def check_finite(name: str, acc: torch.Tensor, ckpts: Sequence[Checkpoint]) -> None:
    """Raise `NonFiniteError` naming the first input (and tensor) holding a NaN or Inf."""
    if bool(torch.isfinite(acc.sum())) or bool(torch.isfinite(acc).all()):
        return
    for c in ckpts:
        if not bool(torch.isfinite(_addable(c.get(name), torch.float32)).all()):
            raise NonFiniteError(
                f"{c.path}: tensor {name!r} contains NaN or Inf; fix the ingredient or pass "
                "--allow-nonfinite"
            )
    raise NonFiniteError(f"tensor {name!r}: the weighted sum overflows (weights too large?)")


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
        acc = weighted_sum([c.get(name) for c in ckpts], w, accumulate=acc_dtype)
        if not allow_nonfinite:
            check_finite(name, acc, ckpts)
        out[name] = cast_checked(name, acc, dtype or info.dtype, allow_nonfinite=allow_nonfinite)
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
