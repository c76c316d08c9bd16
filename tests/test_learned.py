"""Learned soup: equal coefficients are the uniform soup; a useless ingredient is dropped."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import TinyNet, tiny_state_dict
from torch import nn

from modelsoups import learned_soup, uniform_state_dict
from modelsoups.io import open_checkpoint


def _tiny_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 5, 5, generator=g), torch.randint(0, 7, (4,), generator=g))]


def _ce(model, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_equal_coefficients_give_the_uniform_soup() -> None:
    sds = [tiny_state_dict(i) for i in range(3)]
    r = learned_soup(sds, TinyNet(), _ce, _tiny_batches(), epochs=0)
    assert r.coefficients == [1 / 3] * 3 or all(abs(c - 1 / 3) < 1e-6 for c in r.coefficients)
    expected = uniform_state_dict(sds)
    assert r.state_dict.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(r.state_dict[k], v, rtol=1e-5, atol=1e-6)


def test_tied_weights_bn_buffers_and_temperature_run(tmp_path: Path) -> None:
    sds = [tiny_state_dict(i) for i in range(2)]
    r = learned_soup(sds, TinyNet(), _ce, _tiny_batches(), epochs=2, by_layer=True,
                     temperature=True, coefficients_out=tmp_path / "c.json",
                     output=tmp_path / "soup.safetensors")  # fmt: skip
    assert isinstance(r.coefficients, dict) and r.temperature is not None
    assert torch.equal(r.state_dict["embed.weight"], r.state_dict["decoder.weight"])
    assert len(r.losses) == 2
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["by_layer"] and set(saved["coefficients"]) == set(r.coefficients)
    with open_checkpoint(tmp_path / "soup.safetensors") as c:
        torch.testing.assert_close(c.get("fc.weight"), r.state_dict["fc.weight"])


def test_useless_ingredient_is_down_weighted() -> None:
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(1, 8, generator=g)
    good = [{"weight": w_true + 0.05 * torch.randn(1, 8, generator=g), "bias": torch.zeros(1)}
            for _ in range(2)]  # fmt: skip
    useless = {"weight": 5 * torch.randn(1, 8, generator=g), "bias": torch.ones(1)}
    x = torch.randn(64, 8, generator=g)
    data = [(x[i : i + 16], x[i : i + 16] @ w_true.T) for i in range(0, 64, 16)]
    r = learned_soup([good[0], useless, good[1]], nn.Linear(8, 1),
                     lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), data,
                     epochs=20)  # fmt: skip
    assert isinstance(r.coefficients, list)
    assert r.coefficients[1] < 0.05 < min(r.coefficients[0], r.coefficients[2])
    assert abs(sum(r.coefficients) - 1) < 1e-5
    assert r.losses[-1] < r.losses[0]
