"""Task arithmetic: θ₀ + λ·Σ(θᵢ − θ₀), its special cases, and the CLI sweep."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import reference_mean, save_as, tiny_state_dict
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsoups import task_arithmetic
from modelsoups.cli import main
from modelsoups.io import open_checkpoint

BASE = tiny_state_dict(0, noise=0.0)
FTS = [tiny_state_dict(i, noise=0.05) for i in range(1, 4)]


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(-1, 2))
def test_matches_the_formula(scale: float) -> None:
    out = task_arithmetic(BASE, FTS, scale=scale)
    for k, v in BASE.items():
        if v.is_floating_point():
            ref = v.double() + scale * sum(f[k].double() - v.double() for f in FTS)
            torch.testing.assert_close(out[k].double(), ref, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(out[k], v)


def test_scale_zero_is_the_base_and_one_over_n_the_uniform_soup() -> None:
    zero = task_arithmetic(BASE, FTS, scale=0.0)
    assert all(torch.equal(zero[k], v) for k, v in BASE.items())
    mean = reference_mean(FTS)
    third = task_arithmetic(BASE, FTS, scale=1 / 3)
    for k, v in mean.items():
        if v.is_floating_point():
            torch.testing.assert_close(third[k].double(), v, rtol=1e-5, atol=1e-6)


def test_cli_task_arithmetic_scale_and_sweep(tmp_path: Path) -> None:
    base = save_as(BASE, tmp_path / "base", "safetensors")
    paths = [str(save_as(sd, tmp_path / f"ft{i}", "safetensors")) for i, sd in enumerate(FTS)]
    out = tmp_path / "ta.safetensors"
    assert main(["task-arithmetic", *paths, "--base", str(base), "-o", str(out),
                 "--scale", "0.4", "-q"]) == 0  # fmt: skip
    with open_checkpoint(out) as c:
        torch.testing.assert_close(c.get("fc.weight"),
                                   task_arithmetic(BASE, FTS, scale=0.4)["fc.weight"])  # fmt: skip
    script = tmp_path / "ev.py"
    script.write_text("import os; s = float(os.environ['SOUP_CANDIDATE'].split('=')[1]);"
                      " print(-abs(s - 0.5))")  # fmt: skip
    cmd = f"{sys.executable} {script} {{ckpt}}"
    out2 = tmp_path / "ta2.safetensors"
    assert main(["task-arithmetic", *paths, "--base", str(base), "-o", str(out2),
                 "--scales", "0:1:0.5", "--eval", cmd, "-q"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "ta2.report.json").read_text())
    assert report["scale"] == 0.5 and [r["scale"] for r in report["sweep"]] == [0, 0.5, 1]


@pytest.mark.parametrize("sweep", [[], ["--scales", "1,30", "--eval", "echo 1; : {ckpt}"]])
def test_an_fp16_overflow_names_the_output_and_the_tensor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sweep: list[str]
) -> None:
    """Each task vector is small, the scaled sum beyond float16's 65504: one line naming
    the soup being made and the tensor, exit 1, nothing written, the folder as it was."""
    base = save_as(BASE, tmp_path / "base", "safetensors")
    big = {k: v.clone() for k, v in FTS[0].items()}
    big["fc.weight"][0, 0] += 3000.0
    ft = save_as(big, tmp_path / "ft", "safetensors")
    out = tmp_path / "ta.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["task-arithmetic", str(ft), "--base", str(base), "-o", str(out), "--scale", "30",
            "--dtype", "fp16", *sweep]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"soup: error: {out}: tensor 'fc.weight'")
    assert "overflows float16" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
