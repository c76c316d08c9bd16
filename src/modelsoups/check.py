"""Checks run before any math: weights, key sets, shapes, dtypes, integer buffers.

Everything here reads headers only, except `check_non_float`, which compares the (small)
integer buffers that are copied rather than averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .errors import IncompatibleError, SoupError
from .io.base import Checkpoint

__all__ = ["check_compatible", "check_non_float", "resolve_weights"]


def resolve_weights(
    weights: Sequence[float] | None,
    n: int,
    *,
    normalize: bool = True,
    allow_negative: bool = False,
) -> list[float]:
    """Validate mixing weights for `n` ingredients; `None` means uniform.

    Normalised to sum to one unless `normalize=False`. Negative weights (task-arithmetic
    style extrapolation) must be asked for with `allow_negative=True`.
    """
    if n < 1:
        raise SoupError("no ingredients: give at least one checkpoint")
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise SoupError(f"got {len(w)} weights for {n} ingredients; give one weight per input")
    if not all(math.isfinite(x) for x in w):
        raise SoupError(f"weights must be finite numbers, got {w}")
    if not allow_negative and any(x < 0 for x in w):
        raise SoupError(f"negative weight in {w}; pass --allow-negative to extrapolate")
    if normalize:
        # scaled by the largest first: 1e308 + 1e308 must not overflow, and 1e-13, 3e-13
        # are fine weights (1/4, 3/4); only a sum that cancels (1, -1) is refused
        top = max(abs(x) for x in w)
        scaled = [x / top for x in w] if top > 0 else w
        total = math.fsum(scaled)
        if top == 0 or abs(total) < 1e-12 * math.fsum(abs(x) for x in scaled):
            raise SoupError(f"weights {w} sum to 0 and cannot be normalised")
        w = [x / total for x in scaled]
    return w


def _listing(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    more = len(keys) - limit
    return shown + (f" (and {more} more)" if more > 0 else "")


def check_compatible(ckpts: Sequence[Checkpoint]) -> None:
    """Raise `IncompatibleError` unless every checkpoint has the first one's keys and shapes,
    and each tensor is floating in all of them or in none."""
    ref = ckpts[0]
    for other in ckpts[1:]:
        missing = [k for k in ref.infos if k not in other.infos]
        extra = [k for k in other.infos if k not in ref.infos]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {_listing(missing)}")
            if extra:
                parts.append(f"extra {_listing(extra)}")
            raise IncompatibleError(
                f"{other.path}: keys differ from {ref.path}: {'; '.join(parts)}"
            )
        bad_shape = [k for k, i in ref.infos.items() if other.infos[k].shape != i.shape]
        if bad_shape:
            k = bad_shape[0]
            raise IncompatibleError(
                f"{other.path}: tensor {k!r} has shape {list(other.infos[k].shape)} but "
                f"{ref.path} has {list(ref.infos[k].shape)}"
                + (f" ({len(bad_shape) - 1} more tensors differ)" if len(bad_shape) > 1 else "")
            )
        for k, i in ref.infos.items():
            if other.infos[k].is_float != i.is_float:
                raise IncompatibleError(
                    f"{other.path}: tensor {k!r} is {other.infos[k].dtype} but {ref.path} has "
                    f"{i.dtype}; a tensor must be floating in every input or in none"
                )


def check_non_float(ckpts: Sequence[Checkpoint], *, non_float: str = "error") -> None:
    """Integer/bool tensors are copied, not averaged, so they must agree across inputs.

    `non_float="first"` skips the check and takes the first input's values.
    """
    if non_float == "first":
        return
    if non_float != "error":
        raise SoupError(f"non_float must be 'error' or 'first', got {non_float!r}")
    ref = ckpts[0]
    for name, info in ref.infos.items():
        if info.is_float:
            continue
        a = ref.array(name)
        for other in ckpts[1:]:
            b = other.array(name)
            if a.shape != b.shape or not np.array_equal(a, b.astype(a.dtype, copy=False)):
                raise IncompatibleError(
                    f"{other.path}: integer tensor {name!r} differs from {ref.path}; integer "
                    "buffers are copied, not averaged (pass --non-float first to take the "
                    "first input's)"
                )
