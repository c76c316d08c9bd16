"""README.md is true: the tour's files are written and its commands run, in order."""

from __future__ import annotations

from pathlib import Path

import pytest
from docrunner import ROOT, check_blocks, run_doc
from safetensors.torch import load_file

DOC = ROOT / "README.md"


def test_readme_blocks_are_understood() -> None:
    check_blocks(DOC)


def test_the_two_commands_come_first_and_ci_runs_the_test_command() -> None:
    text = DOC.read_text()
    first_block = text[text.index("```") : text.index("```", text.index("```") + 3)]
    assert "soup demo" in first_block and "scripts/test.sh" in first_block
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_every_tour_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    ran = run_doc(DOC, tmp_path, capsys)
    assert len(ran) >= 10, ran
    for out in ("uniform", "greedy", "wise", "stock", "ta"):
        assert (tmp_path / f"{out}.safetensors").is_file(), out
    assert (tmp_path / "weighted" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "adapter-soup" / "adapter_config.json").is_file()
    assert (tmp_path / "mix-adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "llama-soup" / "config.json").is_file()
    assert load_file(tmp_path / "uniform.safetensors")["steps"].item() == 7
    assert (tmp_path / "greedy.png").stat().st_size > 1000
    assert "greedy soup of" in capsys.readouterr().out
