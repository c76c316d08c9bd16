"""Scoring state dicts of `Top` on the cached splits, in-process or in worker processes.

A `Scorer` keeps one `Top` module and the features in memory and loads each candidate's
weights into that module (no new module per candidate).
"""

from __future__ import annotations

from typing import Any

import torch

from .model import Features, Top, predict_logits

__all__ = ["EVAL_SPLITS", "Scorer", "accuracy"]

EVAL_SPLITS = ("held_out", "test", "shift")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the label."""
    return float((logits.argmax(1) == labels).float().mean())


class Scorer:
    """Scores `Top` state dicts on the cached held-out / test / shift features."""

    def __init__(self, config: dict[str, Any], feats: dict[str, Features]) -> None:
        self.top = Top(config)
        self.feats = feats
        self.calls = 0  # forward passes over a whole split, for the report

    def logits(self, state_dict: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        """Logits of the candidate on one split."""
        self.top.load_state_dict(state_dict)
        self.calls += 1
        return predict_logits(self.top, self.feats[split])

    def accuracy(self, state_dict: dict[str, torch.Tensor], split: str) -> float:
        """Accuracy of the candidate on one split."""
        return accuracy(self.logits(state_dict, split), self.feats[split].labels)

    def held_out(self, state_dict: dict[str, torch.Tensor]) -> float:
        """Held-out accuracy: the only score any selection (greedy, learned, best) sees."""
        return self.accuracy(state_dict, "held_out")
