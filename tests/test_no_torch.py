"""Soups of safetensors files never import torch (it costs ~2 s of start-up); pickles do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import reference_mean, save_as, tiny_state_dict
from safetensors.torch import load_file

# Runs `soup ARGS...` in-process, then says whether torch was imported along the way.
WRAPPER = """
import sys
from modelsoups.cli import main
code = main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


def soup(*args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("fmt", ["safetensors", "hf-folder", "hf-sharded"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_uniform_soup_of_safetensors_does_not_import_torch(
    make_ingredients, tmp_path: Path, fmt: str, dtype: torch.dtype | None
) -> None:
    paths = make_ingredients(3, fmt, dtype=dtype)
    out = tmp_path / "soup.safetensors"
    code, output = soup("uniform", *map(str, paths), "-o", str(out))
    assert code == 0, output
    assert "torch imported: False" in output
    if dtype is None:
        ref = reference_mean([tiny_state_dict(i) for i in range(3)])
        torch.testing.assert_close(load_file(out)["fc.weight"].double(), ref["fc.weight"])


def test_weighted_soup_and_inspect_do_not_import_torch(make_ingredients, tmp_path: Path) -> None:
    paths = [str(p) for p in make_ingredients(3)]
    out = tmp_path / "soup"
    argv = ["weighted", *paths, "--weights", "1,2,3", "--dtype", "bf16", "-o", str(out)]
    code, output = soup(*argv, "--max-shard-size", "300B")
    assert code == 0, output
    assert "torch imported: False" in output
    code, output = soup("inspect", *paths, "--base", paths[0])
    assert code == 0, output
    assert "compatible" in output and "torch imported: False" in output


def test_refusals_do_not_import_torch(make_ingredients, tmp_path: Path) -> None:
    """The error paths (here NaN naming the input) stay torch-free too."""
    paths = make_ingredients(2)
    sd = tiny_state_dict(5)
    sd["fc.bias"][1] = float("nan")
    bad = save_as(sd, tmp_path / "nan", "safetensors")
    code, output = soup("uniform", *map(str, paths), str(bad), "-o", str(tmp_path / "s"))
    assert code == 1 and "NaN or Inf" in output and "nan.safetensors" in output
    assert "torch imported: False" in output


def test_pickle_inputs_still_soup(make_ingredients, tmp_path: Path) -> None:
    """Pickles need torch.load: torch is imported for them, and the soup is the same."""
    paths = make_ingredients(3, "pt")
    out = tmp_path / "soup.safetensors"
    code, output = soup("uniform", *map(str, paths), "-o", str(out))
    assert code == 0, output
    assert "torch imported: True" in output
    ref = reference_mean([tiny_state_dict(i) for i in range(3)])
    for k, v in ref.items():
        got = load_file(out)[k]
        if v.is_floating_point():
            torch.testing.assert_close(got.double(), v, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got, v)


@pytest.mark.parametrize("argv", [[], ["--help"], ["uniform", "--help"], ["greedy", "--help"]])
def test_cli_import_and_help_import_neither_numpy_nor_torch(argv: list[str]) -> None:
    """`soup --help` starts fast: the CLI imports the readers (numpy) and torch only in the
    commands that read checkpoints."""
    code = (
        "import sys\nfrom modelsoups.cli import main\n"
        "if sys.argv[1:]:\n    main(sys.argv[1:])\n"
        "print(sorted(m for m in ('numpy', 'torch', 'safetensors') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:]


def test_stock_of_safetensors_does_not_import_torch(make_ingredients, tmp_path: Path) -> None:
    """Model Stock streams through numpy like uniform: no torch import (~1-2 s)."""
    base, *fts = map(str, make_ingredients(3))
    out = tmp_path / "stock.safetensors"
    code, output = soup("stock", *fts, "--base", base, "-o", str(out))
    assert code == 0, output
    assert "torch imported: False" in output
    assert out.exists()
