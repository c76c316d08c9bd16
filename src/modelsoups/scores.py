"""Held-out scores logged during the sweep that trained the ingredients, read from a file.

Greedy soup needs every ingredient's held-out score; when the sweep already logged them
(a CSV or JSON file), `load_scores` reads them instead of evaluating N checkpoints again.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import SoupError
from .evaluate import to_score

__all__ = ["load_scores"]

_NAME_COLUMNS = ("model_name", "name", "ingredient", "checkpoint", "path", "model")


def load_scores(path: str | os.PathLike[str], names: Sequence[str]) -> dict[str, float]:
    """Held-out scores of `names` from a CSV or JSON file logged during the sweep.

    JSON: `{name: score}`, `{name: {"score": ...}}` or a list of `{"model_name", "score"}`.
    CSV: a name column (`model_name`, `name`, `ingredient`, `checkpoint`, `path` or the first)
    and a `score` column (or the second, if there are two). A logged path matches the
    ingredient of that stem. Every ingredient must have a score and every score an
    ingredient, else `SoupError`.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SoupError(f"{p}: cannot read scores ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SoupError(f"{p}: not a scores file (binary content)") from None
    try:
        raw = _read_json_scores(text) if p.suffix == ".json" else _read_csv_scores(text)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise SoupError(f"{p}: cannot read scores: {e}") from None
    scores = {_match(str(k), names): to_score(v, str(k)).score for k, v in raw.items()}
    unknown = [k for k in scores if k not in names]
    missing = [n for n in names if n not in scores]
    if missing:
        raise SoupError(f"{p}: no score for ingredient(s) {missing[:3]}; scores name {unknown[:3]}")
    if unknown:
        raise SoupError(f"{p}: score(s) for unknown ingredient(s) {unknown[:3]}; not in {names}")
    return scores


def _match(key: str, names: Sequence[str]) -> str:
    """A logged name as one of `names`: itself, or its file stem or file name (a path)."""
    p = Path(key)
    return next((k for k in (key, p.stem, p.name) if k in names), key)


def _read_json_scores(text: str) -> dict[str, object]:
    data = json.loads(text)
    if isinstance(data, list):
        return {str(r[next(c for c in _NAME_COLUMNS if c in r)]): r for r in data}
    if not isinstance(data, dict):
        raise ValueError("expected an object or a list of objects")
    return data


def _read_csv_scores(text: str) -> dict[str, object]:
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise ValueError("no rows")
    cols = list(rows[0])
    name_col = next((c for c in _NAME_COLUMNS if c in cols), cols[0])
    score_col = "score" if "score" in cols else cols[1] if len(cols) == 2 else None
    if score_col is None:
        raise ValueError(f"no 'score' column among {cols}")
    return {r[name_col]: float(r[score_col]) for r in rows}
