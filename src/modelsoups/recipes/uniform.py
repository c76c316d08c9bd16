"""Uniform and weighted soups of checkpoint files.

Uniform soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, §3):
    θ_soup = 1/N · Σᵢ θᵢ
Weighted soup: θ_soup = Σᵢ wᵢ·θᵢ with user weights (normalised to sum to one by default).
Both stream one tensor at a time (see `stream.average_checkpoints`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..stream import average_checkpoints
from ..types import PathLike, SoupResult

__all__ = ["uniform", "weighted"]


def uniform(inputs: Sequence[PathLike], out: PathLike, **options: Any) -> SoupResult:
    """Write the plain mean of `inputs` to `out` (`soup uniform`).

    Options are those of `average_checkpoints` (dtype, accumulate, max_shard_size, ...).

    Example:
        >>> uniform(["run1.safetensors", "run2.safetensors"], "soup.safetensors")  # doctest: +SKIP
    """
    return average_checkpoints(inputs, out, weights=None, recipe="uniform", **options)


def weighted(
    inputs: Sequence[PathLike], out: PathLike, *, weights: Sequence[float], **options: Any
) -> SoupResult:
    """Write Σ wᵢ·θᵢ to `out` (`soup weighted --weights ...`).

    Example:
        >>> weighted(["a.pt", "b.pt"], "soup.safetensors", weights=[0.7, 0.3])  # doctest: +SKIP
    """
    return average_checkpoints(inputs, out, weights=weights, recipe="weighted", **options)
