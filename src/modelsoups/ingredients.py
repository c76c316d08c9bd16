"""Ingredients: what a recipe is given (paths, state dicts, modules), named and opened.

`open_ingredients` turns them into lazily read `Checkpoint`s with one distinct name each
(`open_sources` without the names: `stream.open_all` is the same loop over paths);
`ingredient_sources` makes `(name, path or state dict)` pairs small enough to send to a
worker process, where `score_ingredients` opens and scores each one independently.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from .errors import EvaluationError, SoupError
from .io.base import Checkpoint

if TYPE_CHECKING:
    from torch import nn

    from .evaluate import Evaluator, Score
    from .types import StateDict

__all__ = [
    "Ingredient",
    "close_all",
    "ingredient_names",
    "ingredient_sources",
    "open_ingredients",
    "open_sources",
    "score_ingredients",
]

Ingredient: TypeAlias = "StateDict | nn.Module | str | os.PathLike[str]"


def ingredient_names(ingredients: Sequence[Ingredient]) -> list[str]:
    """File stems (folder names for folders; full paths if those clash), or `ingredient_i`."""
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
    ingredients: Sequence[Ingredient],
    names: Sequence[str] | None = None,
    *,
    key: str | None = None,
    unsafe_pickle: bool = False,
) -> tuple[list[str], list[Checkpoint]]:
    """Names and lazily opened checkpoints of paths, state dicts or modules."""
    if not ingredients:
        raise SoupError("no ingredients: give at least one checkpoint")
    out_names = list(names) if names is not None else ingredient_names(ingredients)
    if len(out_names) != len(ingredients) or len(set(out_names)) != len(out_names):
        raise SoupError(f"give one distinct name per ingredient, got {out_names}")
    return out_names, open_sources(ingredients, key=key, unsafe_pickle=unsafe_pickle)


def open_sources(
    ingredients: Sequence[Ingredient], *, key: str | None = None, unsafe_pickle: bool = False
) -> list[Checkpoint]:
    """Open paths lazily (headers only) and wrap state dicts or modules, in order; on any
    error close those already open and re-raise."""
    from .average import _Memory
    from .io import open_checkpoint
    from .io.files import ensure_descriptors

    ensure_descriptors(sum(isinstance(x, str | os.PathLike) for x in ingredients))
    ckpts: list[Checkpoint] = []
    try:
        for i, x in enumerate(ingredients):
            if isinstance(x, str | os.PathLike):
                ckpts.append(open_checkpoint(x, key=key, unsafe_pickle=unsafe_pickle))
            else:
                ckpts.append(_Memory(i, x if isinstance(x, dict) else dict(x.state_dict())))
    except BaseException:
        close_all(ckpts)
        raise
    return ckpts


def ingredient_sources(
    ingredients: Sequence[Ingredient], names: Sequence[str]
) -> list[tuple[str, object]]:
    """`(name, path or state dict)` pairs, small enough to send to a worker process."""
    return [
        (n, x if isinstance(x, str | os.PathLike | dict) else dict(x.state_dict()))
        for n, x in zip(names, ingredients, strict=True)
    ]


def close_all(ckpts: Sequence[Checkpoint]) -> None:
    for c in ckpts:
        c.close()


def _score_source(
    evaluator: Evaluator, options: dict[str, Any], item: tuple[str, object]
) -> Score | EvaluationError:
    """Open one ingredient (a path or a state dict) and score it; errors are returned, so
    that the scores of the other ingredients are still logged."""
    from .average import _Memory
    from .io import open_checkpoint

    name, source = item
    is_dict = isinstance(source, dict)
    ckpt = _Memory(0, source) if is_dict else open_checkpoint(source, **options)  # type: ignore[arg-type]
    try:
        return evaluator.evaluate(ckpt, name=name)
    except EvaluationError as e:
        return e
    finally:
        ckpt.close()


def score_ingredients(
    evaluator: Evaluator,
    items: Sequence[tuple[str, object]],
    *,
    executor: Any = None,
    key: str | None = None,
    unsafe_pickle: bool = False,
) -> list[Score | EvaluationError]:
    """Score independent ingredients `(name, path or state dict)` through an executor."""
    from .executor import get_executor

    fn = functools.partial(_score_source, evaluator, {"key": key, "unsafe_pickle": unsafe_pickle})
    return get_executor(executor).map(fn, list(items))
