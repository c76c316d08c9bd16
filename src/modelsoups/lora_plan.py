"""What each module of a LoRA soup becomes: `LoraPlan` and `module_factors`.

The per-module step of `recipes/lora.py` (adapter output) and `recipes/lora_merge.py`
(merged output): read the N adapters' factors of one module, and return the soup's
(A, B) with B·A = Σ wᵢsᵢBᵢAᵢ (exact), its truncation to a rank, or the naive factor mean,
recording the relative error of the last two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .dtypes import F32, DType
from .errors import NonFiniteError
from .io.adapter import LoraAdapter
from .lowrank import concat_factors, factor_mean, relative_error, truncate

if TYPE_CHECKING:
    import torch

__all__ = ["AVERAGES", "LoraPlan", "module_factors"]

AVERAGES = ("exact", "factors")


@dataclass
class LoraPlan:
    """What every module of the soup becomes; errors are filled in as modules are computed."""

    adapters: list[LoraAdapter]
    weights: list[float]
    average: str = "exact"
    rank: int | None = None
    accumulate: DType = F32
    dtype: DType | None = None  # output float dtype (None: the inputs')
    allow_nonfinite: bool = False
    errors: dict[str, float] = field(default_factory=dict)
    # rank/factors: every module's (small) factors, computed before the output header is
    # written so that their errors can go into it
    computed: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def out_rank(self, module: str) -> int:
        """The output rank of `module`, known before any factor is read."""
        ms = [a.modules[module] for a in self.adapters]
        if self.average == "factors":
            return max(m.rank for m in ms)
        total = sum(m.rank for m in ms)
        if self.rank is None:
            return total
        d, k = ms[0].b_shape[0], ms[0].a_shape[1]
        return min(self.rank, total, d, k)


def module_factors(plan: LoraPlan, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the soup for `module`, float64, with B·A the soup's ΔW (scale 1)."""
    import torch

    if module in plan.computed:
        return plan.computed.pop(module)
    As = [a.weights.get(a.modules[module].a_key) for a in plan.adapters]
    Bs = [a.weights.get(a.modules[module].b_key) for a in plan.adapters]
    for a, x, y in zip(plan.adapters, As, Bs, strict=True):
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise NonFiniteError(f"{a.weights.path}: module {module!r} holds NaN or Inf")
    coefs = [w * a.scale(module) for w, a in zip(plan.weights, plan.adapters, strict=True)]
    A, B = concat_factors(As, Bs, coefs)
    if plan.average == "factors":
        naive = factor_mean(As, Bs, coefs, plan.weights)
        plan.errors[module] = relative_error((A, B), naive)
        return naive
    if plan.rank is not None:
        A, B, plan.errors[module] = truncate(A, B, plan.rank, name=module)
    return A, B
