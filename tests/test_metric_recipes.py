"""`--metric` on the soup commands scores in process exactly as an eval command would."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from hf_models import causal_lm
from test_metrics import TEXTS, reference_lm_loss, write_jsonl

from modelsoups.cli import main

REF_EVAL = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
ckpt, data = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(ckpt)
model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
total, count = 0.0, 0
with torch.no_grad():
    for line in open(data):
        ids = torch.tensor([tok(json.loads(line)["text"])["input_ids"]])
        if ids.shape[1] > 1:
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
print(-total / count)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three fine-tunes of one tiny LM (one from another init, which averaging hurts)."""
    root = tmp_path_factory.mktemp("metric-recipes")
    causal_lm(root / "a", noise_seed=1)
    causal_lm(root / "b", noise_seed=2)
    causal_lm(root / "c", seed=5, noise_seed=3)
    write_jsonl(root / "val.jsonl", [{"text": t} for t in TEXTS])
    (root / "ref_eval.py").write_text(REF_EVAL)
    return root


def soup(*args: object) -> int:
    return main([str(a) for a in args])


def steps(history: Path) -> list[tuple[str, str, bool | None, float]]:
    records = [json.loads(line) for line in history.read_text().splitlines()]
    return [(r["kind"], r["model_name"], r.get("accepted"), r["held_out"]) for r in records]


@pytest.mark.slow
def test_greedy_metric_selects_as_an_eval_command_computing_the_same_loss(
    runs: Path, tmp_path: Path
) -> None:
    ins = [runs / n for n in ("a", "b", "c")]
    command = f"{sys.executable} {runs / 'ref_eval.py'} {{ckpt}} {runs / 'val.jsonl'}"
    assert soup("greedy", *ins, "-o", tmp_path / "cmd", "--eval", command) == 0
    metric = ["--metric", "lm-loss", "--data", runs / "val.jsonl", "--batch-size", "2"]
    assert soup("greedy", *ins, "-o", tmp_path / "in", *metric, "--workers", "2") == 0
    by_command, in_process = (
        steps(tmp_path / "cmd.history.jsonl"),
        steps(tmp_path / "in.history.jsonl"),
    )
    assert [s[:3] for s in in_process] == [s[:3] for s in by_command]
    assert [s[3] for s in in_process] == pytest.approx([s[3] for s in by_command], abs=1e-5)
    assert {s[2] for s in in_process if s[0] == "greedy"} == {True, False}  # a real choice
    report = json.loads((tmp_path / "in.report.json").read_text())
    by_cmd = json.loads((tmp_path / "cmd.report.json").read_text())
    assert report["selected"] == by_cmd["selected"]
    # each report records what scored it: the metric and its data file, or the command
    assert by_cmd["scorer"] == {"held_out": {"eval": command}, "test": None}
    held_out = report["scorer"]["held_out"]
    assert (held_out["metric"], held_out["data"]) == ("lm-loss", str(runs / "val.jsonl"))
    assert (held_out["dtype"], held_out["batch_size"]) == ("float32", 2)


def test_a_wise_ft_sweep_scores_each_end_as_its_checkpoint(runs: Path, tmp_path: Path) -> None:
    args = ["--alphas", "0,0.5,1", "--metric", "lm-loss", "--data", runs / "val.jsonl"]
    assert soup("wise-ft", runs / "a", runs / "b", "-o", tmp_path / "w", *args) == 0
    sweep = json.loads((tmp_path / "w.report.json").read_text())["sweep"]
    ends = {r["alpha"]: r["held_out"] for r in sweep}
    assert ends[0.0] == pytest.approx(-reference_lm_loss(runs / "a", TEXTS, 512), abs=1e-5)
    assert ends[1.0] == pytest.approx(-reference_lm_loss(runs / "b", TEXTS, 512), abs=1e-5)


def test_stock_metric_scores_the_written_soup(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "stock"
    args = ["--base", runs / "a", "--metric", "lm-loss", "--data", runs / "val.jsonl"]
    assert soup("stock", runs / "b", runs / "c", "-o", out, *args) == 0
    held_out = json.loads((tmp_path / "stock.report.json").read_text())["held_out"]
    assert held_out == pytest.approx(-reference_lm_loss(out, TEXTS, 512), abs=1e-5)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--eval", "python e.py {ckpt}"], "--metric and --eval"),
        (["--test-metric", "lm-loss"], "needs --test-data"),
        (["--metric", "nope"], "unknown metric 'nope'"),
        (["--metric", "lm-eval:"], "write lm-eval:TASK"),
        (["--metric-dtype", "inf"], "metric dtype 'inf' is not one of"),
        (["--metric-dtype", "float8"], "metric dtype 'float8' is not one of"),
    ],
)
def test_conflicting_metric_options_fail_before_anything_is_written(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], says: str
) -> None:
    args = ["--data", runs / "val.jsonl", *([] if "--metric" in extra else ["--metric", "lm-loss"])]
    assert soup("greedy", runs / "a", runs / "b", "-o", tmp_path / "g", *args, *extra) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_metric_dtype_without_a_metric_is_refused(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--eval", "python e.py {ckpt}", "--metric-dtype", "bf16"]
    assert soup("greedy", runs / "a", runs / "b", "-o", tmp_path / "g", *args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give the metric too" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_file_runs_the_metric_options(runs: Path, tmp_path: Path) -> None:
    from modelsoups.cli.run import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"method: greedy\ningredients: [{runs / 'a'}, {runs / 'b'}]\noutput: soup\n"
        f"metric: lm-loss\ndata: {runs / 'val.jsonl'}\nbatch_size: 3\nmetric_dtype: bf16\n"
    )
    argv = run_recipe(recipe, dry_run=True)
    assert argv[argv.index("--metric") + 1] == "lm-loss" and "--batch-size" in argv
    assert argv[argv.index("--metric-dtype") + 1] == "bf16"
    assert "--eval" not in argv and "--device" not in argv


def test_greedy_resume_with_other_metric_data_or_an_eval_command_is_refused(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, val = tmp_path / "g", runs / "val.jsonl"
    write_jsonl(tmp_path / "val2.jsonl", [{"text": t} for t in reversed(TEXTS)])
    metric = ["--metric", "lm-loss", "--device", "cpu"]
    assert soup("greedy", runs / "a", runs / "b", "-o", out, *metric, "--data", val) == 0
    history = tmp_path / "g.history.jsonl"
    logged = history.read_bytes()
    shutil.rmtree(out)
    (tmp_path / "g.report.json").unlink()
    capsys.readouterr()
    others = [[*metric, "--data", tmp_path / "val2.jsonl"], ["--eval", "python e.py {ckpt}"]]
    for other, says in zip(
        others, [f"data={str(val)!r}", "eval='python e.py {ckpt}'"], strict=True
    ):
        assert soup("greedy", runs / "a", runs / "b", "-o", out, *other, "--resume") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "lm-loss" in err and says in err, err
        assert history.read_bytes() == logged
        assert sorted(p.name for p in tmp_path.iterdir()) == ["g.history.jsonl", "val2.jsonl"]
    assert soup("greedy", runs / "a", runs / "b", "-o", out, *metric, "--data", val,
                "--resume") == 0  # fmt: skip
    assert history.read_bytes() == logged
