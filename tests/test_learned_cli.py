"""`soup learned`: coefficients learned on a metric's loss; the soup is Σ αᵢ·θᵢ; scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_models import causal_lm
from safetensors.torch import load_file
from test_metrics import TEXTS, reference_lm_loss, write_jsonl

from modelsoups.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("learned")
    causal_lm(root / "a", noise_seed=1)
    causal_lm(root / "b", seed=3, noise_seed=2)
    write_jsonl(root / "val.jsonl", [{"text": t} for t in TEXTS])
    return root


def soup(*args: object) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("epochs", [0, 2])
def test_the_soup_is_the_coefficient_mix_and_its_scores_are_reported(
    runs: Path, tmp_path: Path, epochs: int
) -> None:
    out = tmp_path / "soup"
    args = ["--metric", "lm-loss", "--data", runs / "val.jsonl", "--epochs", epochs, "--lr", 0.5]
    assert soup("learned", runs / "a", runs / "b", "-o", out, *args) == 0
    alphas = json.loads((tmp_path / "soup.coefficients.json").read_text())["coefficients"]
    assert sum(alphas) == pytest.approx(1.0)
    assert (alphas == [0.5, 0.5]) == (epochs == 0)
    a, b, got = (load_file(p / "model.safetensors") for p in (runs / "a", runs / "b", out))
    for k in a:
        assert torch_close(got[k], alphas[0] * a[k] + alphas[1] * b[k]), k
    report = json.loads((tmp_path / "soup.report.json").read_text())["held_out"]
    assert report["learned"] == pytest.approx(-reference_lm_loss(out, TEXTS, 512), abs=1e-5)
    if epochs == 0:
        assert report["learned"] == pytest.approx(report["uniform"], abs=1e-6)
    else:  # gradient descent on the same held-out loss did not make it worse
        assert report["learned"] >= report["uniform"] - 1e-6


def torch_close(x: object, y: object) -> bool:
    import torch

    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    return bool(torch.allclose(x, y, atol=1e-6))


def test_a_metric_without_a_loss_is_refused_before_anything_is_written(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--metric", "lm-choice", "--data", runs / "val.jsonl"]
    assert soup("learned", runs / "a", runs / "b", "-o", tmp_path / "s", *args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lm-loss, accuracy, image-accuracy" in err
    assert list(tmp_path.iterdir()) == []


def test_a_half_precision_metric_dtype_is_refused_before_anything_is_written(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--metric", "lm-loss", "--data", runs / "val.jsonl", "--metric-dtype", "bf16"]
    assert soup("learned", runs / "a", runs / "b", "-o", tmp_path / "s", *args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "soup learned learns in float32" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_job_beyond_the_memory_available_is_refused_before_anything_is_written(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The estimate counts the whole job (the CLI holds the ingredients once, in the stack):
    on a machine with 64 KiB free, the one-line refusal says what would fit."""
    import modelsoups.recipes.learned as learned

    monkeypatch.setattr(learned, "_available", lambda device: 64 * 1024)
    args = ["--metric", "lm-loss", "--data", runs / "val.jsonl", "--device", "cpu"]
    assert soup("learned", runs / "a", runs / "b", "-o", tmp_path / "s", *args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "learned soup of 2 ingredients held in fp32 needs" in err, err
    assert list(tmp_path.iterdir()) == []
