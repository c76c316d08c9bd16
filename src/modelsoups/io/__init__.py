"""Checkpoint readers and the streaming writer.

`open_checkpoint` picks the reader from what the path is: a `.safetensors` file, a Hugging
Face model folder (sharded or not), or a PyTorch pickle; `MemoryCheckpoint` reads an
in-memory state dict through the same interface.
"""

from __future__ import annotations

import glob
import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError

if TYPE_CHECKING:
    from .base import Checkpoint as Checkpoint
    from .base import TensorInfo as TensorInfo
    from .folder import HFFolder as HFFolder
    from .memory import MemoryCheckpoint as MemoryCheckpoint
    from .pickle_file import PickleFile as PickleFile
    from .safetensors_file import SafetensorsFile as SafetensorsFile

# The readers are imported on first use (they import numpy): `soup --help` and the CLI's
# supervisor need only `io.files`, and importing it runs this file.
_EXPORTS = {
    "Checkpoint": "base",
    "TensorInfo": "base",
    "HFFolder": "folder",
    "MemoryCheckpoint": "memory",
    "PickleFile": "pickle_file",
    "SafetensorsFile": "safetensors_file",
}

__all__ = [
    "Checkpoint",
    "HFFolder",
    "MemoryCheckpoint",
    "PickleFile",
    "SafetensorsFile",
    "TensorInfo",
    "expand_inputs",
    "open_checkpoint",
]

SAFETENSORS_MAGIC_MAX = 100 * 1024 * 1024


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_checkpoint(
    path: str | os.PathLike[str], *, key: str | None = None, unsafe_pickle: bool = False
) -> Checkpoint:
    """Open a checkpoint lazily: headers are read now, tensors on `get`.

    Args:
        path: a `.safetensors` file, a Hugging Face model folder, or a `.pt/.pth/.bin` pickle.
        key: for pickles, the nested dict holding the weights (`state_dict`, `model/ema`...).
        unsafe_pickle: allow pickles that execute code when loaded. Only for trusted files.

    Example:
        >>> with open_checkpoint("run1/model.safetensors") as ckpt:  # doctest: +SKIP
        ...     print(ckpt.keys()[:3])
    """
    from .files import check_regular
    from .folder import HFFolder
    from .pickle_file import PickleFile
    from .safetensors_file import SafetensorsFile

    p = Path(path)
    if p.is_dir():
        return HFFolder(p, key=key, unsafe_pickle=unsafe_pickle)
    check_regular(p)  # missing, a FIFO (opening it would block), a device...
    if p.suffix == ".safetensors" or _looks_like_safetensors(p):
        return SafetensorsFile(p)
    return PickleFile(p, key=key, unsafe_pickle=unsafe_pickle)


def _looks_like_safetensors(p: Path) -> bool:
    """A safetensors file starts with a small header length followed by `{`."""
    with open(p, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < SAFETENSORS_MAGIC_MAX


def expand_inputs(specs: list[str]) -> list[Path]:
    """Turn CLI input specs into paths: plain paths, globs, and `.txt` files listing paths.

    A glob that matches nothing, or a list file that cannot be read, is an error: a soup
    silently missing ingredients is worse than no soup.
    """
    paths: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.suffix == ".txt" and p.is_file():
            lines = [ln.strip() for ln in p.read_text().splitlines()]
            listed = [ln for ln in lines if ln and not ln.startswith("#")]
            bad = next((ln for ln in listed if "\x00" in ln), None)
            if bad is not None:
                raise CheckpointError(f"{p}: line {bad!r} holds a NUL byte, which no file name can")
            paths += [(p.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in listed]
        elif not p.exists() and glob.has_magic(spec):
            matches = sorted(glob.glob(spec))
            if not matches:
                raise CheckpointError(f"{spec}: pattern matches no file")
            paths += [Path(m) for m in matches]
        else:
            paths.append(p)
    return paths
