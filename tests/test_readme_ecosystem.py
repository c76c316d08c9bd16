"""docs/ecosystem.md is true: its files are written and its commands run, in order."""

from __future__ import annotations

from pathlib import Path

import pytest
from docrunner import ROOT, check_blocks, run_doc
from safetensors.torch import load_file

DOC = ROOT / "docs" / "ecosystem.md"


def test_blocks_are_understood() -> None:
    check_blocks(DOC)


@pytest.mark.slow
def test_every_readme_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")
    pytest.importorskip("mlflow")
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    for name, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true"),
                        ("RAY_USAGE_STATS_ENABLED", "0")):  # fmt: skip
        monkeypatch.setenv(name, value)  # nothing leaves this machine
    ran = run_doc(DOC, tmp_path, capsys)
    assert len(ran) >= 15, ran
    # what the tour says happened, happened
    for out in ("greedy", "wise", "recipe-soup", "mlflow-soup", "timm-ema-soup", "timm-soup"):
        assert (tmp_path / f"{out}.safetensors").is_file(), out
    assert (tmp_path / "report.html").read_text().startswith("<!doctype html>")
    assert (tmp_path / "wise.png").stat().st_size > 1000
    assert "recipe_file" in (tmp_path / "recipe-soup.report.json").read_text()
    assert sorted(load_file(tmp_path / "timm-soup.safetensors")) == [
        "bn1.num_batches_tracked", "head.weight", "pos_embed",
    ]  # fmt: skip
    assert (tmp_path / "from-mlflow" / "scores.json").is_file()
    assert (tmp_path / "bert-soup" / "config.json").is_file()
