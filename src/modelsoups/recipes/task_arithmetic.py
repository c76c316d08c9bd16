"""Task arithmetic (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089).

    τᵢ = θᵢ − θ₀                     (task vectors: what fine-tuning changed)
    θ  = θ₀ + λ·Σᵢ τᵢ

λ = 1/N is the uniform soup; λ > 1/N extrapolates along the sum of task vectors, λ < 0
subtracts them ("forgetting"). Computed as one weighted sum,
θ = (1 − Nλ)·θ₀ + λ·Σᵢ θᵢ, accumulated in float64 so that the small deltas survive the
cancellation.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..average import weighted_state_dict
from ..errors import SoupError
from ..evaluate import Evaluator
from ..ingredients import Ingredient
from ..types import StateDict
from .sweep import ZERO_TO_ONE, SweepResult, sweep

if TYPE_CHECKING:
    import torch

__all__ = ["task_arithmetic", "task_arithmetic_sweep", "task_arithmetic_weights"]


def task_arithmetic_weights(n: int, scale: float) -> list[float]:
    """Weights of [θ₀, θ₁, ..., θₙ] in the weighted sum equal to θ₀ + scale·Σ(θᵢ − θ₀)."""
    if n < 1:
        raise SoupError("task arithmetic needs at least one fine-tuned model besides the base")
    return [1.0 - n * scale] + [scale] * n


def task_arithmetic(
    base: Ingredient, finetuned: Sequence[Ingredient], *, scale: float = 1.0
) -> StateDict:
    """θ₀ + scale·Σᵢ(θᵢ − θ₀) of in-memory state dicts or modules.

    Example:
        >>> sd = task_arithmetic(pretrained_sd, [task_a_sd, task_b_sd], scale=0.4)  # doctest: +SKIP
    """
    return weighted_state_dict(
        [base, *finetuned],  # type: ignore[list-item]
        task_arithmetic_weights(len(finetuned), scale),
        normalize=False,
        allow_negative=True,
        accumulate="float64",
    )


def task_arithmetic_sweep(
    base: Ingredient,
    finetuned: Sequence[Ingredient],
    evaluator: Evaluator | Callable[[StateDict], object],
    *,
    scales: Sequence[float] = ZERO_TO_ONE,
    dtype: str | torch.dtype | None = None,
    history: str | os.PathLike[str] | None = None,
    resume: bool = False,
    executor: Any = None,
    allow_different_base: bool = False,
) -> SweepResult:
    """Score every `scale` on held-out data and keep the best (first on ties).

    Candidates are computed tensor by tensor as the evaluator reads them (see `sweep`).
    """
    weights_of = functools.partial(task_arithmetic_weights, len(finetuned))
    return sweep([base, *finetuned], weights_of, evaluator, scales, name="scale",
                 recipe="task-arithmetic", dtype=dtype, history=history, resume=resume,
                 executor=executor, allow_different_base=allow_different_base)  # fmt: skip
