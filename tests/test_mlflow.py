"""Ingredients and their held-out scores from an MLflow experiment (local file-based store)."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import save_as, tiny_state_dict
from safetensors.torch import load_file

from modelsoups.cli import main
from modelsoups.errors import SoupError

mlflow = pytest.importorskip("mlflow")

from modelsoups.integrations.mlflow import fetch_ingredients, write_scores  # noqa: E402

SCORES = {"lr=1e-4": 0.71, "lr=3e-4": 0.74, "lr=1e-3": 0.69}

EVAL = textwrap.dedent(
    """
    import sys
    from safetensors.numpy import load_file

    sd = load_file(sys.argv[1])
    print(round(float(sd["fc.bias"].astype("f8").sum()), 6))
    """
)


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow reports usage unless told not to: nothing leaves this machine in tests."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A file-based tracking folder: three finished runs with a checkpoint and a score,
    one failed run, and a run without the metric in a second experiment."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = (root / "mlruns").as_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # no calls out of this machine
        mp.setenv("DO_NOT_TRACK", "true")
        client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        sweep = client.create_experiment("sweep")
        for i, (name, score) in enumerate([*SCORES.items(), ("crashed", 0.9)]):
            run = client.create_run(sweep, run_name=name)
            (root / f"ckpt{i}").mkdir()
            ckpt = save_as(tiny_state_dict(i), root / f"ckpt{i}" / "model", "safetensors")
            client.log_param(run.info.run_id, "lr", name)
            client.log_metric(run.info.run_id, "val_acc", score - 0.1, step=0)
            client.log_metric(run.info.run_id, "val_acc", score, step=1)  # the last counts
            client.log_artifact(run.info.run_id, str(ckpt))
            client.set_terminated(run.info.run_id, "FAILED" if name == "crashed" else "FINISHED")
        other = client.create_experiment("no-metric")
        run = client.create_run(other, run_name="lonely")
        client.log_metric(run.info.run_id, "loss", 0.3)
        client.set_terminated(run.info.run_id)
    yield uri


def test_fetch_downloads_finished_runs_with_their_scores(tracking: str, tmp_path: Path) -> None:
    found = fetch_ingredients("sweep", metric="val_acc", dst=tmp_path, tracking_uri=tracking)
    assert {i.name: i.score for i in found} == SCORES  # the failed run is left out
    for i in found:
        assert i.path == tmp_path / f"{i.name}.safetensors"
        assert "fc.weight" in load_file(i.path)
    scores = write_scores(found, tmp_path / "scores.json")
    assert json.loads(scores.read_text()) == SCORES
    listed = fetch_ingredients(
        "sweep", metric="val_acc", dst=tmp_path / "x", tracking_uri=tracking, download=False
    )
    assert [i.name for i in listed] == [i.name for i in found] and not (tmp_path / "x").exists()


def test_filter(tracking: str, tmp_path: Path) -> None:
    found = fetch_ingredients("sweep", metric="val_acc", dst=tmp_path, tracking_uri=tracking,
                              filter_string="params.lr = 'lr=1e-3'")  # fmt: skip
    assert [i.name for i in found] == ["lr=1e-3"]


def test_greedy_recipe_from_mlflow_uses_the_logged_scores(tracking: str, tmp_path: Path) -> None:
    (tmp_path / "eval.py").write_text(EVAL)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            method: greedy
            mlflow: {{experiment: sweep, metric: val_acc, tracking_uri: "{tracking}"}}
            evaluator: {{command: "{sys.executable} eval.py {{ckpt}}"}}
            output: soup.safetensors
            """
        )
    )
    assert main(["run", str(recipe), "-q"]) == 0
    report = json.loads((tmp_path / "soup.report.json").read_text())
    assert report["selected"][0] == "lr=3e-4"  # sorted by the logged scores, best first
    by_name = {i["name"]: i["held_out"] for i in report["ingredients"]}
    assert by_name == SCORES
    history = (tmp_path / "soup.history.jsonl").read_text().splitlines()
    given = [json.loads(ln) for ln in history if '"ingredient"' in ln]
    assert all(r.get("given") for r in given)  # no ingredient was evaluated again
    assert (tmp_path / "soup.ingredients" / "scores.json").is_file()


@pytest.mark.parametrize(
    ("experiment", "metric", "artifact", "message"),
    [
        ("nope", "val_acc", "model.safetensors", "no experiment 'nope' (there are:"),
        ("no-metric", "val_acc", "model.safetensors", "no metric 'val_acc' (it logged ['loss'])"),
        ("sweep", "val_acc", "weights.bin", "cannot download artifact 'weights.bin'"),
    ],
)
def test_errors_name_the_run_and_the_fix(
    tracking: str, tmp_path: Path, experiment: str, metric: str, artifact: str, message: str
) -> None:
    with pytest.raises(SoupError) as e:
        fetch_ingredients(experiment, metric=metric, artifact=artifact, dst=tmp_path,
                          tracking_uri=tracking)  # fmt: skip
    assert message in str(e.value)


def test_missing_mlflow_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(SoupError, match=r"pip install 'modelsoups\[mlflow\]'"):
        fetch_ingredients("sweep", metric="val_acc", dst=tmp_path)


def test_cli_fetch_then_greedy_with_the_scores(tracking: str, tmp_path: Path) -> None:
    out = tmp_path / "ingredients"
    argv = ["mlflow", "sweep", "--metric", "val_acc", "--tracking-uri", tracking, "-o", str(out)]
    assert main([*argv, "-q"]) == 0
    assert sorted((out / "ingredients.txt").read_text().split()) == sorted(
        f"{n}.safetensors" for n in SCORES
    )
    (tmp_path / "eval.py").write_text(EVAL)
    command = f"{sys.executable} {tmp_path / 'eval.py'} {{ckpt}}"
    soup = tmp_path / "soup.safetensors"
    argv = ["greedy", str(out / "ingredients.txt"), "--scores", str(out / "scores.json")]
    assert main([*argv, "--eval", command, "-o", str(soup), "-q"]) == 0
    report = json.loads((tmp_path / "soup.report.json").read_text())
    assert report["selected"][0] == "lr=3e-4"
