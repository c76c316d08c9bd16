"""Ingredients: what a recipe is given (paths, state dicts, modules), named and opened.

`open_ingredients` turns them into lazily read `Checkpoint`s (a path through
`io.open_checkpoint`, a state dict or module through `io.MemoryCheckpoint`);
`ingredient_names` gives them one distinct name each; `ingredient_sources` makes
`(name, path or state dict)` pairs small enough to send to a worker process, where
`evaluate.score_ingredients` opens and scores each one independently.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from .errors import SoupError
from .io import MemoryCheckpoint, open_checkpoint
from .io.base import Checkpoint
from .io.files import ensure_descriptors

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from .types import StateDict

__all__ = [
    "Ingredient",
    "LocalSource",
    "close_all",
    "ingredient_names",
    "ingredient_sources",
    "open_ingredients",
]

# A Checkpoint (e.g. a renamed, lazy view of a file) is used as it is: nothing is loaded.
Ingredient: TypeAlias = "StateDict | nn.Module | str | os.PathLike[str] | Checkpoint"


def ingredient_names(
    ingredients: Sequence[Ingredient], names: Sequence[str] | None = None
) -> list[str]:
    """`names` if given, else file stems (folder names for folders; full paths if those
    clash) or `ingredient_i`; `SoupError` unless there is one distinct name per ingredient."""
    _require_some(ingredients)
    out = list(names) if names is not None else _default_names(ingredients)
    if len(out) != len(ingredients) or len(set(out)) != len(out):
        raise SoupError(f"give one distinct name per ingredient, got {out}")
    return out


def _default_names(ingredients: Sequence[Ingredient]) -> list[str]:
    names = []
    for i, x in enumerate(ingredients):
        if isinstance(x, str | os.PathLike):
            p = Path(x)
            names.append(p.stem if p.suffix in (".safetensors", ".pt", ".pth", ".bin") else p.name)
        else:
            names.append(f"ingredient_{i}")
    if len(set(names)) < len(names):  # run1/model.safetensors, run2/model.safetensors...
        names = [str(x) if isinstance(x, str | os.PathLike) else n
                 for x, n in zip(ingredients, names, strict=True)]  # fmt: skip
    return names


def open_ingredients(
    ingredients: Sequence[Ingredient], *, key: str | None = None, unsafe_pickle: bool = False
) -> list[Checkpoint]:
    """Open paths lazily (headers only) and wrap state dicts or modules, in order; on any
    error close those already open and re-raise."""
    _require_some(ingredients)
    ensure_descriptors(sum(isinstance(x, str | os.PathLike) for x in ingredients))
    ckpts: list[Checkpoint] = []
    try:
        for i, x in enumerate(ingredients):
            if isinstance(x, str | os.PathLike):
                ckpts.append(open_checkpoint(x, key=key, unsafe_pickle=unsafe_pickle))
            elif isinstance(x, Checkpoint):
                ckpts.append(x)
            elif isinstance(x, LocalSource):
                ckpts.append(x.open())
            else:
                ckpts.append(MemoryCheckpoint(x, f"<state dict {i}>"))
    except BaseException:
        close_all(ckpts)
        raise
    return ckpts


def _require_some(ingredients: Sequence[Ingredient]) -> None:
    if not ingredients:
        raise SoupError("no ingredients: give at least one checkpoint")


def ingredient_sources(
    ingredients: Sequence[Ingredient], names: Sequence[str]
) -> list[tuple[str, object]]:
    """`(name, source)` pairs to send to a worker process: a path, a state dict or a
    portable checkpoint as it is; anything else (a module, a checkpoint holding open files)
    as a `LocalSource`, which copies nothing until it is pickled."""
    return [
        (n, x if isinstance(x, str | os.PathLike | dict) or _portable(x) else LocalSource(x))
        for n, x in zip(names, ingredients, strict=True)
    ]


def _portable(x: object) -> bool:
    return isinstance(x, Checkpoint) and x.portable


class LocalSource:
    """An ingredient that cannot travel as it is (a module, a checkpoint of open files).

    In this process (`workers=1`) `open()` reads it through, copying nothing; pickled for
    a worker it becomes a state dict of its tensors, copied then, when that one job is
    pickled, instead of all ingredients copied before any is scored.
    """

    def __init__(self, ingredient: nn.Module | Checkpoint) -> None:
        self.ingredient = ingredient

    def open(self) -> Checkpoint:
        """The ingredient as a checkpoint whose `close` leaves the caller's own open."""
        x = self.ingredient
        return _Borrowed(x) if isinstance(x, Checkpoint) else MemoryCheckpoint(x, "<module>")

    def __reduce__(self) -> tuple[type, tuple[StateDict]]:
        x = self.ingredient
        tensors = {k: x.get(k) for k in x.infos} if isinstance(x, Checkpoint) else x.state_dict()
        return dict, (dict(tensors),)


class _Borrowed(Checkpoint):
    """Another's checkpoint read through; closing it does not close that one."""

    def __init__(self, ckpt: Checkpoint) -> None:
        super().__init__(ckpt.path, ckpt.format, ckpt.infos)
        self._ckpt = ckpt

    def get(self, name: str) -> torch.Tensor:
        return self._ckpt.get(name)

    def array(self, name: str) -> np.ndarray:
        return self._ckpt.array(name)

    def check_unchanged(self) -> None:
        self._ckpt.check_unchanged()


def close_all(ckpts: Sequence[Checkpoint]) -> None:
    for c in ckpts:
        c.close()
