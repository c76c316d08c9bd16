"""What each module of a LoRA soup becomes: `LoraPlan`, `module_factors`, `soup_checkpoint`.

The per-module step of `recipes/lora.py` (adapter output) and `recipes/lora_merge.py`
(merged output): read the N adapters' factors of one module, and return the soup's
(A, B) with B·A = Σ wᵢsᵢBᵢAᵢ (exact), its truncation to a rank, or the naive factor mean,
recording the relative error of the last two. `soup_checkpoint` is the whole adapter soup
as a lazy checkpoint (PEFT keys, computed module by module when read).

The factors are small (r × k, d × r): the arithmetic on them runs on one thread
(`one_thread`). Measured on 8 adapters of a 1B model under load, torch's two intra-op
threads made the ~1800 small operations 20× slower than one thread (each waits for a core).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .average import soup_tensor
from .dtypes import F32, DType, to_numpy
from .errors import IncompatibleError, NonFiniteError
from .io.adapter import PREFIX, LoraAdapter
from .lowrank import concat_factors, factor_mean, relative_error, truncate

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .candidate import LazyCheckpoint
    from .io.base import Checkpoint

__all__ = ["AVERAGES", "LoraPlan", "module_factors", "one_thread", "soup_checkpoint"]

AVERAGES = ("exact", "factors")


@dataclass
class LoraPlan:
    """What every module of the soup becomes; errors are filled in as modules are computed.

    `base` (the base model, a checkpoint) is needed only when the weights do not sum to
    one and the adapters carry `modules_to_save` tensors M: a task-vector sum
    W₀ + Σ wᵢ·ΔWᵢ gives them M₀ + Σ wᵢ(Mᵢ − M₀) = (1 − Σwᵢ)·M₀ + Σ wᵢ·Mᵢ.
    """

    adapters: list[LoraAdapter]
    weights: list[float]
    average: str = "exact"
    rank: int | None = None
    accumulate: DType = F32
    dtype: DType | None = None  # output float dtype (None: the inputs')
    allow_nonfinite: bool = False
    base: Checkpoint | None = None
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

    def saved_tensor(self, key: str, dtype: DType | None) -> np.ndarray:
        """A `modules_to_save` tensor (adapter key `key`) of the soup, in `dtype`."""
        srcs, weights = self.saved_tensor_source(key)
        return soup_tensor(key, srcs, weights, accumulate=self.accumulate, dtype=dtype,
                           allow_nonfinite=self.allow_nonfinite)  # fmt: skip

    def saved_tensor_source(self, key: str) -> tuple[list[Checkpoint], list[float]]:
        """What the `modules_to_save` tensor `key` is the weighted sum of: the adapters',
        and the base's when the weights do not sum to one (raises if it is missing)."""
        srcs: list[Checkpoint] = [a.weights for a in self.adapters]
        rest = 1.0 - sum(self.weights)
        if abs(rest) <= 1e-9:
            return srcs, list(self.weights)
        return [self._base_view(key), *srcs], [rest, *self.weights]

    def _base_view(self, key: str) -> Checkpoint:
        """The base's tensor for adapter key `key`, under that key."""
        from .candidate import LazyCheckpoint

        name, first = key.removeprefix(PREFIX), self.adapters[0]
        if self.base is None:
            raise IncompatibleError(
                f"{first.path}: weights sum to {sum(self.weights):g}, not 1, and the adapters "
                f"save {name!r} whole (modules_to_save): a task-vector sum M₀ + Σwᵢ(Mᵢ − M₀) "
                "needs the base model's value; pass the base (--merge-into BASE) or weights "
                "summing to 1"
            )
        info, base = self.base.infos.get(name), self.base
        if info is None or info.shape != first.weights.infos[key].shape:
            raise IncompatibleError(
                f"{base.path}: has no tensor {name!r} of shape "
                f"{list(first.weights.infos[key].shape)} (the adapters' modules_to_save)"
            )
        infos = {key: replace(info, name=key)}
        return LazyCheckpoint(str(base.path), infos, lambda _: base.get(name),
                              compute_array=lambda _: base.array(name))  # fmt: skip


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block (small tensors: see the module doc)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def module_factors(plan: LoraPlan, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the soup for `module`, float64, with B·A the soup's ΔW (scale 1)."""
    import torch

    if module in plan.computed:
        return plan.computed.pop(module)
    with one_thread():
        As = [a.weights.get(a.modules[module].a_key) for a in plan.adapters]
        Bs = [a.weights.get(a.modules[module].b_key) for a in plan.adapters]
        coefs = [w * a.scale(module) for w, a in zip(plan.weights, plan.adapters, strict=True)]
        A, B = concat_factors(As, Bs, coefs)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            bad = next(a for a, x, y in zip(plan.adapters, As, Bs, strict=True)
                       if not (torch.isfinite(x).all() and torch.isfinite(y).all()))  # fmt: skip
            raise NonFiniteError(f"{bad.weights.path}: module {module!r} holds NaN or Inf")
        if plan.average == "factors":
            naive = factor_mean(As, Bs, coefs, plan.weights)
            plan.errors[module] = relative_error((A, B), naive)
            return naive
        if plan.rank is not None:
            A, B, plan.errors[module] = truncate(A, B, plan.rank, name=module)
        return A, B


def soup_checkpoint(plan: LoraPlan, label: str = "<adapter soup>") -> LazyCheckpoint:
    """The adapter soup as a lazy checkpoint with PEFT keys (lora_A/B of rank
    `plan.out_rank`, then the `modules_to_save` tensors), in `plan.dtype` (default: the
    first adapter's); each module's factors are computed once, when its A or B is read."""
    from .candidate import LazyCheckpoint

    first, dtype = plan.adapters[0], plan.dtype
    infos, owner = {}, {}
    for name, m in first.modules.items():
        r = plan.out_rank(name)
        shapes = {m.a_key: (r, *m.a_shape[1:]), m.b_key: (m.b_shape[0], r, *m.b_shape[2:])}
        for key, shape in shapes.items():
            info = first.weights.infos[key]
            infos[key], owner[key] = replace(info, shape=shape, dtype=dtype or info.dtype), name
    for key in first.extras.values():
        info = first.weights.infos[key]
        infos[key] = replace(info, dtype=dtype) if dtype and info.is_float else info
    last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def compute_array(key: str) -> np.ndarray:
        if key not in owner:
            return plan.saved_tensor(key, infos[key].dtype)
        module = owner[key]
        if module not in last:
            last.clear()
            last[module] = module_factors(plan, module)
        A, B = last[module]
        x = A if key == first.modules[module].a_key else B
        with one_thread():
            return to_numpy(x.to(infos[key].dtype.to_torch()).contiguous())

    def compute(key: str) -> torch.Tensor:
        from .dtypes import to_torch

        return to_torch(compute_array(key), infos[key].dtype)

    return LazyCheckpoint(label, infos, compute, compute_array=compute_array)
