"""`soup eval`: a table, or a JSON list in input order; every bad input is one line, exit 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_models import causal_lm, image_classifier, text_classifier
from test_metrics import TEXTS, reference_lm_loss, write_jsonl

from modelsoups.cli import main


@pytest.fixture(scope="module")
def lms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-cli")
    causal_lm(root / "a")
    causal_lm(root / "b", noise_seed=1)
    text_classifier(root / "bert")
    image_classifier(root / "vit")
    write_jsonl(root / "val.jsonl", [{"text": t} for t in TEXTS])
    return root


def soup(*args: object) -> int:
    return main([str(a) for a in args])


def test_json_lists_each_checkpoint_in_input_order_with_its_score(
    lms: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(lms)
    assert soup("eval", "b", "a", "--metric", "lm-loss", "--data", "val.jsonl", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["checkpoint"] for r in out] == ["b", "a"]
    for r in out:
        ref = reference_lm_loss(lms / r["checkpoint"], TEXTS, 512)
        assert r["score"] == pytest.approx(-ref, abs=1e-5)
        assert set(r["metrics"]) == {"loss", "perplexity", "tokens"}


def test_the_table_names_each_checkpoint_and_its_score(
    lms: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert soup("eval", lms / "a", "--metric", "lm-loss", "--data", lms / "val.jsonl") == 0
    out = capsys.readouterr().out
    ref = reference_lm_loss(lms / "a", TEXTS, 512)
    assert str(lms / "a") in out and f"{-ref:.6g}" in out


def test_a_file_checkpoint_is_scored_with_the_config_of_model(
    lms: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    shutil.copy(lms / "b" / "model.safetensors", tmp_path / "b.safetensors")
    args = ["--metric", "lm-loss", "--data", lms / "val.jsonl", "--json"]
    assert soup("eval", tmp_path / "b.safetensors", "--model", lms / "a", *args) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["score"] == pytest.approx(-reference_lm_loss(lms / "b", TEXTS, 512), abs=1e-5)


def test_metric_dtype_bf16_scores_as_the_model_loaded_in_bf16(
    lms: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--metric", "lm-loss", "--data", lms / "val.jsonl", "--batch-size", "1", "--json"]
    assert soup("eval", lms / "b", *args, "--metric-dtype", "bf16") == 0
    (r,) = json.loads(capsys.readouterr().out)
    ref = reference_lm_loss(lms / "b", TEXTS, 512, torch.bfloat16)
    ref32 = reference_lm_loss(lms / "b", TEXTS, 512)
    assert abs(r["score"] + ref) < abs(r["score"] + ref32)
    assert r["score"] == pytest.approx(-ref, abs=3e-5)


def _cases(root: Path) -> dict[str, tuple[list[object], str]]:
    """name -> (arguments after `soup eval`, what the one error line must say)."""
    (root / "empty.jsonl").write_text("")
    write_jsonl(root / "nofield.jsonl", [{"text": "a b"}, {"txt": "c"}])
    write_jsonl(root / "label.jsonl", [{"text": "a b", "label": 0}, {"text": "c", "label": 3}])
    (root / "m.safetensors").write_bytes((root / "a" / "model.safetensors").read_bytes())
    (root / "notok").mkdir(exist_ok=True)
    shutil.copy(root / "a" / "config.json", root / "notok" / "config.json")
    lm, val = ["--metric", "lm-loss"], ["--data", root / "val.jsonl"]
    return {
        "missing data": ([root / "a", *lm, "--data", root / "nope.jsonl"], "not found"),
        "empty data": ([root / "a", *lm, "--data", root / "empty.jsonl"], "empty data file"),
        "no field": ([root / "a", *lm, "--data", root / "nofield.jsonl"], "line 2: no 'text'"),
        "label out of range": (
            [root / "bert", "--metric", "accuracy", "--data", root / "label.jsonl"],
            "line 2: label 3 is out of range",
        ),
        "architecture": ([root / "vit", *lm, *val], "cannot be loaded by AutoModelForCausalLM"),
        "unknown metric": (
            [root / "a", "--metric", "bleu", *val],
            "known: lm-loss, lm-choice, accuracy, image-accuracy",
        ),
        "no tokenizer": ([root / "a", "--model", root / "notok", *lm, *val], "no tokenizer"),
        "file without --model": ([root / "m.safetensors", *lm, *val], "pass --model"),
        "bad device": ([root / "a", *lm, *val, "--device", "tpu"], "unknown device 'tpu'"),
        "batch size 0": ([root / "a", *lm, *val, "--batch-size", "0"], "batch_size must be"),
        "max length -1": ([root / "a", *lm, *val, "--max-length", "-1"], "max_length must be"),
        "metric dtype int8": ([root / "a", *lm, *val, "--metric-dtype", "int8"], "not one of"),
        "metric dtype nan": ([root / "a", *lm, *val, "--metric-dtype", "nan"], "not one of"),
        "metric dtype empty": ([root / "a", *lm, *val, "--metric-dtype", ""], "not one of"),
    }


CASES = [
    "missing data",
    "empty data",
    "no field",
    "label out of range",
    "architecture",
    "unknown metric",
    "no tokenizer",
    "file without --model",
    "bad device",
    "batch size 0",
    "max length -1",
    "metric dtype int8",
    "metric dtype nan",
    "metric dtype empty",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_1_and_no_output(
    lms: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    args, says = _cases(lms)[case]
    before = sorted(p.name for p in lms.iterdir())
    assert soup("eval", *args) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("soup: error: ") and says in err, err
    assert sorted(p.name for p in lms.iterdir()) == before
