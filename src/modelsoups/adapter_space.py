"""LoRA adapters as ordinary ingredients of any weighted recipe (greedy, learned, sweeps).

Every weighted recipe computes Σ wᵢ·θᵢ. Adapters are made to fit that mould exactly by
writing each one in a shared rank-R space, R = Σ rᵢ over all N adapters:

    Aᵢ' = [A₁; …; A_N]                (the same stacked A for every adapter)
    Bᵢ' = [0 | … | sᵢ·Bᵢ | … | 0]      (its own block, scaled by sᵢ = αᵢ/rᵢ or αᵢ/√rᵢ)

so Bᵢ'·Aᵢ' = sᵢ·Bᵢ·Aᵢ, and for weights summing to one Σ wᵢAᵢ' is the stacked A again while
Σ wᵢBᵢ' = [w₁s₁B₁ | … | w_N s_N B_N]: any weighted mean of these state dicts *is* the
exact adapter soup of `recipes/lora.py` (zero columns where an adapter has weight 0), with
scale 1. `modules_to_save` tensors are averaged as they are.

Memory is flat in N: the space holds no tensor. Each ingredient is a lazy `SpreadAdapter`
(`adapter_spread.py`) that builds Aᵢ' or Bᵢ' when a recipe reads that key (recipes read
one key at a time) from the adapters' files, memory-mapped in whichever process reads
them (a `.bin` adapter is converted once to a private safetensors copy; see
`io/adapter_files.py`). `space.state_dicts` are the same objects: read-only mappings whose
tensors are built when read.

    space = AdapterSpace(["runs/a", "runs/b", "runs/c"])
    result = greedy_soup(space.state_dicts, evaluator)
    state_dict, config = space.adapter(result.weights)   # the exact soup, as PEFT has it
    save_adapter(state_dict, config, "greedy-adapter")   # a PEFT adapter folder
    space.load_into(peft_model, state_dict, config=config)  # or evaluate it in place

With `base` (the base model), `space.ingredients` starts with the base itself written in
the same space: Z = (the stacked A, B = 0, the base's own `modules_to_save` tensors M₀), the
adapter whose ΔW is zero. Task arithmetic and WiSE-FT over adapters are then ordinary
weighted means with weights summing to one, and exact: θ₀ + s·Σᵢ ΔWᵢ has weights
(1 − N·s, s, …, s) on (Z, P₁, …, P_N), and its `modules_to_save` tensors come out as
M₀ + s·Σᵢ(Mᵢ − M₀), the task-vector sum. `adapter_space` makes this switch for the
recipes (`greedy_soup`, `sweep`) when they are given adapter folders, and `evaluator` wraps
theirs so that candidates are scored as adapters (`candidate.as_adapter`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter_spread import SpreadAdapter, spread_adapters
from .adapters import soup_config, split_adapter_inputs
from .candidate import as_adapter
from .errors import SoupError
from .io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .io.writer import atomic_path
from .types import PathLike

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .dtypes import DType
    from .evaluate import Evaluator, Score
    from .io.base import Checkpoint
    from .types import StateDict

__all__ = [
    "AdapterEvaluator",
    "AdapterSpace",
    "MergedEvaluator",
    "SpreadAdapter",
    "adapter_ingredients",
    "adapter_space",
    "save_adapter",
]


class AdapterSpace:
    """N PEFT LoRA adapters as N state dicts whose weighted means are exact adapter soups.

    Args:
        adapters: PEFT adapter folders of one base model (checked as `soup inspect` does).
        base: the base model (file or folder): adds the zero adapter Z (see the module doc).
        allow_different_base: accept differing `base_model_name_or_path`.
        unsafe_pickle: allow `.bin` adapters that execute code when loaded.
    """

    def __init__(
        self,
        adapters: Sequence[PathLike],
        *,
        base: PathLike | None = None,
        allow_different_base: bool = False,
        unsafe_pickle: bool = False,
    ) -> None:
        if not adapters:
            raise SoupError("no ingredients: give at least one adapter")
        self.base = None if base is None else Path(base)
        opened, self.spread, self.zero = spread_adapters(
            [Path(a) for a in adapters], self.base,
            allow_different_base=allow_different_base, unsafe_pickle=unsafe_pickle,
        )  # fmt: skip
        first = opened[0]
        self.paths = [a.path for a in opened]
        self._configs = [a.config for a in opened]
        self.config = soup_config(first.config, {m: sum(a.modules[m].rank for a in opened)
                                                   for m in first.modules})  # fmt: skip

    @property
    def keys(self) -> list[str]:
        """The tensor names of every ingredient (and of their soups)."""
        return self.spread[0].keys()

    @property
    def ingredients(self) -> list[SpreadAdapter]:
        """The lazy checkpoints a recipe mixes: the zero adapter first if there is a base."""
        return self.spread if self.zero is None else [self.zero, *self.spread]

    @property
    def state_dicts(self) -> list[SpreadAdapter]:
        """The adapters' padded state dicts: read-only mappings (`sd[key]`, `items()`,
        `dict(sd)`) whose tensors are built when read, the same objects as `ingredients`
        (without the zero adapter); every recipe and `weighted_state_dict` take them."""
        return list(self.spread)

    def adapter(
        self, weights: Sequence[float], *, dtype: str | DType | torch.dtype | None = None
    ) -> tuple[StateDict, dict[str, Any]]:
        """The mix Σ wᵢ·ingredientsᵢ (one weight per `ingredients`, summing to 1, e.g. a
        greedy or sweep result's) as an exact PEFT adapter: its state dict, of rank Σ rᵢ
        over the adapters of non-zero weight and scale 1, and its `adapter_config.json`
        content; the soup `lora_soup` writes for those adapters and weights.

        Example:
            >>> result = greedy_soup(space.state_dicts, held_out)  # doctest: +SKIP
            >>> sd, config = space.adapter(result.weights)  # doctest: +SKIP
        """
        from .average import output_dtype
        from .candidate import materialize
        from .dtypes import F64
        from .io import open_checkpoint
        from .io.adapter import adapter_of
        from .lora_plan import LoraPlan, soup_checkpoint

        w = [float(x) for x in weights]
        if len(w) != len(self.ingredients) or not all(math.isfinite(x) for x in w):
            raise SoupError(f"give {len(self.ingredients)} finite weights, one per ingredient, "
                            f"got {list(weights)}")  # fmt: skip
        if abs(sum(w) - 1.0) > 1e-6:
            raise SoupError(f"the weights of a mix of adapters sum to 1, got {sum(w):g}")
        w = w[1:] if self.zero is not None else w  # Z's weight is 1 − Σ wᵢ: LoraPlan's base
        keep = [i for i, x in enumerate(w) if x != 0.0] or [0]
        plan = LoraPlan([], [w[i] for i in keep], accumulate=F64, dtype=output_dtype(dtype))
        files = self.spread[0].layout.files  # the files the space read (and stamped)
        try:
            for i in keep:
                files.check(i)
                plan.adapters.append(adapter_of(open_checkpoint(files.paths[i]), self._configs[i]))
            if self.base is not None and plan.adapters[0].extras:
                plan.base = open_checkpoint(self.base)
            state_dict = materialize(soup_checkpoint(plan))
        finally:
            for a in plan.adapters:
                a.close()
            if plan.base is not None:
                plan.base.close()
        first = plan.adapters[0]
        return state_dict, soup_config(first.config, {m: plan.out_rank(m) for m in first.modules})

    def evaluator(self, inner: Evaluator | None) -> AdapterEvaluator | None:
        """`inner` scoring this space's soups as PEFT adapters (None stays None)."""
        return None if inner is None else AdapterEvaluator(inner, self.config)

    def save(self, state_dict: StateDict, out: PathLike, *, overwrite: bool = False) -> Path:
        """Write a soup of these state dicts (rank Σ rᵢ, padded) as a PEFT adapter folder."""
        self._check(state_dict)
        meta = {"recipe": "adapter space", "ingredients": json.dumps([str(p) for p in self.paths])}
        return save_adapter(state_dict, self.config, out, overwrite=overwrite, metadata=meta)

    def load_into(
        self,
        model: nn.Module,
        state_dict: StateDict,
        *,
        adapter_name: str = "soup",
        config: dict[str, Any] | None = None,
    ) -> nn.Module:
        """Load a soup into a `peft.PeftModel` as adapter `adapter_name` (added the first
        time, overwritten in place afterwards) and make it the active one. `config`: the
        soup's (from `adapter`; default: the padded soups' `self.config`). The base model's
        weights are never written: evaluating a candidate costs the adapter, not a merge."""
        import peft
        import torch

        from .metrics.peft_model import lora_config

        self._check(state_dict)
        if not isinstance(model, peft.PeftModel):
            raise SoupError(f"load_into needs a peft.PeftModel, got {type(model).__name__}")
        if adapter_name not in model.peft_config:
            model.add_adapter(adapter_name, lora_config(config or self.config))
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


def save_adapter(
    state_dict: StateDict,
    config: dict[str, Any],
    out: PathLike,
    *,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a LoRA adapter (`AdapterSpace.adapter`'s, a sweep's) as a PEFT adapter folder
    (`adapter_config.json` + `adapter_model.safetensors`), atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_path(out, folder=True, overwrite=overwrite) as tmp:
        tensors = {k: v.contiguous() for k, v in state_dict.items()}
        meta = {"format": "pt", **(metadata or {})}
        save_file(tensors, os.fspath(tmp / ADAPTER_WEIGHTS[0]), metadata=meta)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


@dataclass
class AdapterEvaluator:
    """Scores candidates of an `AdapterSpace` as PEFT adapters with the space's config:
    `inner` gets each candidate through `candidate.as_adapter` (an eval command receives an
    adapter folder as `{ckpt}`; a built-in metric loads it into a `PeftModel`)."""

    inner: Evaluator
    config: dict[str, Any]

    def evaluate(self, candidate: Checkpoint, *, name: str) -> Score:
        return self.inner.evaluate(as_adapter(candidate, self.config), name=name)


@dataclass
class MergedEvaluator:
    """Scores adapter candidates (an `AdapterEvaluator` hands them on) as full models: each
    is merged into `base` tensor by tensor (`lora_merge.merged_candidate`) before `inner`
    reads it, e.g. an eval command that loads models, not adapters (`--merge-into`)."""

    inner: Evaluator
    base: Path

    def evaluate(self, candidate: Checkpoint, *, name: str) -> Score:
        from .recipes.lora_merge import merged_candidate

        merged = merged_candidate(candidate, self.base)
        try:
            return self.inner.evaluate(merged, name=name)
        finally:
            merged.close()


def adapter_space(
    ingredients: Sequence[object],
    *,
    allow_different_base: bool = False,
    unsafe_pickle: bool = False,
) -> AdapterSpace | None:
    """The space of adapter folders (optionally after their base model), or None if the
    ingredients are not adapters."""
    split = split_adapter_inputs(ingredients)
    if split is None:
        return None
    base, adapters = split
    return AdapterSpace(adapters, base=base, allow_different_base=allow_different_base,
                        unsafe_pickle=unsafe_pickle)  # fmt: skip


def adapter_ingredients(
    ingredients: Sequence[object],
    *evaluators: Evaluator | None,
    unsafe_pickle: bool = False,
    allow_different_base: bool = False,
) -> tuple[Sequence[Any], list[Any]]:
    """Adapter folders (optionally after their base model) as `AdapterSpace` ingredients
    and the evaluators wrapped to score them as adapters; anything else as it is."""
    space = adapter_space(ingredients, allow_different_base=allow_different_base,
                          unsafe_pickle=unsafe_pickle)  # fmt: skip
    if space is None:
        return ingredients, list(evaluators)
    return space.ingredients, [space.evaluator(e) for e in evaluators]
