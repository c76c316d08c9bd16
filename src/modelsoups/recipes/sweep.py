"""A held-out sweep of one mixing coefficient: WiSE-FT's α, task arithmetic's scale.

    for v in values:   θ(v) = Σᵢ wᵢ(v)·θᵢ,   scored on held-out data
    best = the v of the highest score (the first on ties)

The one sweep of the library: `wise_ft_sweep`, `task_arithmetic_sweep` and the CLI's
`soup wise-ft --alphas` / `soup task-arithmetic --scales` all call `sweep`. A candidate is
never stored: it is a `LazyCheckpoint` whose tensors are computed when the evaluator reads
them, one at a time, straight in the output dtype (accumulated in float64, rounded once,
checked for NaN/Inf and overflow like every soup): the bytes the final soup of that value
has. Scores go to a resumable history; independent candidates run on an executor's workers,
each opening the ingredients itself (paths are sent, not tensors).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..adapter_space import adapter_space
from ..average import output_dtype, soup_tensor
from ..check import check_compatible, check_non_float
from ..dtypes import F64, DType, to_torch
from ..errors import EvaluationError, SoupError
from ..evaluate import Evaluator, Score, as_evaluator
from ..history import History, check_dataset, check_scorer, record
from ..ingredients import Ingredient, close_all, ingredient_sources, open_ingredients
from ..io.base import Checkpoint

if TYPE_CHECKING:
    import torch

    from ..candidate import LazyCheckpoint
    from ..types import StateDict

__all__ = ["SweepResult", "mix_checkpoint", "sweep"]

ZERO_TO_ONE = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class SweepResult:
    """Held-out scores of a sweep over one mixing coefficient, and the best one."""

    values: list[float]
    scores: list[Score]
    best: float
    state_dict: StateDict | None  # the best mix (None when the caller writes it instead)
    records: list[dict[str, Any]] = field(default_factory=list)  # one history record per value
    # adapter ingredients: `state_dict` is a PEFT LoRA adapter and this its adapter_config
    # (`adapter_space.save_adapter(r.state_dict, r.adapter_config, folder)` writes it)
    adapter_config: dict[str, Any] | None = None


# Over 60 lines: half of it is the public keyword list and its docstring; the body is
# check once, score the values not yet logged, pick the best.
def sweep(
    ingredients: Sequence[Ingredient],
    weights_of: Callable[[float], Sequence[float]],
    evaluator: Evaluator | Callable[[StateDict], object],
    values: Sequence[float],
    *,
    name: str = "alpha",
    recipe: str = "sweep",
    dtype: str | DType | torch.dtype | None = None,
    dataset: str = "held_out",
    history: str | os.PathLike[str] | None = None,
    resume: bool = False,
    executor: Any = None,
    keep_best: bool = True,
    key: str | None = None,
    unsafe_pickle: bool = False,
    allow_different_base: bool = False,
    scorer: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Score the mix `Σ weights_of(v)[i]·ingredients[i]` for every v; keep the best.

    Args:
        ingredients: checkpoint paths, state dicts or modules of one architecture; or PEFT
            LoRA adapter folders, optionally after their base model (WiSE-FT's zero-shot,
            task arithmetic's θ₀): candidates are then exact adapters (`AdapterSpace`) and
            the best mix is returned as one: `state_dict` with PEFT keys (rank Σrᵢ over
            the adapters of non-zero weight, scale 1) and `adapter_config`.
        weights_of: the ingredients' weights for a value (not normalised; may be negative).
        evaluator: scores a candidate on HELD-OUT data (`Evaluator`, or `fn(state_dict)`).
        name, recipe: the candidate for v is named `{recipe}_{name}={v:g}` in the history.
        dtype: output dtype of floating tensors (default: the first ingredient's).
        history, resume: JSON-lines log of the scores; `resume=True` skips logged values.
        executor: runs the evaluations (an int is that many local worker processes).
        keep_best: also return the best mix as a state dict (one full copy, made once).
        allow_different_base: adapter ingredients whose `base_model_name_or_path` differ.
        scorer: what `evaluator` is (JSON), logged on each record; `resume` refuses a
            history logged by another scorer (default: `evaluator.spec()` if it has one).

    Example:
        >>> r = sweep([zs, ft], lambda a: [1 - a, a], val_acc, [0.3, 0.5])  # doctest: +SKIP
    """
    if not values:
        raise SoupError(f"give at least one {name}")
    out_dtype, ev = output_dtype(dtype), as_evaluator(evaluator)
    spec = getattr(evaluator, "spec", None)
    scorer = spec() if scorer is None and callable(spec) else scorer
    space = adapter_space(ingredients, allow_different_base=allow_different_base,
                          unsafe_pickle=unsafe_pickle)  # fmt: skip
    if space is not None:  # adapter folders: exact adapter soups, scored as adapters
        ingredients, ev = space.ingredients, space.evaluator(ev) or ev
    ckpts = open_ingredients(ingredients, key=key, unsafe_pickle=unsafe_pickle)
    try:  # checked once, here, before any evaluation
        check_compatible(ckpts)
        check_non_float(ckpts)
    finally:
        close_all(ckpts)
    named = {f"{recipe}_{name}={v:g}": v for v in values}
    with History(history, resume=resume, dataset=check_dataset(dataset)) as log:
        tag = check_scorer(log, scorer)  # {"scorer": ...} on each record it scores
        done = {r["model_name"] for r in log.records if r.get("kind") == "sweep"}
        todo = [(n, list(weights_of(v))) for n, v in named.items() if n not in done]
        sources = [
            s for _, s in ingredient_sources(ingredients, [str(i) for i in range(len(ckpts))])
        ]
        options = {"key": key, "unsafe_pickle": unsafe_pickle, "dtype": out_dtype}
        score = functools.partial(_score_mix, ev, sources, options)
        from ..executor import get_executor

        results = get_executor(executor).map(score, todo)
        for (n, _), s in zip(todo, results, strict=True):
            if isinstance(s, Score):
                log.append(record("sweep", n, dataset, s.score, s.metrics, **{name: named[n]},
                                  **tag))  # fmt: skip
        if errors := [s for s in results if isinstance(s, EvaluationError)]:
            raise errors[0]  # the others' scores are logged: resume does not redo them
    by_name = {r["model_name"]: r for r in log.records if r.get("kind") == "sweep"}
    records = [{**by_name[n], name: v} for n, v in named.items()]
    best = max(records, key=lambda r: float(r[dataset]))  # the first of the best on ties
    scores = [_as_score(r, dataset, name) for r in records]
    state_dict, config = None, None
    if keep_best and space is not None:
        state_dict, config = space.adapter(weights_of(best[name]), dtype=out_dtype)
    elif keep_best:
        state_dict = mix_state_dict(
            ingredients, weights_of(best[name]), out_dtype, key, unsafe_pickle
        )
    return SweepResult(list(values), scores, float(best[name]), state_dict, records, config)


def mix_checkpoint(
    ckpts: Sequence[Checkpoint], weights: Sequence[float], dtype: DType | None, label: str
) -> LazyCheckpoint:
    """Σ wᵢ·ckptsᵢ as a lazy checkpoint: each tensor computed when read, in `dtype`
    (default: the first input's), accumulated in float64; integer tensors the first's."""
    from ..candidate import LazyCheckpoint, model_files_source

    infos = {k: replace(i, dtype=dtype) if (dtype is not None and i.is_float) else i
             for k, i in ckpts[0].infos.items()}  # fmt: skip

    def compute(k: str) -> torch.Tensor:
        if not infos[k].is_float:
            return ckpts[0].get(k)
        array = soup_tensor(k, ckpts, weights, accumulate=F64, dtype=infos[k].dtype,
                            suggest_allow=False)  # fmt: skip
        return to_torch(array, infos[k].dtype)

    return LazyCheckpoint(label, infos, compute, model_files_from=model_files_source(ckpts))


def mix_state_dict(
    ingredients: Sequence[Ingredient],
    weights: Sequence[float],
    dtype: DType | None,
    key: str | None = None,
    unsafe_pickle: bool = False,
) -> StateDict:
    """Σ wᵢ·ingredientsᵢ as a state dict (the one full copy a sweep returns)."""
    from ..candidate import materialize

    ckpts = open_ingredients(ingredients, key=key, unsafe_pickle=unsafe_pickle)
    try:
        mixed = materialize(mix_checkpoint(ckpts, weights, dtype, "<mix>"))
        return {k: v.clone() if not ckpts[0].infos[k].is_float else v for k, v in mixed.items()}
    finally:
        close_all(ckpts)


def _score_mix(
    evaluator: Evaluator, sources: list[object], options: dict[str, Any], item: Any
) -> Score | EvaluationError:
    """Open the ingredients and score one mix (runs in a worker); an evaluation error is
    returned, so that the other values' scores are still logged."""
    label, weights = item
    ckpts = open_ingredients(sources, key=options["key"], unsafe_pickle=options["unsafe_pickle"])  # type: ignore[arg-type]
    try:
        candidate = mix_checkpoint(ckpts, weights, options["dtype"], f"<{label}>")
        return evaluator.evaluate(candidate, name=label)
    except EvaluationError as e:
        return e
    finally:
        close_all(ckpts)


def _as_score(record: dict[str, Any], dataset: str, name: str) -> Score:
    """A logged sweep record as a `Score` (its extra numeric fields as metrics)."""
    skip = {"kind", "model_name", dataset, name}
    numbers = {k: v for k, v in record.items() if k not in skip and not isinstance(v, bool)}
    metrics = {k: float(v) for k, v in numbers.items() if isinstance(v, int | float)}
    return Score(float(record[dataset]), metrics)
