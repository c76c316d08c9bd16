"""Learned soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, §3 and App. I).

Mixing coefficients are learned by gradient descent on held-out data:

    α = softmax(a)                        a ∈ ℝᴺ (global) or ℝᴺˣᴸ (one per layer/tensor)
    θ(a) = Σᵢ αᵢ·θᵢ                      (per tensor, with that tensor's column of α)
    min_a  Σ_batches loss(f(·; θ(a)), batch)     with AdamW, lr 0.05, a few epochs

The model is run with `torch.func.functional_call`, so the mixed weights stay in the
autograd graph; an optional learnable logit temperature helps classifiers (the paper
learns one for CLIP).

Memory: the N ingredients are held at once on `device`, in `dtype` (float32 by default;
bf16 or fp16 halve it), plus one float32 mixed copy, its gradients and the activations:
(4·N + 8) bytes per parameter in float32, (2·N + 8) in bf16. Each tensor is mixed in
float32 by `_Mix`, which keeps no float32 copy of the ingredients for the backward pass.
`learned_soup` estimates this from the checkpoints' headers before loading anything, and
refuses with one line, saying what would fit, when it cannot fit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from ..io.base import Checkpoint, TensorInfo
from ..io.writer import write_json
from ..types import StateDict

__all__ = ["LearnedSoupResult", "learned_memory", "learned_soup"]


@dataclass
class LearnedSoupResult:
    state_dict: StateDict  # on the CPU, in the ingredients' dtypes
    coefficients: list[float] | dict[str, list[float]]  # global, or per tensor
    temperature: float | None
    losses: list[float] = field(default_factory=list)  # mean held-out loss of each epoch


# Over 60 lines: more than half is the public keyword list and its docstring; the body
# is check, load, train (`_train`), write.
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
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    memory: int | None = None,
) -> LearnedSoupResult:
    """Learn the soup's mixing coefficients on HELD-OUT `data`.

    Args:
        ingredients: state dicts, modules or checkpoint paths of `model`'s architecture.
        model: the architecture (its own weights are not used); run in eval mode.
        loss: `loss(model, batch) -> scalar tensor`; call `model(x)` inside as usual.
        data: held-out batches, re-iterated every epoch (a list or a DataLoader); tensors
            in a batch (also inside tuples, lists and dicts) are moved to `device`.
        by_layer: one coefficient per ingredient per tensor instead of per ingredient.
        epochs, lr: AdamW schedule (paper: lr 0.05; `epochs=0` gives the uniform soup).
        temperature: also learn a scale of the model's output logits.
        coefficients_out, output: where to save the coefficients (JSON) and the soup.
        bn_loader: training batches to recalibrate BatchNorm statistics of the result on.
        device: where the ingredients, the mix and the model run (default: the CPU).
        dtype: how the ingredients are held there (default float32; "bf16"/"fp16" halve
            the memory); each tensor is mixed in float32.
        memory: bytes the job may use on `device` (default: what is available now, from
            /proc/meminfo or `torch.cuda.mem_get_info`). See `learned_memory`.

    Example:
        >>> r = learned_soup(sds, TinyNet(), lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        ...                  val_batches, device="cuda", dtype="bf16")  # doctest: +SKIP
    """
    dev, held = torch.device(device or "cpu"), _held_dtype(dtype)
    names = ingredient_names(ingredients)
    ckpts = open_ingredients(ingredients)
    try:
        check_compatible(ckpts)
        check_non_float(ckpts)
        canon = _canonical_names(model, list(ckpts[0].infos))
        _check_memory(ckpts, canon, model, dev, held, memory)
        stacked, fixed = _load(ckpts, canon, dev, held)
    finally:
        close_all(ckpts)
    infos = ckpts[0].infos
    model.to(dev).eval()
    mixer = _Mixer(stacked, fixed, {k for k, _ in model.named_buffers()}, len(names), by_layer,
                   temperature, dev)  # fmt: skip
    losses = _train(mixer, model, loss, data, epochs, lr, dev)
    with torch.no_grad():
        final = mixer.mix()
        sd = {k: final[canon[k]].to("cpu", i.dtype.to_torch()) for k, i in infos.items()}
    if bn_loader is not None:
        from .bn import recalibrate_bn

        model.load_state_dict(sd)
        recalibrate_bn(model, bn_loader, device=dev)
        sd = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    coefs, t = mixer.coefficients()
    if coefficients_out is not None:
        write_json(Path(coefficients_out), {"ingredients": names, "by_layer": by_layer,
                    "coefficients": coefs, "temperature": t, "losses": losses})  # fmt: skip
    if output is not None:
        meta = {"recipe": "learned", "ingredients": json.dumps(names)}
        write_candidate(MemoryCheckpoint(sd), Path(output), overwrite=overwrite, metadata=meta)
    return LearnedSoupResult(sd, coefs, t, losses)


def _train(
    mixer: _Mixer,
    model: nn.Module,
    loss: Callable[[Any, Any], torch.Tensor],
    data: Iterable[Any],
    epochs: int,
    lr: float,
    device: torch.device,
) -> list[float]:
    """AdamW on the mixing logits (and temperature): the mean loss of each epoch."""
    opt = torch.optim.AdamW(mixer.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in data:
            opt.zero_grad()
            value = loss(_Mixed(model, mixer.mix(), mixer.scale()), _to_device(batch, device))
            value.backward()
            opt.step()
            total, count = total + float(value.detach()), count + 1
        if count == 0:
            raise SoupError(
                "learned_soup: `data` yielded no batch; pass a list or a DataLoader (a "
                "generator is used up after the first epoch)"
            )
        losses.append(total / count)
    return losses


class _Mixer:
    """The learnable soup: logits `a` (and a log-temperature); `mix()` is θ(a)."""

    def __init__(
        self,
        stacked: dict[str, torch.Tensor],
        fixed: StateDict,
        buffers: set[str],
        n: int,
        by_layer: bool,
        temperature: bool,
        device: torch.device,
    ) -> None:
        self.stacked, self.fixed, self.buffers, self.by_layer = stacked, fixed, buffers, by_layer
        shape = (n, len(stacked)) if by_layer else (n,)
        self.logits = torch.zeros(shape, device=device, requires_grad=True)
        self.log_t = torch.zeros((), device=device, requires_grad=True) if temperature else None

    def parameters(self) -> list[torch.Tensor]:
        return [self.logits] if self.log_t is None else [self.logits, self.log_t]

    def mix(self) -> StateDict:
        """Σᵢ softmax(a)ᵢ·θᵢ per tensor (buffers are mixed, but not learned through)."""
        w = torch.softmax(self.logits, dim=0)
        out = {}
        for j, (k, thetas) in enumerate(self.stacked.items()):
            wk = w.detach() if k in self.buffers else w
            out[k] = _Mix.apply(wk[:, j] if self.by_layer else wk, thetas)
        return {**out, **self.fixed}

    def scale(self) -> torch.Tensor | None:
        return None if self.log_t is None else self.log_t.exp()

    def coefficients(self) -> tuple[list[float] | dict[str, list[float]], float | None]:
        with torch.no_grad():
            w = torch.softmax(self.logits, dim=0).to("cpu")
        coefs: list[float] | dict[str, list[float]] = (
            {k: w[:, j].tolist() for j, k in enumerate(self.stacked)} if self.by_layer
            else w.tolist()
        )  # fmt: skip
        t = float(self.log_t.detach().exp()) if self.log_t is not None else None
        return coefs, t


class _Mix(torch.autograd.Function):
    """θ = Σᵢ wᵢ·θᵢ in float32 (the model runs in float32 whatever dtype holds the
    ingredients); the backward needs only ⟨∂L/∂θ, θᵢ⟩, so no float32 copy of the
    ingredients is kept."""

    @staticmethod
    def forward(ctx: Any, weights: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights, thetas)
        acc = torch.zeros(thetas.shape[1:], dtype=torch.float32, device=thetas.device)
        for i in range(thetas.shape[0]):  # widened element by element, no float32 copy
            acc.addcmul_(thetas[i], weights[i].to(torch.float32))
        return acc

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        weights, thetas = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:  # a buffer: mixed, not learned through
            return None, None
        g = grad.to(torch.float32)
        dots = [torch.sum(g * thetas[i].to(torch.float32)) for i in range(thetas.shape[0])]
        return torch.stack(dots).to(weights.dtype), None


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


def learned_memory(
    infos: Mapping[str, TensorInfo], n: int, dtype: torch.dtype, model_bytes: int = 0
) -> int:
    """Bytes a learned soup of `n` ingredients with tensors `infos` (tied weights counted
    once) needs on its device, activations aside: the n ingredients in `dtype`, the float32
    mix and its gradients, two float32 tensors of the largest size (the backward's
    temporaries), and the model's own weights (`model_bytes`, when they are there)."""
    floats = [i.numel for i in infos.values() if i.is_float]
    others = sum(i.nbytes for i in infos.values() if not i.is_float)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_param = n * itemsize + 2 * 4
    return per_param * sum(floats) + 8 * max(floats, default=0) + others + model_bytes


def _check_memory(
    ckpts: Sequence[Checkpoint],
    canon: dict[str, str],
    model: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    memory: int | None,
) -> None:
    """Refuse, before loading, a job that cannot fit `memory` bytes, saying what would."""
    infos = {k: i for k, i in ckpts[0].infos.items() if canon[k] == k}
    on_device = [t for t in [*model.parameters(), *model.buffers()] if t.device == device]
    model_bytes = sum(t.numel() * t.element_size() for t in on_device)
    budget = _available(device) if memory is None else memory
    n = len(ckpts)
    need = learned_memory(infos, n, dtype, model_bytes)
    if need <= budget:
        return
    fits = []
    for held in (torch.float32, torch.bfloat16):
        if (most := _most_ingredients(infos, held, model_bytes, budget)) >= 1:
            fits.append(f"up to {most} ingredients in {_name(held)}")
    what = f"fits: {' or '.join(fits)}" if fits else "not even one ingredient fits"
    raise SoupError(
        f"learned soup of {n} ingredients held in {_name(dtype)} needs ~{_gib(need)} on "
        f"{device} (activations aside), {_gib(budget)} available; {what} (dtype=, device=, "
        "or memory= to set the budget)"
    )


def _most_ingredients(
    infos: Mapping[str, TensorInfo], dtype: torch.dtype, model_bytes: int, budget: int
) -> int:
    n = 0
    while n < 4096 and learned_memory(infos, n + 1, dtype, model_bytes) <= budget:
        n += 1
    return n


def _available(device: torch.device) -> int:
    """Free memory on `device` now: CUDA's free bytes, or MemAvailable for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _load(
    ckpts: Sequence[Checkpoint], canon: dict[str, str], device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], StateDict]:
    """The float tensors of every ingredient stacked on `device` in `dtype` (each copied in
    place: no second copy), and the integer buffers (the first ingredient's)."""
    stacked, fixed = {}, {}
    for k, info in ckpts[0].infos.items():
        if canon[k] != k:
            continue
        if not info.is_float:
            fixed[k] = ckpts[0].get(k).to(device, copy=True)
            continue
        thetas = torch.empty((len(ckpts), *info.shape), dtype=dtype, device=device)
        for i, c in enumerate(ckpts):
            thetas[i].copy_(c.get(k))
        stacked[k] = thetas
    return stacked, fixed


def _held_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """float32 (default), bfloat16 or float16: how the ingredients are held."""
    if dtype is None:
        return torch.float32
    from ..average import output_dtype

    found = output_dtype(dtype)
    assert found is not None
    held = found.to_torch()
    if held not in (torch.float32, torch.bfloat16, torch.float16):
        raise SoupError(f"learned soup holds ingredients in fp32, bf16 or fp16, not {dtype!r}")
    return held


def _to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor in it (also in tuples, lists, dicts) moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(x, device) for x in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


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
