"""`soup run recipe.yaml`: same soups as the commands, every option a field, one-line errors."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelsoups.cli import main
from modelsoups.cli.run import _POSITIONAL, _RENAMES, command_params, recipe_argv
from modelsoups.recipe_file import _ALWAYS, METHOD_FIELDS, Recipe, load_recipe

# Scores a candidate by its closeness to run0; the test split scores 1000 higher so that a
# test score can never pass for a held-out one.
EVAL = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from safetensors.numpy import load_file

    ckpt, split = Path(sys.argv[1]), sys.argv[2]
    sd, ref = load_file(ckpt), load_file(Path(__file__).parent / "run0.safetensors")
    d = sum(float(((sd[k].astype("f8") - ref[k]) ** 2).sum()) for k in ("fc.weight",))
    print(round(-d * 1e4, 4) + (1000 if split == "test" else 0))
    """
)


def _write(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_every_command_option_has_a_recipe_field() -> None:
    """Both ways: each option of each soup command is a field, each field an option."""
    for method, allowed in METHOD_FIELDS.items():
        mapped = set()
        for p in command_params(method):
            name = str(p.name)
            if name in _POSITIONAL:
                continue
            field = _RENAMES.get(name, name)
            assert field in Recipe.model_fields, f"soup {method} --{name} has no recipe field"
            mapped.add(field)
        assert mapped - _ALWAYS <= allowed, (method, mapped - _ALWAYS - allowed)
        # splits fill --eval/--test-eval; `soup run` writes the report of uniform/weighted;
        # wise-ft's base is its first argument
        assert allowed - mapped <= {"splits", "report", "base"}, (method, allowed - mapped)


def test_a_recipe_field_with_a_default_has_the_options_default() -> None:
    """A field the recipe does not leave to the command (default not None) has the same
    default as the option in every command that has it: a recipe that says nothing about
    `accept` or `memory` makes the soup `soup greedy` makes without the flag."""
    checked = set()
    for method in METHOD_FIELDS:
        for p in command_params(method):
            name = str(p.name)
            field = Recipe.model_fields.get(name)
            if name in _POSITIONAL or name in _RENAMES or field is None:
                continue
            if field.is_required() or field.default is None:  # None: the command's default
                continue
            assert field.default == p.default, (method, name, field.default, p.default)
            checked.add(name)
    assert {"accept", "tolerance", "memory", "workers", "accumulate", "normalize"} <= checked


def test_uniform_recipe_equals_the_command(
    tmp_path: Path, make_ingredients: Callable[..., list[Path]]
) -> None:
    paths = make_ingredients(3)
    recipe = _write(
        tmp_path,
        """
        method: uniform
        glob: "run*.safetensors"
        output: soup.safetensors
        dtype: fp16
        accumulate: float64
        """,
    )
    assert main(["run", str(recipe), "-q"]) == 0
    direct = tmp_path / "direct.safetensors"
    argv = ["uniform", *map(str, paths), "-o", str(direct), "--dtype", "fp16"]
    assert main([*argv, "--accumulate", "float64", "-q"]) == 0
    a, b = load_file(tmp_path / "soup.safetensors"), load_file(direct)
    assert a["fc.weight"].dtype == torch.float16
    assert all(torch.equal(a[k], b[k]) for k in a)

    report = json.loads((tmp_path / "soup.report.json").read_text())
    assert report["recipe"] == "uniform" and report["weights"] == pytest.approx([1 / 3] * 3)
    stored = report["recipe_file"]
    assert stored["recipe"] == {"method": "uniform", "glob": "run*.safetensors",
                                "output": "soup.safetensors", "dtype": "fp16",
                                "accumulate": "float64"}  # fmt: skip
    assert len(stored["sha256"]) == 64 and stored["command"].startswith("soup uniform run0")


def test_greedy_recipe_with_splits_stores_itself_in_the_report(
    tmp_path: Path, make_ingredients: Callable[..., list[Path]]
) -> None:
    make_ingredients(4)
    (tmp_path / "eval.py").write_text(EVAL)
    recipe = _write(
        tmp_path,
        f"""
        method: greedy
        ingredients: [run0.safetensors, run1.safetensors]
        glob: [run2.safetensors, run3.safetensors]
        output: soup.safetensors
        evaluator:
          command: "{sys.executable} eval.py {{ckpt}} {{split}}"
          timeout: 60
        splits: {{held_out: val, test: test}}
        accept: gt
        """,
    )
    assert main(["run", str(recipe), "-q"]) == 0
    report = json.loads((tmp_path / "soup.report.json").read_text())
    assert report["dataset"] == "val" and report["selected"][0] == "run0"
    assert report["test"]["score"] > 900  # the test split was evaluated, once, on the soup
    assert report["held_out"] < 900
    assert report["recipe_file"]["recipe"]["accept"] == "gt"
    assert (tmp_path / "soup.history.jsonl").is_file()


def test_sweep_and_dry_run(
    tmp_path: Path, make_ingredients: Callable[..., list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    make_ingredients(2)
    recipe = _write(
        tmp_path,
        """
        method: wise-ft
        base: run0.safetensors
        ingredients: [run1.safetensors]
        alphas: [0, 0.5, 1]
        evaluator: {command: "python eval.py {ckpt}"}
        output: wise
        max_shard_size: 1KB
        workers: 2
        """,
    )
    assert main(["run", str(recipe), "--dry-run"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == (
        "soup wise-ft run0.safetensors run1.safetensors --output wise --alphas 0,0.5,1 "
        "--eval 'python eval.py {ckpt}' --workers 2 --max-shard-size 1KB"
    )
    assert not (tmp_path / "wise").exists()


def test_argv_flags_and_lists() -> None:
    r = Recipe(
        method="weighted",
        ingredients=["a.pt", "b.pt"],
        output="s.safetensors",
        weights=[0.7, 0.3],
        normalize=False,
        unsafe_pickle=True,
        key="state_dict",
    )
    argv = recipe_argv(r, ["a.pt", "b.pt"])
    assert argv[:3] == ["weighted", "a.pt", "b.pt"]
    assert "--no-normalize" in argv and "--unsafe-pickle" in argv and "--allow-negative" not in argv
    assert argv[argv.index("--weights") + 1] == "0.7,0.3"
    assert argv[argv.index("--key") + 1] == "state_dict"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "method: weighted\nglob: '*.pt'\noutput: s.safetensors\nweights: [0.5, x]\n",
            "recipe.yaml: weights.1: Input should be a valid number",
        ),
        (
            "method: uniform\nglob: '*.pt'\noutput: s.safetensors\ndtpye: fp16\n",
            "recipe.yaml: dtpye: unknown field (did you mean 'dtype'?)",
        ),
        (
            "method: uniform\nglob: '*.pt'\noutput: s.safetensors\nalpha: 0.5\n",
            "recipe.yaml: alpha: not an option of method 'uniform'",
        ),
        ("method: uniform\nglob: '*.pt'\n", "recipe.yaml: output: required field is missing"),
        (
            "method: soupify\nglob: '*.pt'\noutput: s\n",
            "recipe.yaml: method: Input should be 'uniform', 'weighted', 'greedy'",
        ),
        (
            "method: greedy\nglob: '*.pt'\noutput: s\nevaluator: {command: python eval.py}\n",
            "recipe.yaml: evaluator: command must contain {ckpt}",
        ),
        (
            "method: greedy\nglob: '*.pt'\noutput: s\nevaluator: {command: \"e {ckpt}\"}\n"
            "splits: {test: t}\n",
            "recipe.yaml: evaluator.command: put {split} where the split name goes",
        ),
        (
            "method: greedy\nglob: '*.pt'\noutput: s\nworkers: 0\n",
            "recipe.yaml: workers: Input should be greater than or equal to 1",
        ),
        (
            "method: stock\nglob: '*.pt'\noutput: s\n",
            "recipe.yaml: base: method 'stock' needs the pretrained model",
        ),
        ("method: uniform\noutput: s\n", "recipe.yaml: give the ingredients"),
        ("method: uniform\n  output: s\n", "recipe.yaml: line 2: not valid YAML"),
        ("- uniform\n", "recipe.yaml: a recipe is a mapping"),
        (
            "method: uniform\nglob: 'nothing*.pt'\noutput: s.safetensors\n",
            "glob: 'nothing*.pt' matches no file",
        ),
    ],
)
def test_bad_recipes_fail_in_one_line_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    recipe = _write(tmp_path, text)
    cwd = os.getcwd()
    assert main(["run", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("soup: error: ")
    assert message in err, err
    assert not (tmp_path / "s.safetensors").exists()
    assert os.getcwd() == cwd != str(tmp_path)  # run in the recipe's folder, then back


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_a_recipe_that_is_a_fifo_is_refused_without_waiting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dry_run: list[str]
) -> None:
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    assert main(["run", *dry_run, str(fifo)]) == 1
    err = capsys.readouterr().err
    assert err == f"soup: error: {fifo}: not a regular file; a recipe is a YAML file\n"


def test_schema_and_python_api(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "max_shard_size" in schema["properties"]
    recipe = _write(tmp_path, "method: uniform\ningredients: [a.pt]\noutput: s.safetensors\n")
    r, source = load_recipe(recipe)
    assert r.method == "uniform" and source["path"] == str(recipe)


# A non-default value for every field a method can have: the argv must parse, and each
# value must arrive in the command's parameter of the same meaning.
FULL = {
    "weights": [0.6, 0.4], "normalize": False, "allow_negative": True, "alpha": 0.3,
    "alphas": "0:1:0.5", "scale": 0.7, "scales": [0.5, 1.0], "scores": "s.csv",
    "accept": "gt", "tolerance": 0.01, "dataset": "val", "history": "h.jsonl",
    "report": "r.json", "resume": True, "workers": 3, "ray": True, "ray_address": "auto",
    "key": "state_dict", "unsafe_pickle": True, "dtype": "bf16", "accumulate": "float64",
    "non_float": "first", "allow_nonfinite": True, "max_shard_size": "1GB", "overwrite": True,
    "quiet": True, "base": "base.pt", "evaluator": {"command": "e {ckpt} {split}", "timeout": 9},
    "splits": {"held_out": "val", "test": "tst"}, "memory": "1GiB", "workdir": "scratch",
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(METHOD_FIELDS))
def test_every_field_reaches_its_option(method: str) -> None:
    import typer.main

    from modelsoups.cli import app

    fields = {k: v for k, v in FULL.items() if k in METHOD_FIELDS[method]}
    if method != "greedy":
        fields.get("splits", {}).pop("test", None)
    ingredients = ["a.pt"] if method == "wise-ft" else ["a.pt", "b.pt"]
    recipe = Recipe.model_validate(
        {"method": method, "ingredients": ingredients, "output": "o", **fields}
    )
    argv = recipe_argv(recipe, ingredients)
    command = typer.main.get_command(app).commands[method]  # type: ignore[attr-defined]
    params = command.make_context(method, argv[1:]).params
    for name, value in params.items():
        field = _RENAMES.get(name, name)
        if name in _POSITIONAL or field not in fields:
            continue
        want = fields[field]
        if name == "eval_command":
            want = "e {ckpt} val"
        elif name == "test_eval":
            want = "e {ckpt} tst"
        elif name == "eval_timeout":
            want = 9
        elif isinstance(want, list):
            want = ",".join(f"{v:g}" for v in want)
        assert value == want or str(value) == str(want), (method, name, value, want)


def test_adapter_fields_become_the_commands_lora_options() -> None:
    recipe = Recipe(method="weighted", output="soup", ingredients=["a1", "a2"],
                    weights=[0.5, 0.5], merge_into="base", rank=8, lora_average="exact",
                    allow_different_base=True)  # fmt: skip
    argv = recipe_argv(recipe, ["a1", "a2"])
    for flag, value in (("--merge-into", "base"), ("--rank", "8"), ("--lora-average", "exact")):
        assert argv[argv.index(flag) + 1] == value
    assert "--allow-different-base" in argv
