"""The evaluation history: an append-only JSON-lines log that makes a search resumable.

Greedy selection and the held-out sweeps append one record per evaluation (ingredient
scores, greedy steps, sweep points, the final score) and fsync each line, so a crash loses
at most the evaluation that was running; `resume=True` replays what was logged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import SoupError

__all__ = ["History"]


class History:
    """An append-only JSON-lines log, one record per evaluation, fsynced line by line.

    Re-opened with `resume=True`, it returns the records of an interrupted run (a torn last
    line from a crash is dropped) so that nothing already scored is evaluated again.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, resume: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []
        if self.path is None or not self.path.exists():
            return
        if not resume:
            raise SoupError(
                f"{self.path}: history exists; pass --resume to continue it, or remove it"
            )
        good: list[str] = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a line torn by a crash: it and anything after it is redone
            if isinstance(record, dict):
                self.records.append(record)
                good.append(line)
        self.path.write_text("".join(f"{ln}\n" for ln in good))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
