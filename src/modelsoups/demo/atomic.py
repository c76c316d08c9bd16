"""The demo writes every cache and output file atomically, through the project's own
`atomic_path` (the one `soup` uses for its outputs): a temporary name in the same folder,
renamed at the end, so a crash or Ctrl-C never leaves half a file that a later run would
take for a finished one, and a full disk is one clear error naming the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..io.writer import atomic_path, write_json

__all__ = ["save_json", "save_tensors", "write_atomic"]


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` for a temporary `tmp` beside `path`, then rename it to `path`
    (replacing an older `path`: the cache is rewritten with `--fresh`)."""
    with atomic_path(path, folder=False, overwrite=True) as tmp:
        write(tmp)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file, atomically."""
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def save_json(obj: Any, path: Path, indent: int | None = None) -> None:
    """A JSON file, atomically."""
    write_json(path, obj, indent=indent)
