"""Shared type aliases and the record every soup returns."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import torch

__all__ = ["PathLike", "Progress", "SoupResult", "StateDict"]

PathLike: TypeAlias = "str | os.PathLike[str]"
StateDict: TypeAlias = "dict[str, torch.Tensor]"
# Called as progress(done, total) in bytes of input processed; the CLI draws a bar with it.
Progress: TypeAlias = Callable[[int, int], None]


@dataclass
class SoupResult:
    """What a soup run wrote, from what, and with which weights."""

    output: Path
    recipe: str
    ingredients: list[Path]
    weights: list[float]
    tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output)
        d["ingredients"] = [str(p) for p in self.ingredients]
        return d
