"""Greedy soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, Recipe 1).

    sort ingredients by held-out score, best first
    soup ← {best}
    for each next ingredient θ:
        if score(mean(soup ∪ {θ})) ≥ score(mean(soup)):   # paper: ≥; official code: >
            soup ← soup ∪ {θ}

`greedy_soup` below, then `_select`, which is Recipe 1 line for line. Selection only sees
the held-out `evaluator`; `test_evaluator` scores the final soup once, after selection.
Every evaluation is logged to `history` (JSON lines); `resume=True` replays it after a
crash (`_Steps`), evaluating nothing twice, and only with the scorer that logged it
(`scorer`, on each record).

Ties. Ingredients with equal held-out scores keep their input order (a stable sort, best
first): the one listed first starts the soup, or is tried first. The paper's code sorts
ascending and reverses, which puts the later-listed first, and with `accept="ge"` the two
orders can choose different soups. We keep input order: it is what a reader of the
argument list expects, the caller controls it by ordering the inputs, and soups and
histories made by earlier versions stay the same (a resumed history must replay in the
order it was logged).

Each candidate costs one pass over the weights, never a re-average: `greedy_sum.py` keeps
the soup either as a float32 running sum in RAM (when it fits `memory`) or streams every
candidate from the soup's inputs plus the new one (any model size, memory a few copies of
the largest tensor). The two give bit-identical candidates and soups.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapter_space import adapter_ingredients
from ..candidate import materialize, model_files_source
from ..check import check_compatible, check_non_float
from ..errors import EvaluationError, SoupError
from ..evaluate import Evaluator, Score, acceptance, as_evaluator, score_ingredients
from ..history import History, check_dataset, check_scorer, record
from ..ingredients import (
    Ingredient,
    close_all,
    ingredient_names,
    ingredient_sources,
    open_ingredients,
)
from ..io.base import Checkpoint
from ..similarity import init_warning
from .greedy_sum import DEFAULT_MEMORY, SoupStore, choose_store, in_memory_bytes

__all__ = ["GreedyResult", "greedy_soup"]


@dataclass
class GreedyResult:
    """The greedy soup: which ingredients, their held-out scores, and the log."""

    names: list[str]  # every ingredient, input order
    selected: list[str]  # soup ingredients, in the order they were added
    weights: list[float]  # per ingredient, input order: 1/len(selected) or 0
    score: float  # held-out score of the soup
    ingredient_scores: dict[str, float]
    history: list[dict[str, Any]]  # JSON lines: ingredient scores, then one per greedy step
    soup: Checkpoint  # the soup, computed when read; `soup.close()` frees what it holds
    warnings: list[str] = field(default_factory=list)
    test: Score | None = None  # the final soup on test data: reported, never used to choose
    store: str = "memory"  # "memory": running sum in RAM; "streamed": read from the inputs
    memory: int = DEFAULT_MEMORY  # the budget the running sum had to fit in (bytes)
    in_memory_bytes: int = 0  # what the running sum takes (or would have taken) in RAM

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The soup as a state dict (in the ingredients' dtypes)."""
        return materialize(self.soup)


# Over 60 lines: more than half is the public keyword list and its docstring; the body
# opens, scores and ranks, and the loop itself (Recipe 1) is `_select`.
def greedy_soup(
    ingredients: Sequence[Ingredient],
    evaluator: Evaluator | Callable[[dict[str, torch.Tensor]], object],
    *,
    names: Sequence[str] | None = None,
    scores: Mapping[str, float] | None = None,
    accept: str = "ge",
    tolerance: float = 0.0,
    dataset: str = "held_out",
    history: str | os.PathLike[str] | None = None,
    resume: bool = False,
    executor: Any = None,
    test_evaluator: Evaluator | None = None,
    memory: int = DEFAULT_MEMORY,
    allow_nonfinite: bool = False,
    key: str | None = None,
    unsafe_pickle: bool = False,
    scorer: Mapping[str, Any] | None = None,
    allow_different_base: bool = False,
) -> GreedyResult:
    """Greedy soup of `ingredients` chosen by `evaluator` on held-out data.

    Args:
        ingredients: checkpoint paths, state dicts or modules of one architecture; or PEFT
            LoRA adapter folders, whose candidates are exact adapter soups (`AdapterSpace`)
            scored as adapters (`{ckpt}`: an adapter folder; a metric: in a `PeftModel`).
        evaluator: scores a candidate on HELD-OUT data (`Evaluator`, or `fn(state_dict)`).
            The candidate (and the state dict `fn` gets) may reuse memory from one step to
            the next: it is only valid during the call; copy what you want to keep.
        names: one per ingredient (default: file stems, or `ingredient_i`).
        scores: held-out scores already known (name → score), e.g. from `load_scores`;
            the ingredients not in it are evaluated, through `executor` (int = workers).
        accept: "ge" keeps an ingredient on ties (paper), "gt" only on a strict gain.
        tolerance: accept candidates scoring up to this much below the soup.
        dataset: name of the held-out metric in the history records.
        history: JSON-lines log path; `resume=True` continues one after a crash.
        test_evaluator: scores the final soup on test data, after selection.
        memory: bytes the running sum may take in RAM (12 per parameter); a larger model
            streams each candidate from its inputs instead (default 2 GiB; 0: always).
        allow_nonfinite: score candidates holding NaN/Inf instead of raising
            `NonFiniteError` (which names the ingredient that holds one).
        scorer: what `evaluator` is (JSON), logged in the history; `resume` refuses a
            history logged by another scorer (default: `evaluator.spec()` if it has one).
        allow_different_base: adapter ingredients whose `base_model_name_or_path` differ
            (`AdapterSpace.adapter(result.weights)` gives their soup as a PEFT adapter).

    Ingredients with equal held-out scores are tried in input order (see the module).

    Example:
        >>> model.load_state_dict(greedy_soup(sds, val_acc).state_dict())  # doctest: +SKIP
    """
    ev, better = as_evaluator(evaluator), acceptance(accept, tolerance)
    spec = getattr(evaluator, "spec", None)
    scorer = spec() if scorer is None and callable(spec) else scorer
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
        raise SoupError(f"memory must be a number of bytes >= 0, got {memory!r}")
    all_names = ingredient_names(ingredients, names)
    ingredients, (ev, test_evaluator) = adapter_ingredients(  # adapter folders: exact soups
        ingredients,
        ev,
        test_evaluator,
        unsafe_pickle=unsafe_pickle,
        allow_different_base=allow_different_base,
    )
    ckpts = open_ingredients(ingredients, key=key, unsafe_pickle=unsafe_pickle)
    try:
        check_compatible(ckpts)
        check_non_float(ckpts)
        warning = init_warning(ckpts)
        with History(history, resume=resume, dataset=check_dataset(dataset)) as log:
            tag = check_scorer(log, scorer)  # {"scorer": ...} on each record it scores
            todo = ingredient_sources(ingredients, all_names)
            opts = {"executor": executor, "key": key, "unsafe_pickle": unsafe_pickle}
            known = _score_ingredients(ev, todo, log, dataset, scores or {}, opts, tag)
            ranked = sorted(zip(all_names, ckpts, strict=True), key=lambda x: -known[x[0]])
            store = choose_store(ranked[0][1], model_files_source(ckpts), memory, allow_nonfinite)
            try:
                steps = _Steps(log, dataset, ranked[0][0], known[ranked[0][0]], tag)
                selected, best = _select(ev, better, ranked, store, steps)
            finally:
                store.close()
        final = store.soup("<greedy soup>")  # streamed: keeps its members open until closed
        test = test_evaluator.evaluate(final, name="greedy soup (test)") if test_evaluator else None
    except BaseException:
        close_all(ckpts)
        raise
    kept = {id(c) for c in store.members} if store.kind == "streamed" else set()
    close_all([c for c in ckpts if id(c) not in kept])
    weights = [1.0 / len(selected) if n in selected else 0.0 for n in all_names]
    return GreedyResult(all_names, selected, weights, best, known, log.records, final,
                        [warning] if warning else [], test, store.kind, memory,
                        in_memory_bytes(store.infos))  # fmt: skip


def _select(
    ev: Evaluator,
    better: Callable[[float, float], bool],
    ranked: list[tuple[str, Checkpoint]],
    soup: SoupStore,
    steps: _Steps,
) -> tuple[list[str], float]:
    """Recipe 1 over `ranked` (best first; `soup` holds the first): the names kept, in the
    order they were added, and the soup's held-out score."""
    selected, best = [ranked[0][0]], steps.first_score
    for name, ingredient in ranked[1:]:
        step = steps.replay(name)  # logged before a crash: not evaluated again
        if step is None:
            candidate = soup.candidate(f"<greedy soup + {name}>", ingredient)
            score = ev.evaluate(candidate, name=f"greedy soup of {soup.size} + {name}")
            step = steps.record(name, score, better(score.score, best), soup.size)
        accepted, score_value = step
        if accepted:
            soup.add(ingredient)
            selected.append(name)
            best = score_value
    return selected, best


class _Steps:
    """The greedy steps of the history: those logged before a crash are replayed in order
    (each must name the ingredient the selection reaches), new ones are appended."""

    def __init__(
        self, log: History, dataset: str, first: str, first_score: float, tag: dict[str, Any]
    ) -> None:
        self.log, self.dataset, self.first_score, self.tag = log, dataset, first_score, tag
        self.logged = [r for r in log.records if r.get("kind") == "greedy"]
        if not self.logged:  # the soup of the best ingredient alone: scored already
            self.record(first, Score(first_score), True, 0)
            self.logged = [log.records[-1]]
        self.next = 1

    def replay(self, name: str) -> tuple[bool, float] | None:
        """The logged (accepted, score) of the next step, or None past the log's end."""
        if self.next >= len(self.logged):
            return None
        j, step = self.next, self.logged[self.next]
        self.next += 1
        if step.get("model_name") != name or self.dataset not in step:
            raise SoupError(
                f"{self.log.path}: logged step {j} is {step.get('model_name')!r}, expected "
                f"{name!r} scored as {self.dataset!r}; ingredients, scores or dataset changed"
            )
        return bool(step["accepted"]), float(step[self.dataset])

    def record(self, name: str, s: Score, accepted: bool, size: int) -> tuple[bool, float]:
        """Log a step that tried `name` on a soup of `size` ingredients."""
        fields = {"accepted": accepted, "soup_size": size + accepted, **self.tag}
        self.log.append(record("greedy", name, self.dataset, s.score, s.metrics, **fields))
        return accepted, s.score


def _score_ingredients(
    ev: Evaluator,
    todo: list[tuple[str, object]],
    log: History,
    dataset: str,
    given: Mapping[str, float],
    opts: dict[str, Any],
    tag: dict[str, Any],
) -> dict[str, float]:
    """Held-out score of every ingredient: logged, given, or evaluated (and logged) now."""
    names = [n for n, _ in todo]
    unknown = [n for n in given if n not in names]
    if unknown:
        raise SoupError(f"scores given for unknown ingredient(s) {unknown[:3]}; not in {names}")
    known = {str(r["model_name"]): float(r[dataset]) for r in log.records
             if r.get("kind") == "ingredient" and dataset in r}  # fmt: skip
    for n, s in given.items():
        if n not in known:
            known[n] = float(s)
            log.append(record("ingredient", n, dataset, float(s), given=True))
    todo = [(n, s) for n, s in todo if n not in known]
    results = score_ingredients(ev, todo, **opts)
    for (n, _), r in zip(todo, results, strict=True):
        if isinstance(r, Score):
            log.append(record("ingredient", n, dataset, r.score, r.metrics, **tag))
            known[n] = r.score
    if errors := [r for r in results if isinstance(r, EvaluationError)]:
        raise errors[0]  # the others' scores are logged: --resume will not redo them
    return known
