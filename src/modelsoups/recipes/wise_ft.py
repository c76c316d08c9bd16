"""WiSE-FT: robust fine-tuning by weight-space ensembling (Wortsman et al. 2022,
https://arxiv.org/abs/2109.01903), the two-ingredient soup of the model soups paper.

    θ_α = (1 − α)·θ_zero-shot + α·θ_fine-tuned

α = 0 is the zero-shot (pretrained) model, α = 1 the fine-tuned one; the paper recommends
α = 0.5 when there is no held-out data to choose it. `wise_ft_sweep` scores a list of α on
held-out data and returns the best.
"""

from __future__ import annotations

import math
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
    allow_different_base: bool = False,
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
                 executor=executor, allow_different_base=allow_different_base)  # fmt: skip


def wise_ft_weights(alpha: float) -> list[float]:
    """The weights of [zero-shot, fine-tuned] for `alpha`."""
    return [1.0 - alpha, alpha]


MAX_SWEEP = 1000  # values in one sweep: each is a full evaluation


def parse_alphas(text: str) -> list[float]:
    """'0:1:0.1' → [0.0, 0.1, ..., 1.0] (stop included); '0.3,0.5' → [0.3, 0.5].

    Every value must be finite, and a sweep holds 1 to MAX_SWEEP values.
    """
    how = "write start:stop:step (0:1:0.1) or 0.3,0.5"
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not all(map(math.isfinite, (start, stop, step))) or step <= 0 or stop < start:
                raise ValueError
            n = (stop - start) / step + 1e-9
            if n >= MAX_SWEEP:
                raise SoupError(f"sweep {text[:60]!r} has {n + 1:.3g} values, more than "
                                f"{MAX_SWEEP}; use a larger step")  # fmt: skip
            values = [round(start + i * step, 10) for i in range(round(n) + 1)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SoupError(f"cannot read sweep {text[:60]!r}; {how}") from None
    if not values or not all(map(math.isfinite, values)):
        raise SoupError(f"sweep {text[:60]!r} needs finite values; {how}")
    if len(values) > MAX_SWEEP:
        raise SoupError(f"sweep {text[:60]!r} has {len(values)} values, more than {MAX_SWEEP}")
    return values
