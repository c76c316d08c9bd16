"""PEFT LoRA adapter folders as ingredients, read without importing `peft`.

`PeftModel.save_pretrained` writes a folder holding `adapter_config.json` and
`adapter_model.safetensors` (or `adapter_model.bin`). Each adapted module of the base model
contributes two tensors, `base_model.model.<module>.lora_A.weight` (A, r × k) and
`...lora_B.weight` (B, d × r) (`lora_embedding_A`/`_B` for embeddings); its update of the
base weight W₀ is ΔW = s·B·A with s = α/r, or α/√r when `use_rslora` is set. Whole tensors
trained alongside (`modules_to_save`: heads, embeddings) are stored under
`base_model.model.<module>.weight`. Only plain LoRA is read: DoRA, LoHa, LoKr, IA³, prompt
tuning and other variants are refused with one line naming the type.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .base import Checkpoint
from .pickle_file import PickleFile
from .safetensors_file import SafetensorsFile

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoraAdapter",
    "LoraModule",
    "adapter_base",
    "adapter_folder",
    "adapter_of",
    "open_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
_FACTOR = re.compile(r"(?P<module>.+)\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.weight)?")
# Config fields that turn plain LoRA into something whose update is not s·B·A (or that
# adds tensors this reader does not soup); refused when set.
_VARIANTS = {
    "use_dora": "DoRA (magnitude vectors)",
    "lora_bias": "LoRA with a bias on lora_B",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "target_parameters": "LoRA on nn.Parameters (target_parameters)",
    "layer_replication": "LoRA with layer_replication",
    "trainable_token_indices": "LoRA with trainable tokens",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are, their shapes, rank and alpha."""

    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    alpha: float
    embedding: bool  # lora_embedding_A/B: ΔW = (B·A)ᵀ, as for fan_in_fan_out layers

    @property
    def rank(self) -> int:
        return self.a_shape[0]

    @property
    def layout(self) -> tuple[object, ...]:
        """Everything but the rank: what must agree for two modules to be souped."""
        return (self.b_shape[:1], self.b_shape[2:], self.a_shape[1:], self.embedding)


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter: its config, its tensors (read lazily) and its modules."""

    path: Path
    config: dict[str, Any]
    weights: Checkpoint
    modules: dict[str, LoraModule] = field(default_factory=dict)
    extras: dict[str, str] = field(default_factory=dict)  # base-model key -> adapter key

    @property
    def base_model(self) -> str | None:
        base = self.config.get("base_model_name_or_path")
        return str(base) if base else None

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))

    def scale(self, module: str) -> float:
        """s = α/r, or α/√r with rsLoRA."""
        m = self.modules[module]
        return m.alpha / (math.sqrt(m.rank) if self.rslora else m.rank)

    def close(self) -> None:
        self.weights.close()


def adapter_folder(path: str | os.PathLike[str]) -> Path | None:
    """The adapter folder `path` names (the folder, or its `adapter_model.*` file), or None
    if `path` is not an adapter. Adapter weights without their config raise."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent if p.name in ADAPTER_WEIGHTS else None
    if folder is None:
        return None
    has_config = (folder / ADAPTER_CONFIG).is_file()
    has_weights = any((folder / w).is_file() for w in ADAPTER_WEIGHTS)
    if has_weights and not has_config:
        raise CheckpointError(
            f"{folder}: adapter weights without {ADAPTER_CONFIG}; copy the config that "
            "PEFT saved next to them (rank and alpha are needed to soup exactly)"
        )
    if has_config and not has_weights:
        raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} without {' or '.join(ADAPTER_WEIGHTS)}")
    return folder if has_config else None


def adapter_base(path: str | os.PathLike[str]) -> Path | None:
    """The local base model folder an adapter folder names (`base_model_name_or_path`), or
    None if `path` is not an adapter folder; raises if the base is not a local folder."""
    folder = adapter_folder(path) if Path(path).is_dir() else None
    if folder is None:
        return None
    base = _read_config(folder).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: a PEFT adapter of {base!r}, which is not a local model folder with "
            "config.json; pass model= (CLI: --model) naming the base model's folder"
        )
    return Path(base)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the adapter config ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        raise CheckpointError(
            f"{path}: {'an' if kind[:1] in tuple('AEIOU') else 'a'} {kind or 'untyped'} adapter; "
            "only plain LoRA adapters can be souped"
        )
    for key, what in _VARIANTS.items():
        if config.get(key):
            raise CheckpointError(
                f"{path}: a {what} adapter ({key} is set); only plain LoRA can be souped exactly"
            )
    return config


def _pattern_value(pattern: Any, module: str, default: Any) -> Any:
    """PEFT's `rank_pattern`/`alpha_pattern` lookup: the first key matching a suffix."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def open_adapter(path: str | os.PathLike[str], *, unsafe_pickle: bool = False) -> LoraAdapter:
    """Open a PEFT LoRA adapter folder (or its `adapter_model.*` file) lazily.

    Raises `CheckpointError` for anything that is not a readable plain LoRA adapter,
    naming the file and, for tensors, the key.

    Example:
        >>> adapter = open_adapter("runs/lr1e-4")  # doctest: +SKIP
        >>> adapter.modules["model.layers.0.self_attn.q_proj"].rank  # doctest: +SKIP
        8
    """
    folder = adapter_folder(path)
    if folder is None:
        raise CheckpointError(f"{path}: not a PEFT adapter (no {ADAPTER_CONFIG})")
    config = _read_config(folder)
    file = next(folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file())
    weights: Checkpoint = (
        SafetensorsFile(file)
        if file.suffix == ".safetensors"
        else PickleFile(file, unsafe_pickle=unsafe_pickle)
    )
    adapter = LoraAdapter(folder, config, weights)
    try:
        _index_tensors(adapter)
    except BaseException:
        weights.close()
        raise
    if not adapter.modules:
        weights.close()
        raise CheckpointError(f"{file}: no lora_A/lora_B tensors in the adapter")
    return adapter


def adapter_of(weights: Checkpoint, config: dict[str, Any]) -> LoraAdapter:
    """`weights` (tensors with PEFT adapter keys, e.g. a soup candidate) under `config`,
    indexed into modules as `open_adapter` does."""
    adapter = LoraAdapter(weights.path, config, weights)
    _index_tensors(adapter)
    return adapter


def _index_tensors(adapter: LoraAdapter) -> None:
    """Sort the adapter's tensors into LoRA modules and whole tensors (`extras`)."""
    file, infos = adapter.weights.path, adapter.weights.infos
    factors: dict[str, dict[str, str]] = {}
    for key in infos:
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{file}: tensor {key!r} is not under {PREFIX!r}")
        if "lora_magnitude_vector" in key:
            raise CheckpointError(f"{file}: tensor {key!r}: a DoRA adapter; only plain LoRA")
        m = _FACTOR.fullmatch(key.removeprefix(PREFIX))
        if m is not None:
            factors.setdefault(m["module"], {})[m["ab"]] = key
        elif ".lora_" in key:
            raise CheckpointError(f"{file}: tensor {key!r} is not a plain LoRA factor")
        else:
            adapter.extras[key.removeprefix(PREFIX)] = key
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{file}: module {module!r} has lora_{next(iter(ab))} only")
        a, b = infos[ab["A"]].shape, infos[ab["B"]].shape
        if len(a) < 2 or len(b) < 2 or a[0] != b[1]:
            raise CheckpointError(
                f"{file}: module {module!r}: lora_A {list(a)} and lora_B {list(b)} do not "
                "multiply (A is r × k, B is d × r)"
            )
        r = _pattern_value(adapter.config.get("rank_pattern"), module, adapter.config.get("r"))
        if r is not None and r != a[0]:
            raise CheckpointError(
                f"{file}: module {module!r} has rank {a[0]} but {ADAPTER_CONFIG} says {r}"
            )
        alpha = _pattern_value(
            adapter.config.get("alpha_pattern"), module, adapter.config.get("lora_alpha", 8)
        )
        if not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise CheckpointError(f"{file}: module {module!r}: lora_alpha {alpha!r} is no number")
        adapter.modules[module] = LoraModule(
            module, ab["A"], ab["B"], a, b, float(alpha), "embedding" in ab["A"]
        )
