"""The `soup` command: subcommands mirror the Python API; errors are one line + exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import reference_mean, tiny_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from modelsoups.cli import main


def test_uniform_command_writes_the_mean(make_ingredients, tmp_path, capsys) -> None:
    paths = make_ingredients(3)
    out = tmp_path / "soup.safetensors"
    assert main(["uniform", *map(str, paths), "-o", str(out)]) == 0
    ref = reference_mean([tiny_state_dict(i) for i in range(3)])
    torch.testing.assert_close(load_file(out)["fc.weight"].double(), ref["fc.weight"])
    assert "wrote" in capsys.readouterr().out


def test_weighted_command_takes_weights_and_options(make_ingredients, tmp_path) -> None:
    paths = make_ingredients(2)
    out = tmp_path / "soup"
    code = main(
        ["weighted", *map(str, paths), "--weights", "3,1", "-o", str(out), "--dtype", "bf16",
         "--max-shard-size", "300B", "--quiet"]
    )  # fmt: skip
    assert code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    first = out / sorted(set(index["weight_map"].values()))[0]
    with safe_open(first, "pt") as f:
        assert json.loads(f.metadata()["weights"]) == [0.75, 0.25]


def test_negative_weights_need_allow_negative(make_ingredients, tmp_path, capsys) -> None:
    paths = [str(p) for p in make_ingredients(2)]
    out = tmp_path / "soup.safetensors"
    assert main(["weighted", *paths, "--weights", "2,-1", "-o", str(out)]) == 1
    assert "--allow-negative" in capsys.readouterr().err
    assert not out.exists()
    argv = ["weighted", *paths, "--weights", "2,-1", "--no-normalize", "--allow-negative"]
    assert main([*argv, "-o", str(out)]) == 0


def test_inspect_reports_formats_and_verdict(make_ingredients, capsys) -> None:
    paths = make_ingredients(2, "hf-sharded")
    assert main(["inspect", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "hf folder" in out and "compatible" in out


def test_inspect_exits_nonzero_for_an_incompatible_set(tmp_path, capsys) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.zeros(2)}, a)
    torch.save({"w": torch.zeros(3)}, b)
    assert main(["inspect", str(a), str(b)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'w'" in err and str(b) in err


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys) -> None:
    missing = tmp_path / "missing.safetensors"
    assert main(["uniform", str(missing), "-o", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("soup: error:") and err.count("\n") == 1 and str(missing) in err
    with pytest.raises(Exception, match="no such file"):
        main(["uniform", str(missing), "-o", str(tmp_path / "o.safetensors"), "--debug"])


def test_usage_errors_exit_with_2(capsys) -> None:
    assert main(["uniform"]) == 2


def test_console_script_runs_in_a_fresh_process(make_ingredients, tmp_path) -> None:
    paths = make_ingredients(2, "pt")
    out = tmp_path / "soup.safetensors"
    cmd = [sys.executable, "-m", "modelsoups", "uniform", *map(str, paths), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    help_proc = subprocess.run(
        [sys.executable, "-c", "import sys, modelsoups.cli; print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert help_proc.stdout.strip() == "False", "the CLI must import torch lazily"


def test_recipe_commands_live_in_their_own_modules() -> None:
    """greedy, the two sweeps and stock each register from their own module; the similarity
    tables are `soup inspect`'s (core)."""
    import typer

    from modelsoups.cli import core, greedy, stock, sweeps

    names = {}
    for module in (greedy, sweeps, stock):
        app = typer.Typer()
        module.register(app)
        names[module.__name__] = sorted(
            c.name or c.callback.__name__ for c in app.registered_commands if c.callback
        )
    assert names == {
        "modelsoups.cli.greedy": ["greedy"],
        "modelsoups.cli.sweeps": ["task-arithmetic", "wise-ft"],
        "modelsoups.cli.stock": ["stock"],
    }
    assert callable(core.print_similarity)


def test_option_help_has_no_square_brackets_that_rich_would_swallow_as_markup() -> None:
    import typer

    from modelsoups.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert "uniform" in commands and "demo" in commands
    for name, command in commands.items():
        for param in command.params:
            text = getattr(param, "help", None) or ""
            assert "[" not in text, f"soup {name} {param.name}: {text!r}"


@pytest.mark.parametrize(
    "command", [["greedy"], ["wise-ft", "--alphas", "0:1:0.5"]], ids=["greedy", "wise-ft"]
)
def test_max_shard_size_with_a_file_output_fails_before_any_evaluation(
    command: list[str], tmp_path, make_ingredients, capsys
) -> None:
    """--max-shard-size needs a folder output: refused up front, not after N evaluations."""
    paths = make_ingredients(2)
    calls = tmp_path / "calls.txt"
    script = tmp_path / "ev.py"
    script.write_text(f"open({str(calls)!r}, 'a').write('x\\n'); print(1.0)")
    out = tmp_path / "soup.safetensors"
    cmd = f"{sys.executable} {script} {{ckpt}}"
    argv = [*map(str, paths), "-o", str(out), "--eval", cmd, "--max-shard-size", "1MB", "-q"]
    assert main([command[0], *argv, *command[1:]]) == 1
    assert "--max-shard-size writes a folder" in capsys.readouterr().err
    assert not calls.exists() and not out.exists()


def test_help_shows_flags_as_flags_and_arguments_in_click_style(capsys) -> None:
    from modelsoups.cli.root import command

    for name in ["", *command().commands]:
        assert main([name, "--help"] if name else ["--help"]) == 0
        out = capsys.readouterr().out
        usage = next(line for line in out.splitlines() if "Usage:" in line)
        assert "<bool>" not in out, name
        assert "{" not in usage, (name, usage)
    main(["greedy", "--help"])
    out = capsys.readouterr().out
    assert "INPUTS..." in out
    assert "<float>" in out  # options that take a value still say which


def test_soup_command_options_are_declared_once_in_options_py() -> None:
    """The soup commands take their options from cli/options.py (one declaration each) and
    pass typed bundles on: no `typer.Option(...)` of their own, no `dict(locals())`."""
    import modelsoups.cli as cli

    folder = Path(cli.__file__).parent
    for name in ("core", "greedy", "sweeps", "stock", "learned", "evaluate", "lora", "outputs"):
        source = (folder / f"{name}.py").read_text()
        for banned in ("typer.Option(", "typer.Argument(", "locals()"):
            assert banned not in source, f"cli/{name}.py: {banned}"
