"""`soup greedy --eval`: a failing evaluator keeps the history, writes nothing and resumes;
given scores files, worker processes and a test evaluator."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from distance_eval import distance_ingredients

from modelsoups.cli import main
from modelsoups.io import open_checkpoint


def _greedy(tmp_path: Path, paths: list[str], command: str, *extra: str) -> int:
    out = tmp_path / "soup.safetensors"
    return main(["greedy", *paths, "-o", str(out), "--eval", command, "-q", *extra])


@pytest.mark.parametrize(
    ("bad", "match"),
    [("raise SystemExit(2)", "exited with code 2"), ("print('garbage'); sys.exit()", "cannot read"),
     ("print('nan'); sys.exit()", "not a finite"), ("import time; time.sleep(30)", "timed out")],
)  # fmt: skip
def test_bad_evaluator_keeps_history_and_writes_nothing(tmp_path, capsys, bad, match) -> None:
    paths = distance_ingredients(tmp_path)
    # the 4th evaluation (the first greedy candidate) fails; ingredient scores are logged
    flaky = tmp_path / "flaky.py"
    flaky.write_text(
        "import os, sys, pathlib\n"
        f"n = pathlib.Path({str(tmp_path / 'count')!r})\n"
        "k = len(n.read_text()) if n.exists() else 0\n"
        "n.write_text('x' * (k + 1))\n"
        f"if k == 3:\n    {bad}\n"
        f"exec(open({str(tmp_path / 'ev.py')!r}).read())\n"
    )
    ref = paths[0]
    cmd = f"{sys.executable} {flaky} {{ckpt}} {ref}"
    assert _greedy(tmp_path, paths, cmd, "--eval-timeout", "2") == 1
    error = capsys.readouterr().err
    assert match in error and "greedy soup of 1 + run1" in error
    assert not (tmp_path / "soup.safetensors").exists()
    assert not list(tmp_path.glob(".soup*")) and not list(tmp_path.glob("*soup-candidate*"))
    history = tmp_path / "soup.history.jsonl"
    lines = [json.loads(x) for x in history.read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["ingredient"] * 3 + ["greedy"]
    if "exited" not in match:
        return
    # the evaluator works again: --resume evaluates only the two greedy candidates
    (tmp_path / "count").write_text("xxxxx")  # past the failing call
    assert _greedy(tmp_path, paths, cmd, "--resume") == 0
    assert len((tmp_path / "count").read_text()) == 5 + 2
    report = json.loads((tmp_path / "soup.report.json").read_text())
    assert report["selected"][0] == "run0" and sum(report["weights"]) == pytest.approx(1)
    with open_checkpoint(tmp_path / "soup.safetensors") as c:
        assert c.metadata["recipe"] == "greedy"


def test_greedy_cli_with_scores_file_and_workers(tmp_path: Path, capsys) -> None:
    paths = distance_ingredients(tmp_path, 3)
    (tmp_path / "scores.csv").write_text("name,score\nrun0,3\nrun1,2\nrun2,1\n")
    cmd = f"{sys.executable} {tmp_path / 'ev.py'} {{ckpt}} {paths[0]}"
    test_cmd = f"{sys.executable} -c 'print(0.25)' {{ckpt}}"
    rc = _greedy(tmp_path, paths, cmd, "--scores", str(tmp_path / "scores.csv"), "--workers", "2",
                 "--test-eval", test_cmd)  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "soup.report.json").read_text())
    assert report["test"] == {"score": 0.25} and report["held_out"] != 0.25
    lines = [json.loads(x) for x in (tmp_path / "soup.history.jsonl").read_text().splitlines()]
    assert all(x.get("given") for x in lines if x["kind"] == "ingredient")
    (tmp_path / "bad.csv").write_text("name,score\nrun0,3\n")
    out2 = tmp_path / "soup2.safetensors"
    assert main(["greedy", *paths, "-o", str(out2), "--eval", cmd,
                 "--scores", str(tmp_path / "bad.csv")]) == 1  # fmt: skip
    assert "no score for ingredient" in capsys.readouterr().err


def test_resume_with_another_eval_command_is_refused_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = distance_ingredients(tmp_path)
    monkeypatch.chdir(tmp_path)  # short commands: the error line names both in full
    cmd = f"{sys.executable} ev.py {{ckpt}} run0.safetensors"
    assert _greedy(tmp_path, paths, cmd) == 0
    history = tmp_path / "soup.history.jsonl"
    logged = history.read_bytes()
    assert {json.loads(x)["scorer"]["eval"] for x in logged.splitlines()} == {cmd}
    for f in ("soup.safetensors", "soup.report.json"):
        (tmp_path / f).unlink()
    capsys.readouterr()
    other = f"{sys.executable} ev.py {{ckpt}} run1.safetensors"
    assert _greedy(tmp_path, paths, other, "--resume") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("soup: error: "), err
    assert f"eval={cmd!r}" in err and f"eval={other!r}" in err, err
    assert history.read_bytes() == logged
    assert sorted(p.name for p in tmp_path.glob("soup*")) == ["soup.history.jsonl"]
    assert _greedy(tmp_path, paths, cmd, "--resume") == 0  # the same command: replayed
    assert history.read_bytes() == logged


def test_an_old_history_without_scorer_fields_resumes(tmp_path: Path) -> None:
    paths = distance_ingredients(tmp_path)
    cmd = f"{sys.executable} {tmp_path / 'ev.py'} {{ckpt}} {paths[0]}"
    assert _greedy(tmp_path, paths, cmd) == 0
    report = json.loads((tmp_path / "soup.report.json").read_text())
    history = tmp_path / "soup.history.jsonl"
    old = [json.loads(x) for x in history.read_text().splitlines()][:-1]  # crashed: last step
    history.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "scorer"}) + "\n"
                               for r in old))  # fmt: skip
    for f in ("soup.safetensors", "soup.report.json"):
        (tmp_path / f).unlink()
    assert _greedy(tmp_path, paths, cmd, "--resume") == 0
    assert json.loads((tmp_path / "soup.report.json").read_text())["selected"] == report["selected"]
    lines = [json.loads(x) for x in history.read_text().splitlines()]
    assert ["scorer" in r for r in lines] == [False] * len(old) + [True]
