"""Output ensembles: the baseline soups are compared against (https://arxiv.org/abs/2203.05482,
Table 3 and Appendix: "ensemble" and "greedy ensemble").

An ensemble averages the models' outputs (logits), so it costs N forward passes per input;
a soup costs one. Predictions are computed ONCE per ingredient and split (`predict`), and
every ensemble is then a mean of cached logits — no extra forward passes:

    ensemble(S)(x) = 1/|S| · Σ_{i∈S} fᵢ(x)
    greedy ensemble: Recipe 1 with `mean of logits` in place of `mean of weights`.

Selection uses held-out logits only; apply the selected indices to test logits yourself:
`ensemble_logits([test_logits[i] for i in result.selected])`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..candidate import load_candidate
from ..errors import SoupError
from ..evaluate import acceptance, to_score
from ..ingredients import Ingredient, close_all, open_ingredients

__all__ = ["EnsembleResult", "accuracy", "ensemble_logits", "greedy_ensemble", "predict"]


def ensemble_logits(
    logits: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """The (weighted) mean of per-model logits, each of shape (examples, classes), in
    float32 on `device` (default: the first model's logits' device)."""
    if not logits:
        raise SoupError("an ensemble needs at least one model's logits")
    w = [1.0 / len(logits)] * len(logits) if weights is None else list(weights)
    if len(w) != len(logits):
        raise SoupError(f"got {len(w)} weights for {len(logits)} models")
    dev = torch.device(device) if device is not None else logits[0].device
    out = torch.zeros(logits[0].shape, dtype=torch.float32, device=dev)
    for t, wi in zip(logits, w, strict=True):
        out.add_(t.to(dev, torch.float32), alpha=wi)
    return out


def accuracy(labels: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """A metric for `greedy_ensemble`: top-1 accuracy of logits against `labels`."""
    return lambda logits: float((logits.argmax(-1) == labels).float().mean())


@torch.no_grad()
def predict(
    ingredients: Sequence[Ingredient],
    model_factory: Callable[[], nn.Module],
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
) -> list[torch.Tensor]:
    """Logits of every ingredient on `batches`, computed once each in one reused module.

    `batches` yields inputs (or `(x, y)` tuples: `x` is used); `forward(model, batch)`
    overrides how a batch is run. Iterated once per ingredient (a generator is first
    turned into a list). With `device`, the module runs there; the default `forward`
    moves `x` there, a custom one moves its batch itself. Logits stay on `device`.
    """
    data = list(batches) if isinstance(batches, Iterator) else batches  # generators: once
    dev = torch.device(device) if device is not None else None

    def default(m: nn.Module, b: Any) -> torch.Tensor:
        x = b[0] if isinstance(b, tuple | list) else b
        return m(x.to(dev) if dev is not None else x)

    run = forward or default
    module = model_factory().eval()
    if dev is not None:
        module.to(dev)
    ckpts = open_ingredients(ingredients)
    try:
        out = []
        for c in ckpts:
            load_candidate(module, c)
            out.append(torch.cat([run(module, b).float() for b in data]))
        return out
    finally:
        close_all(ckpts)


@dataclass
class EnsembleResult:
    selected: list[int]  # indices of the ensemble's members, in the order added
    score: float  # held-out score of the ensemble
    scores: list[float]  # held-out score of each model alone
    history: list[dict[str, Any]]


def greedy_ensemble(
    logits: Sequence[torch.Tensor],
    metric: Callable[[torch.Tensor], object],
    *,
    accept: str = "ge",
    tolerance: float = 0.0,
) -> EnsembleResult:
    """Greedy ensemble on cached HELD-OUT logits, scored by `metric(logits)`.

    Example:
        >>> held = predict(sds, TinyNet, val_x)  # doctest: +SKIP
        >>> r = greedy_ensemble(held, accuracy(val_y))  # doctest: +SKIP
        >>> test_logits = ensemble_logits([predict(...)[i] for i in r.selected])  # doctest: +SKIP
    """
    better = acceptance(accept, tolerance)
    scores = [to_score(metric(x), f"model {i}").score for i, x in enumerate(logits)]
    order = sorted(range(len(logits)), key=lambda i: -scores[i])
    if not order:
        raise SoupError("an ensemble needs at least one model's logits")
    selected, best = [order[0]], scores[order[0]]
    total = logits[order[0]].to(torch.float32, copy=True)  # running sum of logits
    history = [{"model_name": order[0], "held_out": best, "accepted": True, "soup_size": 1}]
    for i in order[1:]:
        s = to_score(metric((total + logits[i]) / (len(selected) + 1)), f"ensemble + {i}").score
        ok = better(s, best)
        if ok:
            total += logits[i]
            selected.append(i)
            best = s
        history.append({"model_name": i, "held_out": s, "accepted": ok, "soup_size": len(selected)})
    return EnsembleResult(selected, best, scores, history)
