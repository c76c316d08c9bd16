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
    from torch import nn

    from .types import StateDict

__all__ = [
    "Ingredient",
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
    """`(name, path, state dict or portable checkpoint)` pairs, small enough to send to a
    worker process."""
    return [
        (n, x if isinstance(x, str | os.PathLike | dict) or _portable(x) else _tensors(x))
        for n, x in zip(names, ingredients, strict=True)
    ]


def _portable(x: object) -> bool:
    return isinstance(x, Checkpoint) and x.portable


def _tensors(x: nn.Module | Checkpoint) -> StateDict:
    if isinstance(x, Checkpoint):
        return {k: x.get(k) for k in x.infos}
    return dict(x.state_dict())


def close_all(ckpts: Sequence[Checkpoint]) -> None:
    for c in ckpts:
        c.close()
