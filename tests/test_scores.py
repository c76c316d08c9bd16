"""What counts as a score: numbers, dicts and scalar tensors, the last stdout line of a
command, and score files (CSV/JSON) given with --scores."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from modelsoups.errors import EvaluationError, SoupError
from modelsoups.evaluate import Score, parse_score_line, to_score
from modelsoups.scores import load_scores


def test_to_score_accepts_numbers_dicts_and_scalar_tensors() -> None:
    assert to_score(0.5, "c") == Score(0.5)
    assert to_score(torch.tensor(0.25), "c") == Score(0.25)
    assert to_score({"score": 1, "loss": 2.0, "note": "x"}, "c") == Score(1.0, {"loss": 2.0})


@pytest.mark.parametrize(
    ("value", "match"),
    [(float("nan"), "not a finite"), (math.inf, "not a finite"), ("0.9", "str"),
     ({"acc": 1.0}, "without a 'score'"), (None, "NoneType"), (True, "bool")],
)  # fmt: skip
def test_to_score_rejects_non_scores_naming_the_candidate(value: object, match: str) -> None:
    with pytest.raises(EvaluationError, match=f"candidate 'soup\\+run3'.*{match}"):
        to_score(value, "soup+run3")


def test_score_line_is_the_last_stdout_line() -> None:
    assert parse_score_line("loading...\n0.75\n\n", "c").score == 0.75
    assert parse_score_line('x\n{"score": 0.5, "top5": 0.9}\n', "c") == Score(0.5, {"top5": 0.9})
    for bad in ("", "accuracy: 0.75", '{"acc": 1}', "[0.5]", "nan"):
        with pytest.raises(EvaluationError, match="candidate 'c'"):
            parse_score_line(bad, "c")


def test_load_scores_reads_csv_and_json(tmp_path: Path) -> None:
    names = ["run0", "run1"]
    (tmp_path / "s.csv").write_text("model_name,lr,score\nrun0,0.1,0.5\nrun1,0.2,0.7\n")
    (tmp_path / "t.csv").write_text("name,acc\nrun1,0.7\nrun0,0.5\n")
    (tmp_path / "s.json").write_text('{"run0": 0.5, "run1": {"score": 0.7}}')
    (tmp_path / "p.csv").write_text("path,score\nruns/run0.safetensors,0.5\nrun1.pt,0.7\n")
    (tmp_path / "l.json").write_text('[{"model_name": "run0", "score": 0.5},'
                                     ' {"model_name": "run1", "score": 0.7}]')  # fmt: skip
    for f in ("s.csv", "t.csv", "s.json", "l.json", "p.csv"):
        assert load_scores(tmp_path / f, names) == {"run0": 0.5, "run1": 0.7}


def test_load_scores_missing_or_unknown_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text('{"run0": 0.5, "run9": 0.7}')
    with pytest.raises(SoupError, match=r"no score for ingredient.*run1"):
        load_scores(tmp_path / "s.json", ["run0", "run1"])
    with pytest.raises(SoupError, match=r"unknown ingredient.*run9"):
        load_scores(tmp_path / "s.json", ["run0"])
    with pytest.raises(SoupError, match="cannot read"):
        load_scores(tmp_path / "nope.csv", ["run0"])
