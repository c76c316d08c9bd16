"""Hugging Face model folders: one weights file or shards listed by an index JSON.

Looked for in this order: `model.safetensors.index.json`, `model.safetensors`,
`pytorch_model.bin.index.json`, `pytorch_model.bin`. Each shard is opened lazily with the
reader of its format; every tensor the index lists must be in its shard and every tensor
of a shard must be in the index.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .base import Checkpoint, DuplicateKeyError, TensorInfo, loads_unique, strip_wrappers
from .files import check_regular
from .pickle_file import PickleFile
from .safetensors_file import SafetensorsFile

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["WEIGHT_FILES", "HFFolder"]

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def _open_shard(path: Path, *, key: str | None, unsafe_pickle: bool) -> Checkpoint:
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    return PickleFile(path, key=key, unsafe_pickle=unsafe_pickle)


def _read_index(index: Path) -> dict[str, str]:
    """The weight map of a shard index: tensor name -> shard file, validated."""
    check_regular(index)
    try:
        data = loads_unique(index.read_bytes())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except DuplicateKeyError as e:
        raise CheckpointError(f"{index}: names {e.key!r} twice; the index is corrupt") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    if not weight_map:
        raise CheckpointError(
            f"{index}: weight_map is empty; an index must list every tensor of its shards"
        )
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise CheckpointError(
            f"{index}: tensor {bad!r} maps to {weight_map[bad]!r}, not to a shard file name"
        )
    for shard_name in set(weight_map.values()):
        if not _inside(shard_name):
            raise CheckpointError(
                f"{index}: shard {shard_name!r} is outside the model folder; an index may "
                "only name files inside it"
            )
    _check_numbering(index, set(weight_map.values()))
    return weight_map


# How `save_pretrained` names shards: PREFIX-00002-of-00005.EXT
_NUMBERED = re.compile(r"(.+)-(\d+)-of-(\d+)(\.\w+)")


def _check_numbering(index: Path, shard_names: set[str]) -> None:
    """Numbered shards that an index lists none of: their tensors would silently be left
    out of the soup (every input with the same index would agree on the smaller model)."""
    groups: dict[tuple[str, str, str], set[int]] = {}
    for name in shard_names:
        m = _NUMBERED.fullmatch(name)
        if m:
            groups.setdefault((m[1], m[3], m[4]), set()).add(int(m[2]))
    for (prefix, total, ext), numbers in groups.items():
        n = int(total)
        if len({i for i in numbers if 1 <= i <= n}) < n:
            first = next(i for i in range(1, n + 1) if i not in numbers)
            unlisted = f"{prefix}-{first:0{len(total)}d}-of-{total}{ext}"
            raise CheckpointError(
                f"{index}: lists no tensor of shard {unlisted!r} (shard {first} of {n}); "
                "the index is incomplete"
            )


def _inside(name: str) -> bool:
    """Whether `name`, from an index, stays inside its folder: relative, no `..`, not the
    folder itself. (A shard that is a symbolic link is fine: the HF cache is made of them.)"""
    parts = Path(name).parts  # () for "" and "."
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


class HFFolder(Checkpoint):
    """A model folder as written by `save_pretrained`, sharded or not."""

    def __init__(
        self, path: str | os.PathLike[str], *, key: str | None = None, unsafe_pickle: bool = False
    ) -> None:
        super().__init__(Path(path), "hf folder")
        # lexists: a broken link (an interrupted download) is an error, not a reason to
        # fall back silently to another weights file
        found = next((self.path / f for f in WEIGHT_FILES if os.path.lexists(self.path / f)), None)
        if found is None:
            raise CheckpointError(
                f"{self.path}: folder has no checkpoint (looked for {', '.join(WEIGHT_FILES)})"
            )
        if not found.name.endswith(".index.json"):
            check_regular(found)
        self.weights_file = found
        self._shards: dict[str, Checkpoint] = {}
        self._where: dict[str, Checkpoint] = {}
        if found.name.endswith(".index.json"):
            self._open_index(found, key=key, unsafe_pickle=unsafe_pickle)
        else:
            shard = _open_shard(found, key=key, unsafe_pickle=unsafe_pickle)
            self._shards[found.name] = shard
            for name, info in shard.infos.items():
                self.infos[name], self._where[name] = info, shard
            self.notes, self.metadata = shard.notes, shard.metadata
        kind = "safetensors" if ".safetensors" in found.name else "pytorch pickle"
        self.format = f"hf folder ({kind}, {len(self._shards)} shard(s))"

    def _open_index(self, index: Path, *, key: str | None, unsafe_pickle: bool) -> None:
        weight_map = _read_index(index)
        for shard_name in dict.fromkeys(weight_map.values()):
            shard_path = self.path / shard_name
            if not os.path.lexists(shard_path):
                raise CheckpointError(f"{index}: lists shard {shard_name!r}, which is missing")
            shard = _open_shard(shard_path, key=key, unsafe_pickle=unsafe_pickle)
            self._shards[shard_name] = shard
            self.notes += [n for n in shard.notes if n not in self.notes]
            listed = {k for k, v in weight_map.items() if v == shard_name}
            for name in shard.infos:
                raw = shard.raw_name(name) if isinstance(shard, SafetensorsFile) else name
                if name not in listed and raw not in listed:
                    raise CheckpointError(
                        f"{shard_path}: tensor {name!r} is not listed in {index.name}"
                    )
        for raw_key, shard_name in weight_map.items():
            shard = self._shards[shard_name]
            found = next(
                (n for n in (raw_key, strip_wrappers(raw_key)[0]) if n in shard.infos), None
            )
            if found is None:
                raise CheckpointError(
                    f"{self.path / shard_name}: tensor {raw_key!r} listed in {index.name} "
                    "is missing from the shard"
                )
            name = found
            self.infos[name] = TensorInfo(
                name, shard.infos[name].shape, shard.infos[name].dtype, shard.path
            )
            self._where[name] = shard

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get(name)

    def array(self, name: str) -> np.ndarray:
        return self._where[name].array(name)

    @property
    def files(self) -> list[Path]:
        """The files the weights are read from: the index (if any) and every shard."""
        shards = [self.path / name for name in self._shards]
        return shards if self.weights_file in shards else [self.weights_file, *shards]

    def check_unchanged(self) -> None:
        for shard in self._shards.values():
            shard.check_unchanged()

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


# What a soup folder gets besides its weights, so that `from_pretrained` on it just works:
# the files `save_pretrained` and tokenizers/processors write next to the weights. Nothing
# else: another model's weights (`onnx/`, `*.gguf`), code (`modeling_*.py`, which
# `trust_remote_code` would run), caches or private files are not the soup's to publish.
MODEL_FILES = frozenset({
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "spm.model", "bpe.codes",
    "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "processor_config.json", "feature_extractor_config.json",
    "image_processor_config.json", "video_preprocessor_config.json",
})  # fmt: skip


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy the known model files (`MODEL_FILES`: config, tokenizer...) from `src` into
    `dst`; return their names.

    A file may be a symbolic link, as in the Hugging Face cache, if it leads to a regular
    file inside `src` or, for a cache snapshot (`models--ORG--NAME/snapshots/REV`), inside
    that repository's `blobs/`; a link to anywhere else is not followed.
    """
    import shutil

    roots = [src.resolve()]
    if src.parent.name == "snapshots" and (src.parent.parent / "blobs").is_dir():
        roots.append((src.parent.parent / "blobs").resolve())
    copied = []
    for name in sorted(MODEL_FILES):
        p = src / name
        try:
            target, mode = p.resolve(strict=True), os.stat(p).st_mode
        except (OSError, RuntimeError):  # absent, a broken or looping link
            continue
        if stat.S_ISREG(mode) and any(target.is_relative_to(r) for r in roots):
            shutil.copyfile(target, dst / name)
            copied.append(name)
    return copied
