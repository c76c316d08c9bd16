"""Uniform and weighted soups of checkpoint files.

Uniform soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, §3):
    θ_soup = 1/N · Σᵢ θᵢ
Weighted soup: θ_soup = Σᵢ wᵢ·θᵢ with user weights (normalised to sum to one by default).
Both stream one tensor at a time (see `stream.average_checkpoints`). When every input is a
PEFT LoRA adapter, both are the exact adapter soup of `recipes/lora.py` (`lora_soup`); a base
model followed by adapters of it is a mix of the base and its task vectors (`soup_files`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..adapters import split_adapter_inputs
from ..check import resolve_weights
from ..errors import SoupError
from ..stream import average_checkpoints
from ..types import PathLike, SoupResult

__all__ = ["soup_files", "uniform", "weighted"]


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
    return soup_files(inputs, out, weights=weights, recipe=recipe, **options)


def soup_files(
    inputs: Sequence[PathLike],
    out: PathLike,
    *,
    weights: Sequence[float] | None = None,
    recipe: str = "weighted",
    **options: Any,
) -> SoupResult:
    """Σ wᵢ·θᵢ of checkpoint files into `out`, whatever they are (what every soup command
    writes with): `average_checkpoints` for models; `lora_soup` for PEFT LoRA adapters; for
    a base model followed by adapters of it, the base plus the weighted adapters (their
    task vectors): weights (w₀, w₁, …) with w₀ = 1 − Σ wᵢ≥1 give W₀ + Σ wᵢ·ΔWᵢ exactly."""
    split = split_adapter_inputs(inputs)
    if split is None:
        if options.pop("merge_into", None) is not None:
            raise SoupError("--merge-into applies to PEFT LoRA adapters; these are not adapters")
        return average_checkpoints(inputs, out, weights=weights, recipe=recipe, **options)
    from .lora import lora_soup

    for name in ("key", "non_float"):  # no meaning for adapters
        options.pop(name, None)
    base, adapters = split
    if base is not None:
        w = resolve_weights(weights, len(inputs), normalize=options.pop("normalize", True),
                            allow_negative=bool(options.get("allow_negative")))  # fmt: skip
        if abs(sum(w) - 1.0) > 1e-9:
            raise SoupError(
                f"weights {w} of the base {base} and its adapters sum to {sum(w):g}: a soup "
                "of adapters keeps the base once (weights summing to 1); scale the others"
            )
        weights, options["normalize"], options["base"] = w[1:], False, base
    return lora_soup(adapters, out, weights=weights, recipe=recipe, **options)
