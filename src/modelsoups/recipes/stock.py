"""Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522, Eq. 6-7).

Per layer, from the angle θ between the fine-tuned weights' deltas from the pretrained
weights θ₀ (averaged over pairs):

    cos θ = mean_{i<j} cos(θᵢ − θ₀, θⱼ − θ₀)
    t     = k·cos θ / (1 + (k − 1)·cos θ)
    θ     = t·mean(θᵢ) + (1 − t)·θ₀

Few, nearly orthogonal fine-tunes (small cos θ) are pulled towards θ₀; agreeing ones keep
their average (identical ingredients: cos θ = 1, t = 1). Streams one tensor at a time: the
k deltas of one layer are in memory, never a whole model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..candidate import LazyCheckpoint, materialize
from ..check import check_compatible, check_non_float
from ..errors import SoupError
from ..ingredients import Ingredient, close_all, open_ingredients
from ..io.base import Checkpoint
from ..types import StateDict

__all__ = ["model_stock", "stock_checkpoint", "stock_ratio"]


def stock_ratio(deltas: torch.Tensor) -> tuple[float, float]:
    """(cos θ, t) for `deltas` of shape (k, n): the fine-tuned minus the base, one row each."""
    k = deltas.shape[0]
    norms = deltas.norm(dim=1)
    if bool((norms == 0).any()):  # an ingredient equal to the base on this layer
        cos = 1.0 if bool((norms == 0).all()) else 0.0
    else:
        unit = deltas / norms[:, None]
        gram = unit @ unit.T
        cos = float((gram.sum() - gram.diagonal().sum()) / (k * (k - 1)))
    cos = max(min(cos, 1.0), 0.0)  # opposed deltas (cos < 0) fall back to the base: t = 0
    return cos, k * cos / (1 + (k - 1) * cos)


def stock_checkpoint(base: Checkpoint, finetuned: Sequence[Checkpoint]) -> LazyCheckpoint:
    """Model Stock as a lazy checkpoint: each tensor is computed when read.

    The per-layer (cos θ, t) are recorded in `.extra["ratios"]` as they are computed.
    """
    if len(finetuned) < 2:
        raise SoupError("Model Stock needs at least two fine-tuned models (and the base)")
    check_compatible([base, *finetuned])
    check_non_float([base, *finetuned])
    ratios: dict[str, tuple[float, float]] = {}

    def compute(name: str) -> torch.Tensor:
        if not base.infos[name].is_float:
            return base.get(name)
        b = base.get(name).to(torch.float64)
        fts = torch.stack([c.get(name).to(torch.float64).reshape(-1) for c in finetuned])
        deltas = fts - b.reshape(1, -1)
        cos, t = stock_ratio(deltas)
        ratios[name] = (round(cos, 6), round(t, 6))
        return (t * fts.mean(0) + (1 - t) * b.reshape(-1)).reshape(b.shape)

    out = LazyCheckpoint("<model stock>", base.infos, compute)
    out.extra["ratios"] = ratios
    return out


def model_stock(
    base: Ingredient, finetuned: Sequence[Ingredient]
) -> tuple[StateDict, dict[str, tuple[float, float]]]:
    """Model Stock of in-memory state dicts, modules or checkpoint paths.

    Returns the soup and the per-tensor `(cos θ, t)` ratios.

    Example:
        >>> sd, ratios = model_stock(pretrained_sd, [ft1_sd, ft2_sd])  # doctest: +SKIP
    """
    ckpts = open_ingredients([base, *finetuned])
    try:
        lazy = stock_checkpoint(ckpts[0], ckpts[1:])
        sd = materialize(lazy)
    finally:
        close_all(ckpts)
    return sd, dict(lazy.extra["ratios"])
