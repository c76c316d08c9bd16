"""Learned soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, §3 and App. I).

Mixing coefficients are learned by gradient descent on held-out data:

    α = softmax(a)                        a ∈ ℝᴺ (global) or ℝᴺˣᴸ (one per layer/tensor)
    θ(a) = Σᵢ αᵢ·θᵢ                      (per tensor, with that tensor's column of α)
    min_a  Σ_batches loss(f(·; θ(a)), batch)     with AdamW, lr 0.05, a few epochs

The model is run with `torch.func.functional_call`, so the mixed weights stay in the
autograd graph; an optional learnable logit temperature helps classifiers (the paper
learns one for CLIP). Memory: ALL N ingredients are held in float32 at once (N × model
size), plus one mixed copy and its gradients — use it for models that fit N times in RAM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..candidate import write_candidate
from ..check import check_compatible, check_non_float
from ..errors import IncompatibleError, SoupError
from ..ingredients import Ingredient, close_all, ingredient_names, open_ingredients
from ..io import MemoryCheckpoint
from ..types import StateDict

__all__ = ["LearnedSoupResult", "learned_soup"]


@dataclass
class LearnedSoupResult:
    state_dict: StateDict
    coefficients: list[float] | dict[str, list[float]]  # global, or per tensor
    temperature: float | None
    losses: list[float] = field(default_factory=list)  # mean held-out loss of each epoch


class _Mixed:
    """Calls `model` with the mixed weights; other attributes come from `model`."""

    def __init__(self, model: nn.Module, params: StateDict, scale: torch.Tensor | None) -> None:
        self._model, self._params, self._scale = model, params, scale

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = functional_call(self._model, self._params, args, kwargs, strict=False)
        if self._scale is not None and isinstance(out, torch.Tensor):
            out = out * self._scale
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _canonical_names(model: nn.Module, keys: Sequence[str]) -> dict[str, str]:
    """Map each state-dict name to the first name of the tensor it shares (tied weights)."""
    named = model.state_dict(keep_vars=True)
    unexpected = [k for k in keys if k not in named]
    missing = [k for k in named if k not in keys]
    if missing or unexpected:
        raise IncompatibleError(
            f"the ingredients do not fit the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}"
        )
    first: dict[int, str] = {}
    return {k: first.setdefault(id(named[k]), k) for k in named}


def learned_soup(
    ingredients: Sequence[Ingredient],
    model: nn.Module,
    loss: Callable[[Any, Any], torch.Tensor],
    data: Iterable[Any],
    *,
    by_layer: bool = False,
    epochs: int = 5,
    lr: float = 0.05,
    temperature: bool = False,
    coefficients_out: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    bn_loader: Iterable[Any] | None = None,
) -> LearnedSoupResult:
    """Learn the soup's mixing coefficients on HELD-OUT `data`.

    Args:
        ingredients: state dicts, modules or checkpoint paths of `model`'s architecture.
        model: the architecture (its own weights are not used); run in eval mode.
        loss: `loss(model, batch) -> scalar tensor`; call `model(x)` inside as usual.
        data: held-out batches, re-iterated every epoch (a list or a DataLoader).
        by_layer: one coefficient per ingredient per tensor instead of per ingredient.
        epochs, lr: AdamW schedule (paper: lr 0.05; `epochs=0` gives the uniform soup).
        temperature: also learn a scale of the model's output logits.
        coefficients_out, output: where to save the coefficients (JSON) and the soup.
        bn_loader: training batches to recalibrate BatchNorm statistics of the result on.

    Example:
        >>> r = learned_soup(sds, TinyNet(), lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        ...                  val_batches)  # doctest: +SKIP
    """
    names = ingredient_names(ingredients)
    ckpts = open_ingredients(ingredients)
    try:
        check_compatible(ckpts)
        check_non_float(ckpts)
        canon = _canonical_names(model, list(ckpts[0].infos))
        infos = ckpts[0].infos
        mixed = [k for k, i in infos.items() if i.is_float and canon[k] == k]
        stacked = {k: torch.stack([c.get(k).to(torch.float32) for c in ckpts]) for k in mixed}
        fixed = {k: ckpts[0].get(k).clone() for k, i in infos.items() if not i.is_float}
    finally:
        close_all(ckpts)
    buffers = {k for k, _ in model.named_buffers()}  # mixed too, but not learned through
    n = len(names)
    a = torch.zeros((n, len(mixed)) if by_layer else (n,), requires_grad=True)
    log_t = torch.zeros((), requires_grad=True) if temperature else None
    opt = torch.optim.AdamW([a] if log_t is None else [a, log_t], lr=lr, weight_decay=0.0)

    def mix() -> StateDict:
        w = torch.softmax(a, dim=0)
        out = {}
        for j, k in enumerate(mixed):
            wk = w.detach() if k in buffers else w
            out[k] = torch.tensordot(wk[:, j] if by_layer else wk, stacked[k], dims=1)
        return {**out, **fixed}

    model.eval()
    losses = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in data:
            opt.zero_grad()
            value = loss(_Mixed(model, mix(), None if log_t is None else log_t.exp()), batch)
            value.backward()
            opt.step()
            total, count = total + float(value.detach()), count + 1
        if count == 0:
            raise SoupError(
                "learned_soup: `data` yielded no batch; pass a list or a DataLoader (a "
                "generator is used up after the first epoch)"
            )
        losses.append(total / count)
    with torch.no_grad():
        final = mix()
        sd = {k: final[canon[k]].to(i.dtype.to_torch()) for k, i in infos.items()}
        w = torch.softmax(a, dim=0)
    if bn_loader is not None:
        from .bn import recalibrate_bn

        model.load_state_dict(sd)
        recalibrate_bn(model, bn_loader)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    coefs: list[float] | dict[str, list[float]] = (
        {k: w[:, j].tolist() for j, k in enumerate(mixed)} if by_layer else w.tolist()
    )
    t = float(log_t.detach().exp()) if log_t is not None else None
    result = LearnedSoupResult(sd, coefs, t, losses)
    if coefficients_out is not None:
        _write_json(Path(coefficients_out), {"ingredients": names, "by_layer": by_layer,
                    "coefficients": coefs, "temperature": t, "losses": losses})  # fmt: skip
    if output is not None:
        meta = {"recipe": "learned", "ingredients": json.dumps(names)}
        write_candidate(MemoryCheckpoint(sd), Path(output), overwrite=overwrite, metadata=meta)
    return result


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
