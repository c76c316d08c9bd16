"""LoRA adapters as ordinary ingredients of any weighted recipe (greedy, learned, sweeps).

Every weighted recipe computes Σ wᵢ·θᵢ. Adapters are made to fit that mould exactly by
writing each one in a shared rank-R space, R = Σ rᵢ over all N adapters:

    Aᵢ' = [A₁; …; A_N]                (the same stacked A for every adapter)
    Bᵢ' = [0 | … | sᵢ·Bᵢ | … | 0]      (its own block, scaled by sᵢ = αᵢ/rᵢ or αᵢ/√rᵢ)

so Bᵢ'·Aᵢ' = sᵢ·Bᵢ·Aᵢ, and for weights summing to one Σ wᵢAᵢ' is the stacked A again while
Σ wᵢBᵢ' = [w₁s₁B₁ | … | w_N s_N B_N]: any weighted mean of these state dicts *is* the
exact adapter soup of `recipes/lora.py` (zero columns where an adapter has weight 0), with
scale 1. `modules_to_save` tensors are averaged as they are. The state dicts are small
(adapters, not models) and share their A tensors.

    space = AdapterSpace(["runs/a", "runs/b", "runs/c"])
    result = greedy_soup(space.state_dicts, evaluator)
    space.save(result.state_dict(), "greedy-adapter")      # a PEFT adapter folder
    space.load_into(peft_model, result.state_dict())        # or evaluate it in place

With `base` (the base model), `space.ingredients` starts with the base itself written in
the same space: Z = (the stacked A, B = 0, the base's own `modules_to_save` tensors M₀), the
adapter whose ΔW is zero. Task arithmetic and WiSE-FT over adapters are then ordinary
weighted means with weights summing to one, and exact: θ₀ + s·Σᵢ ΔWᵢ has weights
(1 − N·s, s, …, s) on (Z, P₁, …, P_N), and its `modules_to_save` tensors come out as
M₀ + s·Σᵢ(Mᵢ − M₀), the task-vector sum. `adapter_ingredients` makes this switch for the
recipes (`greedy_soup`, `sweep`) when they are given adapter folders, and wraps their
evaluators so that candidates are scored as adapters (`candidate.as_adapter`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import check_adapters, open_adapters, soup_config, split_adapter_inputs
from .candidate import as_adapter
from .errors import IncompatibleError, NonFiniteError, SoupError
from .io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .io.writer import atomic_path
from .types import PathLike

if TYPE_CHECKING:
    from torch import nn

    from .evaluate import Evaluator, Score
    from .io.base import Checkpoint
    from .types import StateDict

__all__ = ["AdapterEvaluator", "AdapterSpace", "adapter_ingredients"]


class AdapterSpace:
    """N PEFT LoRA adapters as N state dicts whose weighted means are exact adapter soups.

    Args:
        adapters: PEFT adapter folders of one base model (checked as `soup inspect` does).
        base: the base model (file or folder): adds the zero adapter Z (see the module doc).
        allow_different_base: accept differing `base_model_name_or_path`.
    """

    def __init__(
        self,
        adapters: Sequence[PathLike],
        *,
        base: PathLike | None = None,
        allow_different_base: bool = False,
        unsafe_pickle: bool = False,
    ) -> None:
        from .lora_plan import one_thread

        opened = open_adapters(adapters, unsafe_pickle=unsafe_pickle)
        try:
            check_adapters(opened, allow_different_base=allow_different_base)
            first = opened[0]
            self.paths = [a.path for a in opened]
            self.config = soup_config(first.config, {m: sum(a.modules[m].rank for a in opened)
                                                       for m in first.modules})  # fmt: skip
            with one_thread():  # small tensors (see lora_plan)
                _check_finite(opened)
                self.state_dicts = _spread(opened)
                self.zero = None if base is None else _zero(self.state_dicts[0], first, Path(base))
        finally:
            for a in opened:
                a.close()

    @property
    def ingredients(self) -> list[StateDict]:
        """The state dicts a recipe mixes: the zero adapter first if there is a base."""
        return self.state_dicts if self.zero is None else [self.zero, *self.state_dicts]

    def evaluator(self, inner: Evaluator | None) -> AdapterEvaluator | None:
        """`inner` scoring this space's soups as PEFT adapters (None stays None)."""
        return None if inner is None else AdapterEvaluator(inner, self.config)

    def save(self, state_dict: StateDict, out: PathLike, *, overwrite: bool = False) -> Path:
        """Write a soup of these state dicts as a PEFT adapter folder (atomically)."""
        from safetensors.torch import save_file

        out = Path(out)
        self._check(state_dict)
        with atomic_path(out, folder=True, overwrite=overwrite) as tmp:
            tensors = {k: v.contiguous() for k, v in state_dict.items()}
            meta = {"format": "pt", "recipe": "adapter space",
                    "ingredients": json.dumps([str(p) for p in self.paths])}  # fmt: skip
            save_file(tensors, os.fspath(tmp / ADAPTER_WEIGHTS[0]), metadata=meta)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")
        return out

    def load_into(
        self, model: nn.Module, state_dict: StateDict, *, adapter_name: str = "soup"
    ) -> nn.Module:
        """Load a soup into a `peft.PeftModel` as adapter `adapter_name` (added the first
        time, overwritten in place afterwards) and make it the active one. The base model's
        weights are never written: evaluating a candidate costs the adapter, not a merge."""
        import peft
        import torch

        self._check(state_dict)
        if not isinstance(model, peft.PeftModel):
            raise SoupError(f"load_into needs a peft.PeftModel, got {type(model).__name__}")
        if adapter_name not in model.peft_config:
            keys = set(peft.LoraConfig.__dataclass_fields__)
            config = peft.LoraConfig(**{k: v for k, v in self.config.items() if k in keys})
            model.add_adapter(adapter_name, config)
        with torch.no_grad():
            result = peft.set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
        unexpected = list(getattr(result, "unexpected_keys", []))
        missing = [k for k in getattr(result, "missing_keys", []) if f".{adapter_name}." in k]
        if missing or unexpected:
            raise SoupError(f"soup does not fit the PEFT model: {missing[:2]} {unexpected[:2]}")
        model.set_adapter(adapter_name)
        return model

    def _check(self, state_dict: StateDict) -> None:
        if set(state_dict) != set(self.state_dicts[0]):
            raise SoupError("not a soup of this AdapterSpace's state dicts (keys differ)")


def _spread(opened: Sequence[Any]) -> list[StateDict]:
    """Each adapter's state dict in the shared rank-R space (see the module doc)."""
    import torch

    first = opened[0]
    state_dicts: list[StateDict] = [{} for _ in opened]
    for name, m in first.modules.items():
        As = [a.weights.get(a.modules[name].a_key).float() for a in opened]
        stacked = torch.cat(As, dim=0)
        offset = 0
        for sd, a in zip(state_dicts, opened, strict=True):
            b = a.weights.get(a.modules[name].b_key).float() * a.scale(name)
            wide = b.new_zeros((b.shape[0], stacked.shape[0], *b.shape[2:]))
            wide[:, offset : offset + b.shape[1]] = b
            offset += b.shape[1]
            sd[m.a_key], sd[m.b_key] = stacked, wide
    for key in first.extras.values():
        for sd, a in zip(state_dicts, opened, strict=True):
            sd[key] = a.weights.get(key).clone()
    return state_dicts


def _check_finite(adapters: Sequence[Any]) -> None:
    """A NaN or Inf in any adapter tensor raises, naming the file and the tensor."""
    import torch

    for a in adapters:
        for key in a.weights.infos:
            t = a.weights.get(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"{a.weights.path}: tensor {key!r} holds NaN or Inf")


def _zero(like: StateDict, first: Any, base: Path) -> StateDict:
    """The base model in the space: the stacked A, B = 0, its `modules_to_save` tensors."""
    from .io import open_checkpoint

    zero = {k: (v if ".lora_A" in k else v.new_zeros(v.shape)) for k, v in like.items()}
    if not first.extras:
        return zero
    with open_checkpoint(base) as ckpt:
        for name, key in first.extras.items():
            info = ckpt.infos.get(name)
            if info is None or info.shape != tuple(like[key].shape):
                raise IncompatibleError(
                    f"{base}: has no tensor {name!r} of shape {list(like[key].shape)} (the "
                    f"adapters' modules_to_save); is it the base model of {first.path}?"
                )
            zero[key] = ckpt.get(name).to(like[key].dtype).clone()
    return zero


@dataclass
class AdapterEvaluator:
    """Scores candidates of an `AdapterSpace` as PEFT adapters with the space's config:
    `inner` gets each candidate through `candidate.as_adapter` (an eval command receives an
    adapter folder as `{ckpt}`; a built-in metric loads it into a `PeftModel`)."""

    inner: Evaluator
    config: dict[str, Any]

    def evaluate(self, candidate: Checkpoint, *, name: str) -> Score:
        return self.inner.evaluate(as_adapter(candidate, self.config), name=name)


def adapter_ingredients(
    ingredients: Sequence[object],
    *evaluators: Evaluator | None,
    unsafe_pickle: bool = False,
) -> tuple[Sequence[Any], list[Any]]:
    """Adapter folders (optionally after their base model) as `AdapterSpace` state dicts and
    the evaluators wrapped to score them as adapters; anything else as it is."""
    split = split_adapter_inputs(ingredients)
    if split is None:
        return ingredients, list(evaluators)
    base, adapters = split
    space = AdapterSpace(adapters, base=base, unsafe_pickle=unsafe_pickle)
    return space.ingredients, [space.evaluator(e) for e in evaluators]
