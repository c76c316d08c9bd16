"""WiSE-FT: α=0 and α=1 are the endpoints, the path is linear, sweeps pick the best α."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_as, tiny_state_dict
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsoups import wise_ft, wise_ft_sweep
from modelsoups.cli import main
from modelsoups.errors import NonFiniteError, SoupError
from modelsoups.evaluate import Score
from modelsoups.io import open_checkpoint
from modelsoups.io.base import Checkpoint
from modelsoups.recipes.wise_ft import parse_alphas

ZS, FT = tiny_state_dict(0, noise=0.0), tiny_state_dict(1, noise=0.05)


def test_alpha_endpoints_are_exact() -> None:
    for alpha, ref in ((0.0, ZS), (1.0, FT)):
        out = wise_ft(ZS, FT, alpha=alpha)
        for k, v in ref.items():
            assert torch.equal(out[k], v), k


@settings(max_examples=20, deadline=None)
@given(alpha=st.floats(0, 1))
def test_interpolation_is_linear(alpha: float) -> None:
    out = wise_ft(ZS, FT, alpha=alpha)
    for k, v in ZS.items():
        if v.is_floating_point():
            torch.testing.assert_close(out[k], (1 - alpha) * v + alpha * FT[k])


def test_sweep_picks_the_best_alpha() -> None:
    target = wise_ft(ZS, FT, alpha=0.3)

    def score(sd):
        return -float((sd["fc.weight"] - target["fc.weight"]).abs().sum())

    r = wise_ft_sweep(ZS, FT, score, alphas=parse_alphas("0:1:0.1"))
    assert r.best == pytest.approx(0.3)
    assert len(r.scores) == 11
    torch.testing.assert_close(r.state_dict["fc.weight"], target["fc.weight"])


def test_parse_alphas() -> None:
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas("0.3,0.5") == [0.3, 0.5]
    for bad in ("0:1:0", "a,b", "1:0:0.1"):
        with pytest.raises(SoupError):
            parse_alphas(bad)


def test_cli_wise_ft_single_alpha_and_sweep(tmp_path: Path) -> None:
    zs = save_as(ZS, tmp_path / "zs", "safetensors")
    ft = save_as(FT, tmp_path / "ft", "safetensors")
    out = tmp_path / "w.safetensors"
    assert main(["wise-ft", str(zs), str(ft), "-o", str(out), "--alpha", "0.25", "-q"]) == 0
    with open_checkpoint(out) as c:
        torch.testing.assert_close(c.get("fc.weight"), wise_ft(ZS, FT, alpha=0.25)["fc.weight"])
    script = tmp_path / "ev.py"  # held-out score: peaks at α = 0.5 (file size is constant)
    script.write_text("import sys, os; a = float(os.environ['SOUP_CANDIDATE'].split('=')[1]);"
                      " print(-abs(a - 0.5))")  # fmt: skip
    out2 = tmp_path / "w2.safetensors"
    cmd = f"{sys.executable} {script} {{ckpt}}"
    args = ["wise-ft", str(zs), str(ft), "-o", str(out2), "--alphas", "0:1:0.25", "--eval", cmd]
    assert main([*args, "-q"]) == 0
    report = json.loads((tmp_path / "w2.report.json").read_text())
    assert report["alpha"] == 0.5 and len(report["sweep"]) == 5
    assert len((tmp_path / "w2.history.jsonl").read_text().splitlines()) == 5
    assert main([*args, "-q"]) == 1  # output and history exist


def test_cli_sweep_logs_its_scorer_and_resume_refuses_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zs = save_as(ZS, tmp_path / "zs", "safetensors")
    ft = save_as(FT, tmp_path / "ft", "safetensors")
    script = tmp_path / "ev.py"
    script.write_text("import os; print(-abs(float(os.environ['SOUP_CANDIDATE'].split('=')[1])))")
    cmd = f"{sys.executable} {script} {{ckpt}}"
    out, history = tmp_path / "w.safetensors", tmp_path / "w.history.jsonl"
    args = ["wise-ft", str(zs), str(ft), "-o", str(out), "--alphas", "0,0.5", "-q"]
    assert main([*args, "--eval", cmd]) == 0
    logged = history.read_bytes()
    assert [json.loads(x)["scorer"] for x in logged.splitlines()] == [{"eval": cmd}] * 2
    capsys.readouterr()
    again = [*args, "--resume", "--overwrite"]
    assert main([*again, "--eval", f"{cmd} --other"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "was scored by" in lines[0], lines
    assert history.read_bytes() == logged
    assert main([*again, "--eval", cmd]) == 0  # the same scorer: nothing re-evaluated
    assert history.read_bytes() == logged


class _Recorder:
    """An evaluator that keeps each candidate's tensors exactly as read (copies), and scores
    the candidate by how close its fc.weight is to α = 0.4."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, torch.Tensor]] = {}
        self.target = wise_ft(ZS, FT, alpha=0.4)["fc.weight"].double()

    def evaluate(self, candidate: Checkpoint, *, name: str) -> Score:
        tensors = {k: candidate.get(k).clone() for k in candidate.infos}
        self.seen[name] = tensors
        return Score(-float((tensors["fc.weight"].double() - self.target).abs().sum()))


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_sweep_of_files_scores_the_bytes_of_the_final_soup(
    tmp_path: Path, dtype: str | None
) -> None:
    """Each candidate is in the output dtype, equal to the soup written for its α; the
    returned best state dict is that soup too (float64 accumulation, rounded once)."""
    zs = save_as(ZS, tmp_path / "zs", "safetensors")
    ft = save_as(FT, tmp_path / "ft", "safetensors")
    ev = _Recorder()
    r = wise_ft_sweep(zs, ft, ev, alphas=[0.2, 0.4, 0.6], dtype=dtype)
    assert r.best == 0.4 and r.state_dict is not None
    for alpha in (0.2, 0.4, 0.6):
        out = tmp_path / f"a{alpha}.safetensors"
        argv = ["wise-ft", str(zs), str(ft), "-o", str(out), "--alpha", str(alpha), "-q"]
        assert main([*argv, *(["--dtype", dtype] if dtype else [])]) == 0
        with open_checkpoint(out) as c:
            for k, v in ev.seen[f"wise-ft_alpha={alpha:g}"].items():
                assert torch.equal(v, c.get(k)), k
                if alpha == 0.4:
                    assert torch.equal(r.state_dict[k], v), k
    assert r.state_dict["fc.weight"].dtype == (torch.bfloat16 if dtype else torch.float32)
    if dtype is None:  # the in-memory recipe is the same float64 mix
        for k, v in wise_ft(ZS, FT, alpha=0.4).items():
            assert torch.equal(r.state_dict[k], v), k


def test_sweep_refuses_a_nan_ingredient(tmp_path: Path) -> None:
    bad = {k: v.clone() for k, v in FT.items()}
    bad["fc.bias"][0] = float("nan")
    path = save_as(bad, tmp_path / "ft", "safetensors")
    with pytest.raises(NonFiniteError, match=r"ft.safetensors.*'fc.bias'.*NaN or Inf"):
        wise_ft_sweep(ZS, path, lambda sd: 0.0, alphas=[0.5])


def test_cli_sweep_refuses_an_overflow_of_the_output_dtype(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finite in float32, beyond float16's range once a candidate is made in fp16: one
    line, exit 1, no output and no history."""
    big = {k: v.clone() for k, v in FT.items()}
    big["fc.weight"][0, 0] = 3e5
    zs = save_as(ZS, tmp_path / "zs", "safetensors")
    ft = save_as(big, tmp_path / "ft", "safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["wise-ft", str(zs), str(ft), "-o", str(tmp_path / "w.safetensors"), "--alphas",
            "0.5,1", "--eval", "echo 1; : {ckpt}", "--dtype", "fp16"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "overflows float16" in lines[0]
    assert f"{tmp_path / 'w.safetensors'}: tensor 'fc.weight'" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
