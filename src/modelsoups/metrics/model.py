"""The live model a built-in metric scores candidates with: built once, refilled per candidate.

The architecture comes from a folder with `config.json` (the first checkpoint, or `model=`),
is built with a transformers Auto class ONCE per process and kept (a Ray or local worker
keeps its own), and each candidate's tensors are copied into it one at a time, read from
the running soup: no candidate file, no new process. Weights tied to another tensor (an LM
head tied to the embeddings, which `save_pretrained` leaves out) are filled through the
tensor they share.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import IncompatibleError, SoupError
from ..io.adapter import adapter_base

if TYPE_CHECKING:
    from torch import nn

    from ..io.base import Checkpoint

__all__ = ["build_model", "find_model_dir", "load_config", "load_into", "resolve_device"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt",
                   "vocab.json", "spiece.model")  # fmt: skip
# The process's one live model (at most one entry: another spec replaces it), keyed by the
# folder, class, device, dtype and the stamp of config.json: an edited config is built again.
_MODELS: dict[tuple[object, ...], nn.Module] = {}


def resolve_device(device: str) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise SoupError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SoupError(f"device {device!r}: CUDA is not available here; use cpu or auto")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise SoupError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


def find_model_dir(model: Path | None, candidate: Checkpoint | None) -> Path:
    """The folder holding config.json (and the tokenizer): `model`, else the candidate's
    model files (a greedy candidate's first HF folder) or the candidate's own folder."""
    if model is not None:
        folder = model
    elif candidate is not None and getattr(candidate, "model_files_from", None) is not None:
        folder = candidate.model_files_from  # type: ignore[attr-defined]
    elif candidate is not None and candidate.path.is_dir():
        folder = candidate.path
    else:
        where = candidate.path if candidate is not None else "the checkpoint"
        raise SoupError(
            f"{where}: no config.json to build the model from (a file, not an HF folder); "
            "pass model= (CLI: --model) naming a folder with config and tokenizer"
        )
    folder = adapter_base(folder) or folder  # a PEFT adapter folder: its base model's
    if not (folder / "config.json").is_file():
        raise SoupError(
            f"{folder}: no config.json to build the model from; pass model= (CLI: --model) "
            "naming a folder with config and tokenizer"
        )
    return folder


def load_config(folder: Path, auto_class: str) -> Any:
    """The folder's transformers config, checked to be loadable by `auto_class`."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SoupError(f"{folder}/config.json: transformers cannot read it ({first})") from None
    mapping = getattr(transformers, auto_class)._model_mapping
    if type(config) not in mapping:
        raise IncompatibleError(
            f"{folder}/config.json: model type {config.model_type!r} cannot be loaded by "
            f"{auto_class} (tried {auto_class}.from_config); this metric needs such a model"
        )
    return config


def check_tokenizer(folder: Path) -> None:
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise SoupError(
            f"{folder}: no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...); pass "
            "model= (CLI: --model) naming a folder with config and tokenizer"
        )


def build_model(
    folder: Path, auto_class: str, device: torch.device, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """`auto_class.from_config(folder's config)` in eval mode on `device` in `dtype`, built
    once per process (the same folder, class, device, dtype and unchanged config.json give
    the same live module; another one frees it first)."""
    import transformers

    from ..io.files import Stamp

    config_stamp = Stamp.now(folder / "config.json")
    key = (str(folder.resolve()), auto_class, str(device), str(dtype), config_stamp)
    if key not in _MODELS:
        _MODELS.clear()
        config = load_config(folder, auto_class)
        model = getattr(transformers, auto_class).from_config(config)
        _MODELS[key] = model.to(device=device, dtype=dtype).eval()
    return _MODELS[key]


def load_into(model: nn.Module, candidate: Checkpoint, folder: Path) -> None:
    """Copy `candidate`'s tensors into `model` in place, one at a time (cast and moved).

    Checkpoint names are mapped to the model's as `from_pretrained` renames them (legacy
    names, a missing or extra base-model prefix). A model tensor the candidate lacks is
    fine only if it shares storage with one it has (tied weights).
    """
    target = model.state_dict()
    names = checkpoint_names(model, list(candidate.infos), target)
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for k, t in target.items():
        groups.setdefault((t.data_ptr(), tuple(t.shape)), []).append(k)
    have = {m: c for c, m in names.items()}  # model name -> checkpoint name
    missing = [k for ks in groups.values() if not any(k in have for k in ks) for k in ks]
    unexpected = [c for c, m in names.items() if m not in target]
    shapes = {c: tuple(i.shape) for c, i in candidate.infos.items()}
    wrong = [m for m, c in have.items() if m in target and shapes[c] != tuple(target[m].shape)]
    if missing or unexpected or wrong:
        raise IncompatibleError(
            f"{candidate.path}: does not fit the {type(model).__name__} built from "
            f"{folder}/config.json (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shape {wrong[:3]})"
        )
    with torch.no_grad():
        for m, t in target.items():
            if m in have:
                t.copy_(candidate.get(have[m]))


def checkpoint_names(model: nn.Module, keys: list[str], target: dict[str, Any]) -> dict[str, str]:
    """Checkpoint tensor name -> model tensor name, renamed as transformers loads them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # an older transformers: names are used as they are
        return {k: k for k in keys}
    transforms: list[Any] = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None
    out = {}
    for k in keys:
        name, converted = rename_source_key(k, renamings, converters, prefix, target)
        if converted is not None:
            raise IncompatibleError(
                f"tensor {k!r}: transformers converts it while loading ({converted!r}), "
                "which in-process scoring does not do; score with an eval command instead"
            )
        out[k] = name
    return out
