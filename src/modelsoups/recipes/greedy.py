"""Greedy soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, Recipe 1).

    sort ingredients by held-out score, best first
    soup ← {best}
    for each next ingredient θ:
        if score(mean(soup ∪ {θ})) ≥ score(mean(soup)):   # paper: ≥; official code: >
            soup ← soup ∪ {θ}

Incremental: a float32 running sum of the soup is kept, and a candidate (sum + θ)/(k+1) is
computed tensor by tensor while it is scored, into buffers reused at every step: one pass
over the weights, never a re-average, and an accepted candidate's sum becomes the soup's
without reading θ again (memory: three float32 models). The candidate an evaluator gets is
therefore only valid during its call. Selection only sees the held-out `evaluator`;
`test_evaluator` scores the final soup once, after selection. Every evaluation is logged to
`history` (JSON lines); `resume=True` replays it after a crash, evaluating nothing twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..average import CHUNK, weighted_sum_arrays, widen, widen_buffer
from ..candidate import LazyCheckpoint, materialize, model_files_source
from ..check import check_compatible, check_non_float
from ..errors import EvaluationError, SoupError
from ..evaluate import Evaluator, Score, acceptance, as_evaluator, score_ingredients
from ..history import History
from ..ingredients import (
    Ingredient,
    close_all,
    ingredient_names,
    ingredient_sources,
    open_ingredients,
)
from ..io.base import Checkpoint
from ..similarity import init_warning

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
    soup: Checkpoint  # the soup, computed from the running sum when read
    warnings: list[str] = field(default_factory=list)
    test: Score | None = None  # the final soup on test data: reported, never used to choose

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The soup as a state dict (in the ingredients' dtypes)."""
        return materialize(self.soup)


class _RunningSum:
    """Σθ over the soup's ingredients in float32 (integer tensors: the first's), and the
    candidates built from it.

    A candidate (Σθ + θₖ)/(k+1) is built in one pass, slice by slice: `nsum = sum + θₖ`,
    `cand = nsum / n`, into `nsum` and `cand` buffers allocated once and reused at every
    step (fresh memory would be page-faulted in every time), on `threads` threads. If the
    candidate is accepted, `sum` and `nsum` swap: θₖ is not read a second time. So a
    candidate's tensors are only valid until the next candidate is built.
    """

    def __init__(self, first: Checkpoint, model_files_from: Path | None, threads: int = 2) -> None:
        self.infos, self.size, self.folder = first.infos, 1, model_files_from
        self.floats = [k for k, i in self.infos.items() if i.is_float]
        self.sums = {  # float32 copies (weight 1 is exact): the inputs are never modified
            k: weighted_sum_arrays([first.array(k)], [self.infos[k].dtype], [1.0])[0]
            for k in self.floats
        }
        self.fixed = {k: first.get(k).clone() for k, i in self.infos.items() if not i.is_float}
        self.nsum: dict[str, np.ndarray] = {}
        self.cand: dict[str, np.ndarray] = {}
        self.built: tuple[Checkpoint, set[str]] | None = None  # ingredient, tensors done
        self.pool = ThreadPoolExecutor(threads)
        self.threads = threads

    def add(self, c: Checkpoint) -> None:
        """Add ingredient `c` to the soup (free if the last candidate was built with it)."""
        self.size += 1
        if self.built is not None and self.built[0] is c and self.built[1] >= set(self.floats):
            self.sums, self.nsum = self.nsum, self.sums
        else:  # a step replayed from the history: no candidate was built
            for k in self.floats:
                self._run(k, c, self.sums[k], None)
        self.built = None

    def candidate(self, label: str, extra: Checkpoint | None = None) -> LazyCheckpoint:
        """The soup plus `extra` (or the soup itself: fresh tensors, kept by the caller)."""
        n = self.size + (extra is not None)
        if extra is not None:
            self.built = (extra, set())

        def compute(k: str) -> torch.Tensor:
            if not self.infos[k].is_float:
                return self.fixed[k]
            if extra is None:
                return torch.from_numpy(self.sums[k] / n)
            if self.built is None or self.built[0] is not extra:
                raise RuntimeError(f"{label}: read after the next candidate was built")
            nsum = self.nsum.setdefault(k, np.empty_like(self.sums[k]))
            cand = self.cand.setdefault(k, np.empty_like(self.sums[k]))
            self._run(k, extra, nsum, (cand, n))
            self.built[1].add(k)
            return torch.from_numpy(cand)

        return LazyCheckpoint(label, self.infos, compute, model_files_from=self.folder)

    def _run(
        self, k: str, c: Checkpoint, nsum: np.ndarray, scaled: tuple[np.ndarray, int] | None
    ) -> None:
        """nsum = sum + c[k] (and, if given, cand = nsum / n), split across the threads."""
        x, dtype = c.array(k).reshape(-1), c.infos[k].dtype
        total, flat = self.sums[k].reshape(-1), nsum.reshape(-1)
        out = None if scaled is None else (scaled[0].reshape(-1), scaled[1])

        def part(lo: int, hi: int) -> None:
            wide = widen_buffer()
            for a in range(lo, hi, CHUNK):
                b = min(a + CHUNK, hi)
                np.add(total[a:b], widen(x[a:b], dtype, wide), out=flat[a:b], dtype=np.float32)
                if out is not None:
                    np.divide(flat[a:b], out[1], out=out[0][a:b])

        # whole slices per thread; a tensor under two slices stays on this thread
        step = -(-x.size // self.threads // CHUNK) * CHUNK if x.size >= 2 * CHUNK else x.size
        bounds = [(lo, min(lo + step, x.size)) for lo in range(0, x.size, max(step, 1))]
        others = [self.pool.submit(part, lo, hi) for lo, hi in bounds[1:]]
        try:
            if bounds:
                part(*bounds[0])
        finally:
            for f in others:
                f.result()

    def close(self) -> None:
        self.pool.shutdown()


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
    key: str | None = None,
    unsafe_pickle: bool = False,
) -> GreedyResult:
    """Greedy soup of `ingredients` chosen by `evaluator` on held-out data.

    Args:
        ingredients: checkpoint paths, state dicts or modules of one architecture.
        evaluator: scores a candidate on HELD-OUT data (`Evaluator`, or `fn(state_dict)`).
            The candidate (and the state dict `fn` gets) reuses memory from one step to the
            next: it is only valid during the call; copy what you want to keep.
        names: one per ingredient (default: file stems, or `ingredient_i`).
        scores: held-out scores already known (name → score), e.g. from `load_scores`;
            the ingredients not in it are evaluated, through `executor` (int = workers).
        accept: "ge" keeps an ingredient on ties (paper), "gt" only on a strict gain.
        tolerance: accept candidates scoring up to this much below the soup.
        dataset: name of the held-out metric in the history records.
        history: JSON-lines log path; `resume=True` continues one after a crash.
        test_evaluator: scores the final soup on test data, after selection.

    Example:
        >>> model.load_state_dict(greedy_soup(sds, val_acc).state_dict())  # doctest: +SKIP
    """
    ev, better = as_evaluator(evaluator), acceptance(accept, tolerance)
    all_names = ingredient_names(ingredients, names)
    ckpts = open_ingredients(ingredients, key=key, unsafe_pickle=unsafe_pickle)
    try:
        check_compatible(ckpts)
        check_non_float(ckpts)
        warning = init_warning(ckpts)
        log = History(history, resume=resume)
        todo = ingredient_sources(ingredients, all_names)
        opts = {"executor": executor, "key": key, "unsafe_pickle": unsafe_pickle}
        known = _score_ingredients(ev, todo, log, dataset, scores or {}, opts)
        order = sorted(range(len(ckpts)), key=lambda i: -known[all_names[i]])
        soup = _RunningSum(ckpts[order[0]], model_files_source(ckpts))
        try:
            ranked = [(all_names[i], ckpts[i]) for i in order]
            selected, best = _select(ev, better, ranked, soup, known, log, dataset)
        finally:
            soup.close()
        final = soup.candidate("<greedy soup>")
        test = test_evaluator.evaluate(final, name="greedy soup (test)") if test_evaluator else None
    finally:
        close_all(ckpts)
    weights = [1.0 / len(selected) if n in selected else 0.0 for n in all_names]
    return GreedyResult(all_names, selected, weights, best, known, log.records, final,
                        [warning] if warning else [], test)  # fmt: skip


def _select(
    ev: Evaluator,
    better: Callable[[float, float], bool],
    ranked: list[tuple[str, Checkpoint]],
    soup: _RunningSum,
    known: Mapping[str, float],
    log: History,
    dataset: str,
) -> tuple[list[str], float]:
    """Recipe 1 over `ranked` (best first; `soup` holds the first): the names kept, in order,
    and the soup's held-out score. Steps logged before a crash are replayed, not re-scored."""
    selected, best = [ranked[0][0]], known[ranked[0][0]]
    steps = [r for r in log.records if r.get("kind") == "greedy"]
    if not steps:
        log.append({"kind": "greedy", "model_name": selected[0], dataset: best,
                    "accepted": True, "soup_size": 1})  # fmt: skip
        steps = [log.records[-1]]
    for j, (name, ckpt) in enumerate(ranked[1:], start=1):
        if j < len(steps):  # replay a step logged before the crash
            if steps[j].get("model_name") != name or dataset not in steps[j]:
                raise SoupError(
                    f"{log.path}: logged step {j} is {steps[j].get('model_name')!r}, expected"
                    f" {name!r} scored as {dataset!r}; ingredients, scores or dataset changed"
                )
            ok, s = bool(steps[j]["accepted"]), Score(float(steps[j][dataset]))
        else:
            cand = soup.candidate(f"<greedy soup + {name}>", ckpt)
            s = ev.evaluate(cand, name=f"greedy soup of {soup.size} + {name}")
            ok = better(s.score, best)
            log.append({"kind": "greedy", "model_name": name, dataset: s.score, **s.metrics,
                        "accepted": ok, "soup_size": soup.size + ok})  # fmt: skip
        if ok:
            soup.add(ckpt)
            selected.append(name)
            best = s.score
    return selected, best


def _score_ingredients(
    ev: Evaluator,
    todo: list[tuple[str, object]],
    log: History,
    dataset: str,
    given: Mapping[str, float],
    opts: dict[str, Any],
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
            log.append({"kind": "ingredient", "model_name": n, dataset: float(s), "given": True})
    todo = [(n, s) for n, s in todo if n not in known]
    results = score_ingredients(ev, todo, **opts)
    for (n, _), r in zip(todo, results, strict=True):
        if isinstance(r, Score):
            log.append({"kind": "ingredient", "model_name": n, dataset: r.score, **r.metrics})
            known[n] = r.score
    if errors := [r for r in results if isinstance(r, EvaluationError)]:
        raise errors[0]  # the others' scores are logged: --resume will not redo them
    return known
