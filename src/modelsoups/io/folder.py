"""Hugging Face model folders: one weights file or shards listed by an index JSON.

Looked for in this order: `model.safetensors.index.json`, `model.safetensors`,
`pytorch_model.bin.index.json`, `pytorch_model.bin`. Each shard is opened lazily with the
reader of its format; every tensor the index lists must be in its shard and every tensor
of a shard must be in the index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .base import Checkpoint, TensorInfo, strip_wrappers
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
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    return {str(k): str(v) for k, v in weight_map.items()}


class HFFolder(Checkpoint):
    """A model folder as written by `save_pretrained`, sharded or not."""

    def __init__(
        self, path: str | os.PathLike[str], *, key: str | None = None, unsafe_pickle: bool = False
    ) -> None:
        super().__init__(Path(path), "hf folder")
        found = next((self.path / f for f in WEIGHT_FILES if (self.path / f).is_file()), None)
        if found is None:
            raise CheckpointError(
                f"{self.path}: folder has no checkpoint (looked for {', '.join(WEIGHT_FILES)})"
            )
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
            if Path(shard_name).is_absolute() or ".." in Path(shard_name).parts:
                raise CheckpointError(
                    f"{index}: shard {shard_name!r} is outside the model folder; an index may "
                    "only name files inside it"
                )
            shard_path = self.path / shard_name
            if not shard_path.is_file():
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

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


# Files that carry weights; everything else in a model folder (config, tokenizer, ...) is
# copied next to the soup so that `from_pretrained` on the output just works.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy config and tokenizer files (not weights, not indexes) from `src` into `dst`."""
    import shutil

    copied = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst / rel)
        copied.append(str(rel))
    return copied
