"""The reader interface every checkpoint format implements, and key normalisation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..dtypes import DType, to_numpy, to_torch
from ..errors import CheckpointError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["Checkpoint", "DuplicateKeyError", "TensorInfo", "loads_unique", "normalise_keys",
           "strip_wrappers"]  # fmt: skip

# Prefixes that wrappers add to every parameter name: DDP (`module.`) and torch.compile
# (`_orig_mod.`). The same weights saved with or without a wrapper must soup together.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        raise DuplicateKeyError(next(k for k, _ in pairs if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
    return obj


def loads_unique(raw: bytes | str) -> Any:
    """`json.loads`, but an object naming a key twice raises `DuplicateKeyError`: the
    standard parser keeps the last value silently, which for a header or an index means
    a tensor quietly replaced by another."""
    return json.loads(raw, object_pairs_hook=_unique)


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor, known before any data is read."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_float


def strip_wrappers(key: str) -> tuple[str, dict[str, int]]:
    """`key` without its leading wrapper prefixes, and how many of each were removed.

    Walks an index instead of re-slicing the string: a crafted key that repeats a prefix a
    million times costs linear, not quadratic, time.
    """
    i, counts = 0, dict[str, int]()
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if key.startswith(p, i)), None)
        if prefix is None:
            return key[i:], counts
        counts[prefix] = counts.get(prefix, 0) + 1
        i += len(prefix)


def normalise_keys(raw_keys: list[str], path: Path) -> tuple[dict[str, str], list[str]]:
    """Map normalised names to raw names, stripping wrapper prefixes.

    Returns the mapping (in the raw order) and human-readable notes on what was stripped.
    """
    mapping: dict[str, str] = {}
    stripped: dict[str, int] = {}
    for raw in raw_keys:
        name, counts = strip_wrappers(raw)
        for prefix, n in counts.items():
            stripped[prefix] = stripped.get(prefix, 0) + n
        if name in mapping:
            raise CheckpointError(
                f"{path}: keys {mapping[name]!r} and {raw!r} both become {name!r} after "
                "stripping wrapper prefixes; the checkpoint mixes wrapped and unwrapped weights"
            )
        mapping[name] = raw
    notes = [f"stripped prefix {p!r} from {n} keys" for p, n in stripped.items()]
    return mapping, notes


@dataclass
class Checkpoint:
    """A lazily read checkpoint: names, shapes and dtypes first, tensors one at a time.

    Subclasses fill `infos` (normalised name -> TensorInfo, in file order) and implement
    `array` (numpy, what the file path computes with, without importing torch) or `get`
    (torch, for the Python API); each defaults to a zero-copy conversion of the other. Both
    may return a view of a memory map or of an input tensor: treat them as read-only.
    """

    # True if it pickles into a worker process and reads there as well as here: recipes
    # then send it as it is, instead of a copy of all its tensors (`ingredient_sources`).
    portable: ClassVar[bool] = False

    path: Path
    format: str
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` as a torch tensor of its dtype."""
        if type(self).array is Checkpoint.array:
            raise NotImplementedError(f"{type(self).__name__} implements neither get nor array")
        return to_torch(self.array(name), self.infos[name].dtype)

    def array(self, name: str) -> np.ndarray:
        """Tensor `name` as a numpy array in its dtype's storage type (`DType.storage`:
        bf16 and float8 as their bits)."""
        if type(self).get is Checkpoint.get:
            raise NotImplementedError(f"{type(self).__name__} implements neither get nor array")
        return to_numpy(self.get(name))

    def check_unchanged(self) -> None:
        """Raise `InputChangedError` if a file read since opening was truncated, extended or
        rewritten in place: what was read may mix old and new bytes. In-memory inputs
        never change."""

    def close(self) -> None:
        """Release file handles and memory maps."""

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
