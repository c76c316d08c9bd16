"""The demo's time budget: how many ingredients a seed can train, before and while it trains.

Work is counted in forward passes of the trained layers over one snippet ("units"). Before
a seed starts, one unit is priced on this machine (256 held-out snippets, one thread, as
the workers run) and the most ingredients whose fine-tuning and soups fit are planned.
While it trains, ingredients go by rounds (one per worker); after each round the measured
round time re-prices the unit, and training stops early when another round and the soups
would no longer fit — a job that starts beside the demo after the plan slows it down, and
the plan alone would then run over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .model import BATCH, Features, length_batches
from .scoring import Scorer

__all__ = [
    "DEFAULT_BUDGET",
    "MIN_INGREDIENTS",
    "OVERHEAD",
    "Costs",
    "another_round_fits",
    "ingredients_that_fit",
    "unit_seconds",
]

DEFAULT_BUDGET = 300.0  # seconds per seed, cold cache included: the 5 minutes
MIN_INGREDIENTS = 4
TRAIN_COST = 3.5  # one training pass over a snippet, in forward passes (measured, batch 32)
OVERHEAD = 10.0  # seconds per seed outside forward passes: files, export (measured ~4 s)


@dataclass(frozen=True)
class Costs:
    """A seed's work in units, from the split sizes, epochs, learned-soup epochs, workers."""

    sizes: dict[str, int]
    epochs: int
    learned_epochs: int
    workers: int

    def ingredient(self) -> float:
        """Train on half the pool per epoch, then score held-out, test and shift."""
        return TRAIN_COST * self.epochs * 0.5 * self.sizes["pool"] + self._scoring()

    def soups(self, k: int) -> float:
        """The soup phase for `k` ingredients: one map whose longest jobs are greedy soup
        (a held-out pass per candidate, then test and shift) and learned soup (trained on
        held-out, then scored), and whose other jobs (uniform soup and WiSE-FT, one split
        each) fill the workers around them."""
        greedy = (k - 1) * self.sizes["held_out"] + 2 * self.sizes["test"]
        learned = TRAIN_COST * self.learned_epochs * self.sizes["held_out"] + self._scoring()
        return max(greedy, learned, (greedy + learned + 2 * self._scoring()) / self.workers)

    def rounds(self, k: int) -> int:
        """Fine-tuning rounds for `k` ingredients: `workers` of them train at once."""
        return -(-k // self.workers)

    def _scoring(self) -> int:
        return self.sizes["held_out"] + 2 * self.sizes["test"]


def ingredients_that_fit(n: int, costs: Costs, unit: float, seconds: float) -> int:
    """The most ingredients, from `n` down to 4, whose fine-tuning and soups fit `seconds`."""
    for k in range(n, MIN_INGREDIENTS - 1, -1):
        if unit * (costs.rounds(k) * costs.ingredient() + costs.soups(k)) <= seconds:
            return k
    return min(n, MIN_INGREDIENTS)


def another_round_fits(costs: Costs, after: int, round_seconds: float, seconds_left: float) -> bool:
    """Whether one more round (of measured length) and then the soups of `after`
    ingredients fit in `seconds_left`; the round's length re-prices the unit."""
    unit = round_seconds / costs.ingredient()
    return round_seconds + unit * costs.soups(after) <= seconds_left


def unit_seconds(
    config: dict[str, Any], start_weights: dict[str, torch.Tensor], held_out: Features
) -> float:
    """Seconds of one unit on this machine: the shared start scored on 256 held-out
    snippets with one thread, after an untimed pass that pays for one-time setup.

    Work grows with tokens, padding included. A whole split sorted by length pads almost
    nothing, while 256 snippets in four batches pad much more (measured: 1.3x the time
    per snippet), so the time is taken per padded token and scaled to the split's mean
    snippet length.
    """
    sample = held_out.subset(torch.arange(min(256, len(held_out))))
    scorer = Scorer(config, {"held_out": sample})
    lengths = sample.lengths()
    padded = sum(len(b) * int(lengths[b].max()) for b in length_batches(lengths, BATCH))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scorer.held_out(start_weights)
        start = time.perf_counter()
        scorer.held_out(start_weights)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return seconds / padded * float(held_out.lengths().float().mean())
