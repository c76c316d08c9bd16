"""Model Stock: identical ingredients are returned, the ratio matches the paper's formula."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import save_as, tiny_state_dict
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsoups import model_stock
from modelsoups.cli import main
from modelsoups.errors import SoupError
from modelsoups.io import open_checkpoint

BASE = tiny_state_dict(0, noise=0.0)


@settings(max_examples=5, deadline=None)
@given(k=st.integers(2, 4), seed=st.integers(0, 100))
def test_identical_ingredients_are_returned(k: int, seed: int) -> None:
    ft = tiny_state_dict(seed, noise=0.05)
    out, ratios = model_stock(BASE, [ft] * k)
    for key, v in ft.items():
        torch.testing.assert_close(out[key], v, rtol=1e-5, atol=1e-6)
    assert all(t == pytest.approx(1.0) for _, t in ratios.values())


@settings(max_examples=5, deadline=None)
@given(perm=st.permutations([0, 1, 2]))
def test_order_of_finetuned_models_does_not_matter(perm: list[int]) -> None:
    fts = [tiny_state_dict(i, noise=0.05) for i in range(3)]
    ref, _ = model_stock(BASE, fts)
    out, _ = model_stock(BASE, [fts[i] for i in perm])
    for k, v in ref.items():
        torch.testing.assert_close(out[k], v)


def test_ratio_matches_hand_computation() -> None:
    base = {"w": torch.zeros(2)}
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}
    out, ratios = model_stock(base, [a, b])
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    assert ratios["w"] == (pytest.approx(cos, abs=1e-6), pytest.approx(t, abs=1e-6))
    torch.testing.assert_close(out["w"], t * torch.tensor([1.0, 0.5]))


def test_orthogonal_or_opposed_deltas_fall_back_to_the_base() -> None:
    base = {"w": torch.ones(2)}
    out, _ = model_stock(base, [{"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([1.0, 2.0])}])
    torch.testing.assert_close(out["w"], base["w"])
    out, _ = model_stock(base, [{"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([0.0, 1.0])}])
    torch.testing.assert_close(out["w"], base["w"])


def test_needs_two_finetuned_models() -> None:
    with pytest.raises(SoupError, match="at least two"):
        model_stock(BASE, [tiny_state_dict(1)])


def test_cli_stock_streams_the_same_soup(tmp_path: Path) -> None:
    fts = [tiny_state_dict(i, noise=0.05) for i in range(3)]
    base = save_as(BASE, tmp_path / "base", "safetensors")
    paths = [str(save_as(sd, tmp_path / f"ft{i}", "safetensors")) for i, sd in enumerate(fts)]
    out = tmp_path / "stock.safetensors"
    assert main(["stock", *paths, "--base", str(base), "-o", str(out), "-q"]) == 0
    expected, _ = model_stock(BASE, fts)
    with open_checkpoint(out) as c:
        assert c.metadata["recipe"] == "model-stock"
        for k, v in expected.items():
            torch.testing.assert_close(c.get(k), v)
    assert (tmp_path / "stock.report.json").exists()


def test_cli_stock_writes_shards_of_max_shard_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fts = [tiny_state_dict(i, noise=0.05) for i in range(3)]
    base = save_as(BASE, tmp_path / "base", "safetensors")
    paths = [str(save_as(sd, tmp_path / f"ft{i}", "safetensors")) for i, sd in enumerate(fts)]
    argv = ["stock", *paths, "--base", str(base), "--max-shard-size", "300B", "-q"]
    out = tmp_path / "stock"
    assert main([*argv, "-o", str(out)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["recipe"] == "model-stock"
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for shard in shards:  # one tensor larger than the limit gets a shard of its own
        with open_checkpoint(out / shard) as c:
            assert c.nbytes <= 300 or len(c.infos) == 1
    expected, _ = model_stock(BASE, fts)
    with open_checkpoint(out) as c:
        for k, v in expected.items():
            torch.testing.assert_close(c.get(k), v)
    # like `soup uniform`: a size limit needs a folder output, and nothing is written
    file_out = tmp_path / "stock.safetensors"
    assert main([*argv, "-o", str(file_out)]) == 1
    assert "--max-shard-size" in capsys.readouterr().err
    assert not file_out.exists()
