"""Greedy soup and sweeps over LoRA adapters in Python: the result as an exact PEFT adapter.

A sweep given adapter folders returns its best mix as a PEFT adapter (`state_dict` with PEFT
keys and `adapter_config`); a greedy result's weights give one through `AdapterSpace.adapter`.
Written with `save_adapter`, each loads with `PeftModel.from_pretrained` (no missing or
unexpected keys) and merges to the float64 reference W₀ + Σ wᵢ·ΔWᵢ, with the rank of the
adapters that have weight, not of all N.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_models import make_adapter, make_base, reference
from test_lora import assert_matches, peft_merged

import modelsoups as ms
from modelsoups.adapter_space import save_adapter

pytest.importorskip("peft")

SPECS = [(4, 8.0, False), (8, 16.0, True), (4, 4.0, False)]
LM_HEAD = "base_model.model.lm_head.weight"
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("lora-python")
    base = make_base(root / "base")
    runs = [make_adapter(base, root / f"run{i}", r=r, alpha=a, rslora=rs, seed=i + 1)
            for i, (r, a, rs) in enumerate(SPECS)]  # fmt: skip
    return base, runs


def closeness_to(target: torch.Tensor):  # type: ignore[no-untyped-def]
    """A held-out score: how close the candidate's lm_head is to `target`."""

    def score(state_dict: dict[str, torch.Tensor]) -> float:
        return -float((state_dict[LM_HEAD].double() - target).pow(2).sum())

    return score


def test_a_wise_ft_sweep_over_an_adapter_returns_the_best_mix_as_a_peft_adapter(
    made: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, runs = made
    target = reference(base, [runs[1]], [0.5])["lm_head.weight"]
    r = ms.wise_ft_sweep(base, runs[1], closeness_to(target), alphas=[0.0, 0.5, 1.0])
    assert r.best == 0.5 and r.adapter_config is not None and r.state_dict is not None
    assert r.adapter_config["r"] == 8 and not r.adapter_config["use_rslora"]
    save_adapter(r.state_dict, r.adapter_config, tmp_path / "best")
    assert_matches(peft_merged(base, tmp_path / "best"), reference(base, [runs[1]], [0.5]))


def test_a_task_arithmetic_sweep_over_adapters_returns_the_exact_task_vector_sum(
    made: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, runs = made
    chosen = [runs[0], runs[2]]
    target = reference(base, chosen, [0.6, 0.6])["lm_head.weight"]
    r = ms.task_arithmetic_sweep(base, chosen, closeness_to(target), scales=[0.3, 0.6, 0.9])
    assert r.best == 0.6 and r.adapter_config is not None and r.state_dict is not None
    assert r.state_dict[Q_PROJ_A].shape[0] == 8  # rank 4 + 4
    save_adapter(r.state_dict, r.adapter_config, tmp_path / "best")
    assert_matches(peft_merged(base, tmp_path / "best"), reference(base, chosen, [0.6, 0.6]))


def test_greedy_weights_give_the_exact_adapter_of_the_chosen_only(
    made: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """Greedy keeps runs 0 and 2 (their mean is the target); `space.adapter` gives their
    soup at rank 4 + 4 (not Σ over all three, 16), equal to lora_soup's and to the padded
    mean greedy built."""
    base, runs = made
    target = reference(base, [runs[0], runs[2]], [0.5, 0.5])["lm_head.weight"]
    space = ms.AdapterSpace(runs)
    result = ms.greedy_soup(space.state_dicts, closeness_to(target))
    assert sorted(result.selected) == ["ingredient_0", "ingredient_2"]
    state_dict, config = space.adapter(result.weights)
    assert state_dict[Q_PROJ_A].shape[0] == 8 and space.config["r"] == 16
    save_adapter(state_dict, config, tmp_path / "exact")
    space.save(result.state_dict(), tmp_path / "padded")
    ms.lora_soup([runs[0], runs[2]], tmp_path / "lora-soup")
    want = reference(base, [runs[0], runs[2]], [0.5, 0.5])
    for folder in ("exact", "padded", "lora-soup"):
        assert_matches(peft_merged(base, tmp_path / folder), want)


def test_adapter_refuses_weights_that_do_not_make_a_mix(made: tuple[Path, list[Path]]) -> None:
    space = ms.AdapterSpace(made[1])
    for bad in ([0.5, 0.5], [0.5, 0.5, 0.5], [float("nan"), 0.5, 0.5]):
        with pytest.raises(ms.SoupError, match="weights"):
            space.adapter(bad)
