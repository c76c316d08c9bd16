"""Sets of LoRA adapters: open them, say whether they can be souped, summarise them.

A set of adapters can be souped exactly when they adapt the same base model (the same
`base_model_name_or_path`, unless `allow_different_base`), the same modules with the same
layouts, and carry the same whole tensors (`modules_to_save`). Ranks, alphas and rsLoRA
may differ: the exact soup (`recipes/lora.py`) absorbs each adapter's scale.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, IncompatibleError, OutputError, SoupError
from .io.adapter import LoraAdapter, adapter_folder, open_adapter
from .types import PathLike

__all__ = [
    "AdapterSummary",
    "check_adapter_output",
    "check_adapters",
    "inspect_adapters",
    "is_adapter_set",
    "open_adapters",
    "soup_config",
    "split_adapter_inputs",
]


def is_adapter_set(inputs: Sequence[PathLike]) -> bool:
    """True if every input is a PEFT adapter, False if none is; a mix raises."""
    kinds = [adapter_folder(p) is not None for p in inputs]
    if any(kinds) and not all(kinds):
        adapter = next(p for p, k in zip(inputs, kinds, strict=True) if k)
        full = next(p for p, k in zip(inputs, kinds, strict=True) if not k)
        raise IncompatibleError(
            f"{full}: a full checkpoint in a soup of PEFT adapters (like {adapter}); soup the "
            "adapters alone, with --merge-into BASE to get a full model"
        )
    return bool(kinds) and all(kinds)


def split_adapter_inputs(inputs: Sequence[object]) -> tuple[Path | None, list[Path]] | None:
    """`(None, adapters)` if every input is a PEFT adapter path, `(base, adapters)` if the
    first is a model and all the others adapters of it (its task vectors: task arithmetic,
    WiSE-FT), None if none is an adapter (or some input is not a path); other mixes raise."""
    if not all(isinstance(p, str | os.PathLike) for p in inputs):
        return None
    paths = [Path(p) for p in inputs]  # type: ignore[arg-type]
    if len(paths) > 1 and adapter_folder(paths[0]) is None and is_adapter_set(paths[1:]):
        return paths[0], paths[1:]
    return (None, paths) if is_adapter_set(paths) else None


def check_adapter_output(
    inputs: Sequence[PathLike],
    out: Path,
    merge_into: Path | None,
    allow_different_base: bool = False,
) -> None:
    """Before any work: an adapter soup goes to a folder (or merged into an existing base),
    and `merge_into` and `allow_different_base` are only for adapters."""
    split = split_adapter_inputs(inputs)
    for given, flag in (
        (merge_into, "--merge-into"),
        (allow_different_base, "--allow-different-base"),
    ):
        if split is None and given:
            raise SoupError(f"{flag} applies to PEFT LoRA adapters; these inputs are not adapters")
    if split is not None and merge_into is None and out.suffix == ".safetensors":
        raise OutputError(f"{out}: an adapter soup is a folder; drop the .safetensors suffix "
                          "(or pass --merge-into BASE for a merged model)")  # fmt: skip
    if merge_into is not None and not merge_into.exists():
        raise CheckpointError(f"{merge_into}: no such base model (--merge-into)")


def open_adapters(inputs: Sequence[PathLike], *, unsafe_pickle: bool = False) -> list[LoraAdapter]:
    """Open every adapter lazily; on any error close those already open and re-raise."""
    if not inputs:
        raise SoupError("no ingredients: give at least one adapter")
    adapters: list[LoraAdapter] = []
    try:
        for p in inputs:
            adapters.append(open_adapter(p, unsafe_pickle=unsafe_pickle))
    except BaseException:
        for a in adapters:
            a.close()
        raise
    return adapters


def _same_base(a: str | None, b: str | None) -> bool:
    if a == b:
        return True
    if a is None or b is None:
        return False
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and os.path.samefile(pa, pb)


def _diff(ref: Sequence[str], other: Sequence[str]) -> str:
    missing = [k for k in ref if k not in other][:2]
    extra = [k for k in other if k not in ref][:2]
    return "; ".join(
        [*(["missing " + ", ".join(map(repr, missing))] if missing else []),
         *(["extra " + ", ".join(map(repr, extra))] if extra else [])]
    )  # fmt: skip


def check_adapters(adapters: Sequence[LoraAdapter], *, allow_different_base: bool = False) -> None:
    """Raise `IncompatibleError` unless the adapters can be souped exactly (see module doc)."""
    ref = adapters[0]
    for other in adapters[1:]:
        if not allow_different_base and not _same_base(ref.base_model, other.base_model):
            raise IncompatibleError(
                f"{other.path}: adapts base model {other.base_model!r} but {ref.path} adapts "
                f"{ref.base_model!r}; pass --allow-different-base if they are the same weights"
            )
        if set(other.modules) != set(ref.modules):
            raise IncompatibleError(
                f"{other.path}: adapts different modules from {ref.path}: "
                f"{_diff(list(ref.modules), list(other.modules))}"
            )
        for name, m in ref.modules.items():
            o = other.modules[name]
            if o.layout != m.layout:
                raise IncompatibleError(
                    f"{other.path}: module {name!r} has lora_A {list(o.a_shape)}, lora_B "
                    f"{list(o.b_shape)} but {ref.path} has {list(m.a_shape)}, {list(m.b_shape)}"
                )
        if other.fan_in_fan_out != ref.fan_in_fan_out:
            raise IncompatibleError(f"{other.path}: fan_in_fan_out differs from {ref.path}")
        if set(other.extras) != set(ref.extras):
            raise IncompatibleError(
                f"{other.path}: saves different whole tensors (modules_to_save) from "
                f"{ref.path}: {_diff(list(ref.extras), list(other.extras))}"
            )
        for name, key in ref.extras.items():
            a, b = ref.weights.infos[key], other.weights.infos[other.extras[name]]
            if a.shape != b.shape or a.is_float != b.is_float:
                raise IncompatibleError(
                    f"{other.path}: tensor {key!r} is {b.dtype} {list(b.shape)} but {ref.path} "
                    f"has {a.dtype} {list(a.shape)}"
                )


def soup_config(config: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    """`config` (an adapter's) at the soup's rank per module and a scale of 1 (α = r, no
    rsLoRA); `rank_pattern`/`alpha_pattern` name the modules whose rank is not the common one."""
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {m: r for m, r in ranks.items() if r != common}
    scale_one = {"r": common, "lora_alpha": common, "use_rslora": False, "inference_mode": True}
    return {**config, **scale_one, "rank_pattern": pattern, "alpha_pattern": dict(pattern)}


@dataclass
class AdapterSummary:
    """What `soup inspect` shows of one adapter."""

    path: Path
    base_model: str | None
    ranks: list[int]  # distinct ranks of its modules
    alphas: list[float]  # distinct alphas
    rslora: bool
    target_modules: str
    modules_to_save: list[str]
    modules: int
    parameters: int


def _summary(a: LoraAdapter) -> AdapterSummary:
    targets = a.config.get("target_modules")
    return AdapterSummary(
        path=a.path,
        base_model=a.base_model,
        ranks=sorted({m.rank for m in a.modules.values()}),
        alphas=sorted({m.alpha for m in a.modules.values()}),
        rslora=a.rslora,
        target_modules=", ".join(sorted(targets)) if isinstance(targets, list) else str(targets),
        modules_to_save=list(a.config.get("modules_to_save") or []),
        modules=len(a.modules),
        parameters=sum(i.numel for i in a.weights.infos.values()),
    )


def inspect_adapters(
    inputs: Sequence[PathLike], *, allow_different_base: bool = False
) -> tuple[list[AdapterSummary], bool, str]:
    """Summaries of the adapters, whether they can be souped, and a one-line verdict.

    Unreadable or non-LoRA adapters raise (`CheckpointError`); an incompatible set is
    reported in the verdict, since seeing why is the point of inspecting.
    """
    adapters = open_adapters(inputs)
    try:
        summaries = [_summary(a) for a in adapters]
        try:
            check_adapters(adapters, allow_different_base=allow_different_base)
        except IncompatibleError as e:
            return summaries, False, f"incompatible: {e}"
    finally:
        for a in adapters:
            a.close()
    totals = sorted({sum(a.modules[n].rank for a in adapters) for n in adapters[0].modules})
    rank = str(totals[0]) if len(totals) == 1 else f"{totals[0]}-{totals[-1]}"
    return (
        summaries,
        True,
        (
            f"compatible: {len(adapters)} LoRA adapter(s) can be souped exactly "
            f"(output rank {rank} per module, the sum of theirs)"
        ),
    )
