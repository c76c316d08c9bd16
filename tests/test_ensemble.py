"""Output ensembles: equal to a hand computation, greedy ensemble on cached logits."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, tiny_state_dict

from modelsoups import ensemble_logits, greedy_ensemble, predict
from modelsoups.recipes.ensemble import accuracy


def test_ensemble_is_the_mean_of_logits() -> None:
    a, b = torch.tensor([[1.0, 3.0]]), torch.tensor([[3.0, -1.0]])
    assert torch.equal(ensemble_logits([a, b]), torch.tensor([[2.0, 1.0]]))
    assert torch.equal(ensemble_logits([a, b], [0.25, 0.75]), torch.tensor([[2.5, 0.0]]))


def test_predict_runs_each_ingredient_once_in_one_module() -> None:
    sds = [tiny_state_dict(i, noise=0.1) for i in range(3)]
    x = torch.randn(6, 3, 5, 5)
    batches = [(x[:3], None), (x[3:], None)]
    logits = predict(sds, TinyNet, batches)
    for sd, out in zip(sds, logits, strict=True):
        m = TinyNet()
        m.load_state_dict(sd)
        torch.testing.assert_close(out, m.eval()(x).detach())


def test_greedy_ensemble_matches_hand_computation() -> None:
    labels = torch.tensor([0, 1, 1, 0])
    # m0 and m2 are each 3/4 right, on different examples; m1 is 2/4 right
    m0 = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    m1 = torch.tensor([[0.0, 3.0], [0.0, 1.0], [3.0, 0.0], [3.0, 0.0]])
    m2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 5.0], [0.0, 1.0]])
    r = greedy_ensemble([m1, m0, m2], accuracy(labels))
    assert r.scores == [0.5, 0.75, 0.75]
    # order m0, m2 (tie: input order), m1; m0+m2 → all 4 right; adding m1 → 3/4: rejected
    assert r.selected == [1, 2]
    assert r.score == 1.0
    assert [h["accepted"] for h in r.history] == [True, True, False]
    assert accuracy(labels)(ensemble_logits([m0, m2])) == r.score


def test_greedy_ensemble_ties_follow_accept() -> None:
    labels = torch.tensor([0])
    a = torch.tensor([[1.0, 0.0]])
    assert greedy_ensemble([a, a], accuracy(labels), accept="ge").selected == [0, 1]
    assert greedy_ensemble([a, a], accuracy(labels), accept="gt").selected == [0]
    with pytest.raises(Exception, match="finite"):
        greedy_ensemble([a], lambda x: float("nan"))
