"""The demo writes every cache and output file atomically: a temporary name in the same
folder, renamed at the end, so a crash or Ctrl-C never leaves half a file that a later run
would take for a finished one. Temporary names carry the process id and a clock, so two
workers writing the same file never share one."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = ["save_json", "save_tensors", "write_atomic"]


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` for a temporary `tmp` beside `path`, then rename it to `path`."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.time_ns()}.tmp{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file, atomically."""
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def save_json(obj: Any, path: Path, indent: int | None = None) -> None:
    """A JSON file, atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=indent) + "\n"))
