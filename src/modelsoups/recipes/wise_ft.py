"""WiSE-FT: robust fine-tuning by weight-space ensembling (Wortsman et al. 2022,
https://arxiv.org/abs/2109.01903), the two-ingredient soup of the model soups paper.

    θ_α = (1 − α)·θ_zero-shot + α·θ_fine-tuned

α = 0 is the zero-shot (pretrained) model, α = 1 the fine-tuned one; the paper recommends
α = 0.5 when there is no held-out data to choose it. `wise_ft_sweep` scores a list of α on
held-out data and returns the best.
"""

from __future__ import annotations

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

__all__ = ["SweepResult", "parse_alphas", "wise_ft", "wise_ft_sweep", "wise_ft_weights"]


def wise_ft(zeroshot: Ingredient, finetuned: Ingredient, *, alpha: float = 0.5) -> StateDict:
    """`(1 − alpha)·zeroshot + alpha·finetuned` of in-memory state dicts or modules,
    accumulated in float64 and rounded once to the inputs' dtype.

    Example:
        >>> model.load_state_dict(wise_ft(zs_sd, ft_sd, alpha=0.5))  # doctest: +SKIP
    """
    return weighted_state_dict(
        [zeroshot, finetuned],  # type: ignore[list-item]
        wise_ft_weights(alpha),
        normalize=False,
        allow_negative=True,
        accumulate="float64",
    )


def wise_ft_sweep(
    zeroshot: Ingredient,
    finetuned: Ingredient,
    evaluator: Evaluator | Callable[[StateDict], object],
    *,
    alphas: Sequence[float] = ZERO_TO_ONE,
    dtype: str | torch.dtype | None = None,
    history: str | os.PathLike[str] | None = None,
    resume: bool = False,
    executor: Any = None,
) -> SweepResult:
    """Score `wise_ft(alpha)` for every alpha on held-out data; keep the best (first on ties).

    Candidates are computed tensor by tensor as the evaluator reads them (see `sweep`):
    with checkpoint paths, the only full state dict is the best one, returned.

    Example:
        >>> r = wise_ft_sweep("zs.safetensors", "ft.safetensors", val_acc)  # doctest: +SKIP
        >>> r.best, r.state_dict  # doctest: +SKIP
    """
    return sweep([zeroshot, finetuned], wise_ft_weights, evaluator, alphas, name="alpha",
                 recipe="wise-ft", dtype=dtype, history=history, resume=resume,
                 executor=executor)  # fmt: skip


def wise_ft_weights(alpha: float) -> list[float]:
    """The weights of [zero-shot, fine-tuned] for `alpha`."""
    return [1.0 - alpha, alpha]


def parse_alphas(text: str) -> list[float]:
    """'0:1:0.1' → [0.0, 0.1, ..., 1.0] (stop included); '0.3,0.5' → [0.3, 0.5]."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = round((stop - start) / step + 1e-9)
            return [round(start + i * step, 10) for i in range(n + 1)]
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SoupError(
            f"cannot read {text!r}; write start:stop:step (0:1:0.1) or 0.3,0.5"
        ) from None
