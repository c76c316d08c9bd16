"""WiSE-FT: robust fine-tuning by weight-space ensembling (Wortsman et al. 2022,
https://arxiv.org/abs/2109.01903), the two-ingredient soup of the model soups paper.

    θ_α = (1 − α)·θ_zero-shot + α·θ_fine-tuned

α = 0 is the zero-shot (pretrained) model, α = 1 the fine-tuned one; the paper recommends
α = 0.5 when there is no held-out data to choose it. `wise_ft_sweep` scores a list of α on
held-out data and returns the best.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..average import weighted_state_dict
from ..errors import SoupError
from ..evaluate import Evaluator, Score, as_evaluator
from ..ingredients import Ingredient
from ..io import MemoryCheckpoint
from ..types import StateDict

__all__ = ["SweepResult", "parse_alphas", "wise_ft", "wise_ft_sweep"]

ZERO_TO_ONE = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def wise_ft(zeroshot: Ingredient, finetuned: Ingredient, *, alpha: float = 0.5) -> StateDict:
    """`(1 − alpha)·zeroshot + alpha·finetuned` of in-memory state dicts or modules.

    Example:
        >>> model.load_state_dict(wise_ft(zs_sd, ft_sd, alpha=0.5))  # doctest: +SKIP
    """
    return weighted_state_dict(
        [zeroshot, finetuned],  # type: ignore[list-item]
        [1.0 - alpha, alpha],
        normalize=False,
        allow_negative=True,
    )


@dataclass
class SweepResult:
    """Held-out scores of a sweep over one mixing coefficient, and the best one."""

    values: list[float]
    scores: list[Score]
    best: float
    state_dict: StateDict


def wise_ft_sweep(
    zeroshot: Ingredient,
    finetuned: Ingredient,
    evaluator: Evaluator | Callable[[StateDict], object],
    *,
    alphas: Sequence[float] = ZERO_TO_ONE,
) -> SweepResult:
    """Score `wise_ft(alpha)` for every alpha on held-out data; keep the best (first on ties)."""
    return sweep(lambda a: wise_ft(zeroshot, finetuned, alpha=a), evaluator, alphas, "alpha")


def sweep(
    make: Callable[[float], StateDict],
    evaluator: Evaluator | Callable[[StateDict], object],
    values: Sequence[float],
    what: str,
) -> SweepResult:
    """Evaluate `make(v)` for each v; return the scores and the best state dict."""
    if not values:
        raise SoupError(f"give at least one {what}")
    ev = as_evaluator(evaluator)
    scores: list[Score] = []
    best_i, best_sd = 0, None
    for i, v in enumerate(values):
        sd = make(v)
        candidate = MemoryCheckpoint(sd, f"<state dict {i}>")
        scores.append(ev.evaluate(candidate, name=f"{what}={v:g}"))
        if best_sd is None or scores[i].score > scores[best_i].score:
            best_i, best_sd = i, sd
    assert best_sd is not None
    return SweepResult(list(values), scores, values[best_i], best_sd)


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
