"""In-process evaluators: one module reused across candidates, any candidate form accepted,
metric errors wrapped with the candidate's name."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TinyNet, save_as, tiny_state_dict
from torch import nn

from modelsoups.errors import EvaluationError
from modelsoups.evaluate import ModuleEvaluator
from modelsoups.io import MemoryCheckpoint


def test_module_evaluator_reuses_one_module() -> None:
    built = []

    def factory() -> nn.Module:
        built.append(1)
        return TinyNet()

    ev = ModuleEvaluator(factory, lambda m: float(m.fc.bias.sum()))
    for i in range(3):
        sd = tiny_state_dict(i)
        assert ev.evaluate(MemoryCheckpoint(sd), name=f"r{i}").score == pytest.approx(
            float(sd["fc.bias"].sum()))  # fmt: skip
    assert len(built) == 1


def test_score_candidate_takes_state_dicts_modules_and_paths(tmp_path: Path) -> None:
    from modelsoups import score_candidate

    sd = tiny_state_dict(0)
    ev = ModuleEvaluator(TinyNet, lambda m: float(m.fc.bias.sum()))
    expected = pytest.approx(float(sd["fc.bias"].sum()))
    model = TinyNet()
    model.load_state_dict(sd)
    path = save_as(sd, tmp_path / "r", "safetensors")
    for candidate in (sd, model, path, str(path)):
        assert score_candidate(ev, candidate).score == expected


def test_module_evaluator_wraps_metric_errors() -> None:
    ev = ModuleEvaluator(TinyNet, lambda m: 1 / 0)
    with pytest.raises(EvaluationError, match=r"candidate 'r0'.*ZeroDivisionError"):
        ev.evaluate(MemoryCheckpoint(tiny_state_dict(0)), name="r0")
