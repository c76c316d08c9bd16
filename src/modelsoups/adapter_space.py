"""LoRA adapters as ordinary ingredients of any weighted recipe (greedy, learned, sweeps).

Every weighted recipe computes Σ wᵢ·θᵢ. Adapters are made to fit that mould exactly by
writing each one in a shared rank-R space, R = Σ rᵢ over all N adapters:

    Aᵢ' = [A₁; …; A_N]                (the same stacked A for every adapter)
    Bᵢ' = [0 | … | sᵢ·Bᵢ | … | 0]      (its own block, scaled by sᵢ = αᵢ/rᵢ or αᵢ/√rᵢ)

so Bᵢ'·Aᵢ' = sᵢ·Bᵢ·Aᵢ, and for weights summing to one Σ wᵢAᵢ' is the stacked A again while
Σ wᵢBᵢ' = [w₁s₁B₁ | … | w_N s_N B_N]: any weighted mean of these state dicts *is* the
exact adapter soup of `recipes/lora.py` (zero columns where an adapter has weight 0), with
scale 1. `modules_to_save` tensors are averaged as they are.

Memory: the padded tensors are never stored. Each ingredient is a lazy `SpreadAdapter`
checkpoint that builds Aᵢ' or Bᵢ' when a recipe reads that key (recipes read one key at a
time), from the adapters' own unpadded tensors, which the space holds once (float32): the
space costs the size of the N adapters, not N padded copies of rank Σ rᵢ (O(N²·r·d)).
`space.state_dicts` still materialises every padded state dict, for callers that want plain
dicts (e.g. `weighted_state_dict`); the recipes use `space.ingredients`.

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
from .dtypes import as_dtype
from .errors import IncompatibleError, NonFiniteError, SoupError
from .io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .io.base import Checkpoint, TensorInfo
from .io.pickle_file import tensor_dtype
from .io.writer import atomic_path
from .types import PathLike

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .evaluate import Evaluator, Score
    from .types import StateDict

__all__ = ["AdapterEvaluator", "AdapterSpace", "SpreadAdapter", "adapter_ingredients"]


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
                self.spread = _spread(opened)
                zero = None if base is None else _zero(self.spread[0], first, Path(base))
                self.zero = zero
        finally:
            for a in opened:
                a.close()

    @property
    def keys(self) -> list[str]:
        """The tensor names of every ingredient (and of their soups)."""
        return self.spread[0].keys()

    @property
    def ingredients(self) -> list[SpreadAdapter]:
        """The lazy checkpoints a recipe mixes: the zero adapter first if there is a base."""
        return self.spread if self.zero is None else [self.zero, *self.spread]

    @property
    def state_dicts(self) -> list[StateDict]:
        """The adapters' padded state dicts, all built now: N·(Σ rᵢ) ranks in memory
        (`ingredients` gives the same tensors lazily, one at a time)."""
        return [{k: c.get(k) for k in c.infos} for c in self.spread]

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
        if set(state_dict) != set(self.keys):
            raise SoupError("not a soup of this AdapterSpace's state dicts (keys differ)")


class SpreadAdapter(Checkpoint):
    """One adapter in the shared rank-R space, built a tensor at a time on `get`.

    It holds no padded tensor: `stacks` (A key -> every adapter's A, shared by all the
    ingredients of a space), `blocks` (B key -> this adapter's scaled B and its first of
    the R columns; None for the zero adapter) and `whole` (`modules_to_save` tensors).
    `get` builds a new tensor (A stacked, B padded with zeros) or returns a `whole` tensor
    itself (read-only). Plain tensors and dicts: it pickles into a worker process.
    """

    portable = True

    def __init__(
        self,
        label: str,
        shapes: dict[str, tuple[int, ...]],  # every key, in order: the padded shapes
        stacks: dict[str, list[torch.Tensor]],
        blocks: dict[str, tuple[torch.Tensor | None, int]],
        whole: dict[str, torch.Tensor],
    ) -> None:
        super().__init__(Path(label), "adapter space")
        self.stacks, self.blocks, self.whole = stacks, blocks, whole
        float32 = as_dtype("float32")
        for k, shape in shapes.items():
            dtype = tensor_dtype(whole[k], k, self.path) if k in whole else float32
            self.infos[k] = TensorInfo(k, shape, dtype, self.path)

    def get(self, name: str) -> torch.Tensor:
        import torch

        if name in self.stacks:
            return torch.cat(self.stacks[name], dim=0)
        if name in self.blocks:
            b, offset = self.blocks[name]
            wide = torch.zeros(self.infos[name].shape, dtype=torch.float32)
            if b is not None:
                wide[:, offset : offset + b.shape[1]] = b
            return wide
        return self.whole[name]

    def zero(self, label: str, whole: dict[str, torch.Tensor]) -> SpreadAdapter:
        """The adapter whose ΔW is zero in the same space (B = 0), with `whole` tensors."""
        shapes = {k: i.shape for k, i in self.infos.items()}
        blocks: dict[str, tuple[torch.Tensor | None, int]] = {k: (None, 0) for k in self.blocks}
        return SpreadAdapter(label, shapes, self.stacks, blocks, whole)


def _spread(opened: Sequence[Any]) -> list[SpreadAdapter]:
    """Each adapter as a lazy checkpoint in the shared rank-R space (see the module doc)."""
    import torch

    first = opened[0]
    shapes: dict[str, tuple[int, ...]] = {}
    stacks: dict[str, list[torch.Tensor]] = {}
    blocks: list[dict[str, tuple[torch.Tensor | None, int]]] = [{} for _ in opened]
    for name, m in first.modules.items():
        # copies: never views of an adapter's memory map (closed once the space is built)
        As = [a.weights.get(a.modules[name].a_key).to(torch.float32, copy=True) for a in opened]
        stacks[m.a_key], rank, offset = As, sum(x.shape[0] for x in As), 0
        for own, a in zip(blocks, opened, strict=True):
            b = a.weights.get(a.modules[name].b_key).float() * a.scale(name)
            own[m.b_key], offset = (b, offset), offset + b.shape[1]
        shapes[m.a_key] = (rank, *As[0].shape[1:])
        shapes[m.b_key] = (b.shape[0], rank, *b.shape[2:])
    for key in first.extras.values():
        shapes[key] = tuple(first.weights.infos[key].shape)
    return [
        SpreadAdapter(str(a.path), shapes, stacks, own,
                      {key: a.weights.get(key).clone() for key in first.extras.values()})
        for own, a in zip(blocks, opened, strict=True)
    ]  # fmt: skip


def _check_finite(adapters: Sequence[Any]) -> None:
    """A NaN or Inf in any adapter tensor raises, naming the file and the tensor."""
    import torch

    for a in adapters:
        for key in a.weights.infos:
            t = a.weights.get(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"{a.weights.path}: tensor {key!r} holds NaN or Inf")


def _zero(like: SpreadAdapter, first: Any, base: Path) -> SpreadAdapter:
    """The base model in the space: the stacked A, B = 0, its `modules_to_save` tensors."""
    from .io import open_checkpoint

    whole = {}
    if first.extras:
        with open_checkpoint(base) as ckpt:
            for name, key in first.extras.items():
                info, want = ckpt.infos.get(name), like.whole[key]
                if info is None or info.shape != tuple(want.shape):
                    raise IncompatibleError(
                        f"{base}: has no tensor {name!r} of shape {list(want.shape)} (the "
                        f"adapters' modules_to_save); is it the base model of {first.path}?"
                    )
                whole[key] = ckpt.get(name).to(want.dtype).clone()
    return like.zero(f"<base {base}>", whole)


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
