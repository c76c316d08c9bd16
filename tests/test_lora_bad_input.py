"""Adapter soups asked to do something wrong: one line, exit 1, no output, inputs unchanged.

Every case runs the `soup` CLI in-process on real PEFT adapters of a tiny Llama (built once
for the module) copied into a fresh folder, and checks the error line names the culprit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from battery import one_error_line, snapshot
from conftest import save_as, tiny_state_dict
from lora_models import make_adapter, make_base

from modelsoups.cli import main
from modelsoups.cli.common import STATE

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, other-base, a, b (plain LoRA), qk (other targets), dora, loha, lokr, ia3,
    prompt (prompt tuning)."""
    root = tmp_path_factory.mktemp("lora-bad")
    base = make_base(root / "base")
    other = make_base(root / "other-base", hidden=48)
    make_adapter(base, root / "a", r=4, seed=1)
    make_adapter(base, root / "b", r=8, alpha=4, seed=2)
    make_adapter(other, root / "other", r=4, seed=3)
    make_adapter(base, root / "qk", targets=("q_proj", "k_proj"), seed=4)
    make_adapter(base, root / "dora", kind="dora", seed=5)
    make_adapter(base, root / "loha", kind="loha", modules_to_save=None, seed=6)
    for kind in ("lokr", "ia3", "prompt"):
        make_adapter(base, root / kind, kind=kind, modules_to_save=None, seed=7)
    return root


def _same_name_base(root: Path) -> list[str]:
    """Adapters of a base with the same shapes but another name."""
    cfg = root / "b" / "adapter_config.json"
    config = json.loads(cfg.read_text())
    config["base_model_name_or_path"] = "org/another-model"
    cfg.write_text(json.dumps(config))
    return ["uniform", "a", "b", "-o", "out"]


# the recipes that search or mix adapters refuse other base names as uniform does
SEARCHES = {
    "greedy": ["greedy", "a", "b", "--eval", "echo 1; : {ckpt}", "-o", "out"],
    "wise-ft": ["wise-ft", "a", "b", "--alpha", "0.3", "-o", "out"],
    "wise-ft sweep": ["wise-ft", "a", "b", "--alphas", "0,1", "--eval", "echo 1; : {ckpt}",
                      "-o", "out"],
    "task arithmetic": ["task-arithmetic", "a", "b", "--base", "base", "--scale", "0.5",
                        "-o", "out"],
}  # fmt: skip


def _after_renaming_base(argv: list[str]) -> Callable[[Path], list[str]]:
    def make(root: Path) -> list[str]:
        _same_name_base(root)
        return argv

    return make


def _missing_config(root: Path) -> list[str]:
    (root / "b" / "adapter_config.json").unlink()
    return ["uniform", "a", "b", "-o", "out"]


def _full_checkpoint(root: Path) -> list[str]:
    save_as(tiny_state_dict(0), root / "full.safetensors", "st")
    return ["uniform", "a", "full.safetensors", "-o", "out"]


def _bare_weights(root: Path) -> list[str]:
    (root / "b" / "adapter_config.json").unlink()
    return ["uniform", "a", "b/adapter_model.safetensors", "-o", "out"]


def _nan_adapter(root: Path) -> list[str]:
    from safetensors.torch import load_file, save_file

    file = root / "b" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})
    return ["wise-ft", "base", "b", "--alphas", "0,1", "--eval", "false {ckpt}", "-o", "out"]


def _remote_base(root: Path) -> list[str]:
    _same_name_base(root)
    (root / "ids.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    return ["eval", "b", "--metric", "lm-loss", "--data", "ids.jsonl"]


GREEDY = ["--eval", "false {ckpt}", "-o", "out"]

# (id, argv or a function of the folder making it, words the error line must contain)
CASES: list[tuple[str, list[str] | Callable[[Path], list[str]], list[str]]] = [
    ("different base models", ["uniform", "a", "other", "-o", "out"], ["other", "base model"]),
    ("different base names", _same_name_base, ["org/another-model", "--allow-different-base"]),
    ("different target modules", ["uniform", "a", "qk", "-o", "out"], ["qk", "k_proj"]),
    ("DoRA adapter", ["uniform", "a", "dora", "-o", "out"], ["dora", "DoRA"]),
    ("LoHa adapter", ["uniform", "a", "loha", "-o", "out"], ["loha", "LOHA"]),
    ("LoKr adapter", ["uniform", "a", "lokr", "-o", "out"], ["lokr", "a LOKR adapter"]),
    ("IA3 adapter", ["weighted", "ia3", "a", "--weights", "1,1", "-o", "out"],
     ["ia3", "an IA3 adapter"]),
    ("prompt tuning adapter", ["greedy", "a", "prompt", *["--eval", "false {ckpt}", "-o", "out"]],
     ["prompt", "PROMPT_TUNING"]),
    ("missing adapter_config.json", _missing_config, ["b", "adapter_config.json"]),
    ("adapter weights file alone", _bare_weights, ["b", "adapter_config.json"]),
    ("adapter next to a full checkpoint", _full_checkpoint, ["full.safetensors", "adapters"]),
    ("inspect of different targets", ["inspect", "a", "qk"], ["qk", "k_proj"]),
    ("rank zero", ["uniform", "a", "b", "-o", "out", "--rank", "0"], ["rank", "0"]),
    ("rank negative", ["uniform", "a", "b", "-o", "out", "--rank", "-3"], ["rank", "-3"]),
    ("unknown average", ["uniform", "a", "b", "-o", "out", "--lora-average", "mean"], ["mean"]),
    ("rank with factors",
     ["uniform", "a", "b", "-o", "out", "--rank", "4", "--lora-average", "factors"], ["rank"]),
    ("factors on ranks 4 and 8 weighted nan",
     ["weighted", "a", "b", "-o", "out", "--weights", "nan,1"], ["weights"]),
    ("merge into missing base",
     ["uniform", "a", "b", "-o", "out", "--merge-into", "nowhere"], ["nowhere"]),
    ("merge into the wrong base",
     ["uniform", "a", "b", "-o", "out", "--merge-into", "other-base"], ["other-base", "shape"]),
    ("output inside an input", ["uniform", "a", "b", "-o", "a/out"], ["a/out"]),
    ("adapter output named .safetensors",
     ["uniform", "a", "b", "-o", "out.safetensors"], ["out.safetensors", "folder"]),
    ("unnormalised weights with modules_to_save and no base",
     ["weighted", "a", "b", "-o", "out", "--weights", "1,1", "--no-normalize"],
     ["lm_head", "modules_to_save", "--merge-into"]),
    ("greedy over adapters of different bases", ["greedy", "a", "other", *GREEDY],
     ["other", "base model"]),
    ("greedy over a DoRA adapter", ["greedy", "a", "dora", *GREEDY], ["dora", "DoRA"]),
    ("wise-ft of the base and a LoHa adapter", ["wise-ft", "base", "loha", "-o", "out"],
     ["loha", "LOHA"]),
    ("wise-ft of an adapter and a full checkpoint",
     lambda r: ["wise-ft", "a", _full_checkpoint(r)[2], "-o", "out"],
     ["full.safetensors", "adapters"]),
    ("task arithmetic of adapters on the wrong base",
     ["task-arithmetic", "a", "b", "--base", "other-base", "--scale", "0.7", "-o", "out"],
     ["other-base", "lm_head"]),
    ("wise-ft sweep over an adapter holding NaN", _nan_adapter,
     ["b/adapter_model.safetensors", "lora_B", "NaN"]),
    ("eval of an adapter whose base is no local folder", _remote_base,
     ["org/another-model", "--model"]),
    ("greedy adapter soup named .safetensors",
     ["greedy", "a", "b", "--eval", "false {ckpt}", "-o", "out.safetensors"],
     ["out.safetensors", "folder"]),
    ("greedy merged into a missing base", ["greedy", "a", "b", *GREEDY, "--merge-into", "nobase"],
     ["nobase"]),
    ("merge-into on full checkpoints", lambda r: [
        "wise-ft", _full_checkpoint(r)[2], "full.safetensors", "-o", "o.safetensors",
        "--merge-into", "base"], ["--merge-into", "adapters"]),
    *[(f"{name} over adapters of other base names",
       _after_renaming_base(argv),
       ["org/another-model", "--allow-different-base"]) for name, argv in SEARCHES.items()],
    ("--allow-different-base on full checkpoints", lambda r: [
        "wise-ft", _full_checkpoint(r)[2], "full.safetensors", "-o", "o.safetensors",
        "--allow-different-base"], ["--allow-different-base", "adapters"]),
    ("rank on full checkpoints", lambda r: [
        *_full_checkpoint(r)[:1], "full.safetensors", "full.safetensors", "-o", "o.safetensors",
        "--rank", "2"], ["--rank", "adapters"]),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_adapter_input_fails_in_one_line_and_writes_nothing(
    argv: list[str] | Callable[[Path], list[str]],
    words: list[str],
    made: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "work"
    shutil.copytree(made, root)
    monkeypatch.chdir(root)
    args = argv(root) if callable(argv) else argv
    before = snapshot(root)
    STATE.update(quiet=False, debug=False)
    capsys.readouterr()
    rc = main(args)
    assert rc == 1
    one_error_line(capsys.readouterr().err, *words)
    assert snapshot(root) == before  # no output, no temporary, inputs byte-identical


def test_allow_different_base_soups_adapters_with_other_base_names(
    made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "work"
    shutil.copytree(made, root)
    monkeypatch.chdir(root)
    args = _same_name_base(root)
    assert main(args) == 1
    assert main([*args, "--allow-different-base", "-q"]) == 0
    assert json.loads((root / "out" / "adapter_config.json").read_text())["r"] == 12


@pytest.mark.parametrize("argv", list(SEARCHES.values()), ids=list(SEARCHES))
def test_allow_different_base_lets_searches_and_mixes_take_other_base_names(
    argv: list[str], made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """greedy, wise-ft and task arithmetic over adapters whose base names differ: refused,
    then accepted with --allow-different-base, writing an adapter of rank 4 + 8."""
    root = tmp_path / "work"
    shutil.copytree(made, root)
    monkeypatch.chdir(root)
    _same_name_base(root)
    assert main([*argv, "-q"]) == 1 and not (root / "out").exists()
    assert main([*argv, "--allow-different-base", "-q"]) == 0
    assert json.loads((root / "out" / "adapter_config.json").read_text())["r"] in (4, 8, 12)
