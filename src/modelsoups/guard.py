"""Inputs that must stay as they were while a run scores candidates of them.

A greedy or sweep run scores candidates for minutes or hours, then writes the soup of the
chosen ones, reading the inputs again. An input rewritten meanwhile (a training job still
saving, an evaluator writing where it should not) would give a soup that no score
describes. `InputGuard` stamps every file of every input when the run starts (device,
inode, size, mtime: `io.files.Stamp`), and `check` compares them again: after each
evaluation run in this process (`GuardedEvaluator`) and once more before the final write.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputChangedError
from .io.files import Stamps, changed_during_run, stamps

__all__ = ["GuardedEvaluator", "InputGuard"]


@dataclass
class InputGuard:
    """The stamps of every file of `paths` (files or folders), taken when it is built."""

    paths: Sequence[Path]
    before: dict[Path, Stamps] = field(default_factory=dict)
    pid: int = field(default_factory=os.getpid)

    def __post_init__(self) -> None:
        self.before = {p: stamps(p) for p in self.paths}

    def check(self, when: str) -> None:
        """Raise `InputChangedError` naming the first file that is not as it was; `when`
        says at which point of the run it was seen (e.g. "before the final write")."""
        for root, before in self.before.items():
            line = changed_during_run(before, stamps(root), when)
            if line is not None:
                raise InputChangedError(
                    f"{line}; the scores no longer describe it and nothing was written. Run "
                    "again once it is final"
                )


@dataclass
class GuardedEvaluator:
    """`inner` (any evaluator), followed by `guard.check` after each evaluation that runs
    in the process that built the guard. Evaluations in worker processes (`--workers`,
    Ray) are not checked one by one, since a stat on another host may see other device
    numbers; the check before the final write covers them. Other attributes (`spec`,
    `settings`, ...) are the inner evaluator's."""

    inner: Any
    guard: InputGuard

    def evaluate(self, candidate: Any, *, name: str) -> Any:
        score = self.inner.evaluate(candidate, name=name)
        if os.getpid() == self.guard.pid:
            self.guard.check(f"after scoring {name!r}")
        return score

    def __getattr__(self, attr: str) -> Any:
        if attr in ("inner", "guard"):  # not set yet (unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self.inner, attr)
