"""Uniform and weighted soups of checkpoint files.

Uniform soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, §3):
    θ_soup = 1/N · Σᵢ θᵢ
Weighted soup: θ_soup = Σᵢ wᵢ·θᵢ with user weights (normalised to sum to one by default).
Both stream one tensor at a time (see `stream.average_checkpoints`). When every input is a
PEFT LoRA adapter, both are the exact adapter soup of `recipes/lora.py` (`lora_soup`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..adapters import is_adapter_set
from ..stream import average_checkpoints
from ..types import PathLike, SoupResult

__all__ = ["uniform", "weighted"]


def uniform(inputs: Sequence[PathLike], out: PathLike, **options: Any) -> SoupResult:
    """Write the plain mean of `inputs` to `out` (`soup uniform`).

    Options are those of `average_checkpoints` (dtype, accumulate, max_shard_size, ...),
    or of `lora_soup` (rank, merge_into, ...) when the inputs are LoRA adapters.

    Example:
        >>> uniform(["run1.safetensors", "run2.safetensors"], "soup.safetensors")  # doctest: +SKIP
    """
    return _soup(inputs, out, None, "uniform", options)


def weighted(
    inputs: Sequence[PathLike], out: PathLike, *, weights: Sequence[float], **options: Any
) -> SoupResult:
    """Write Σ wᵢ·θᵢ to `out` (`soup weighted --weights ...`).

    Example:
        >>> weighted(["a.pt", "b.pt"], "soup.safetensors", weights=[0.7, 0.3])  # doctest: +SKIP
    """
    return _soup(inputs, out, weights, "weighted", options)


def _soup(
    inputs: Sequence[PathLike],
    out: PathLike,
    weights: Sequence[float] | None,
    recipe: str,
    options: dict[str, Any],
) -> SoupResult:
    if is_adapter_set(inputs):
        from .lora import lora_soup

        for name in ("key", "non_float"):  # no meaning for adapters
            options.pop(name, None)
        return lora_soup(inputs, out, weights=weights, recipe=recipe, **options)
    return average_checkpoints(inputs, out, weights=weights, recipe=recipe, **options)
