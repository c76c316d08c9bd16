"""`soup report`: table in the terminal, plot as PNG, everything as one HTML page."""

from __future__ import annotations

import base64
import json
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from modelsoups.cli import main
from modelsoups.report import load_report

PNG = b"\x89PNG\r\n\x1a\n"

EVAL = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from safetensors.numpy import load_file

    sd = load_file(sys.argv[1])
    ref = load_file(Path(__file__).parent / "run0.safetensors")
    print(round(-float(((sd["fc.weight"].astype("f8") - ref["fc.weight"]) ** 2).sum()) * 1e4, 4))
    """
)


@pytest.fixture
def greedy_report(tmp_path: Path, make_ingredients: Callable[..., list[Path]]) -> Path:
    """A real greedy run: 4 ingredients, an eval command, a report and a history."""
    paths = make_ingredients(4)
    (tmp_path / "eval.py").write_text(EVAL)
    command = f"{sys.executable} {tmp_path / 'eval.py'} {{ckpt}}"
    out = tmp_path / "soup.safetensors"
    argv = ["greedy", *map(str, paths), "--eval", command, "--test-eval", command]
    assert main([*argv, "-o", str(out), "-q"]) == 0
    return tmp_path / "soup.report.json"


def test_greedy_report_table_png_and_html(
    greedy_report: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    view = load_report(greedy_report)
    assert [r.name for r in view.ingredients] == ["run0", "run1", "run2", "run3"]
    assert all(r.held_out is not None for r in view.ingredients)
    assert view.soups[0].held_out is not None and view.soups[0].test is not None
    assert view.curve and view.curve[0][0] == 1.0  # soup size 1: the best ingredient

    png = tmp_path / "report.png"
    assert main(["report", str(greedy_report), "-o", str(png)]) == 0
    table = capsys.readouterr().out
    for name in ("run0", "run1", "run2", "run3", "greedy soup"):
        assert name in table
    assert f"{view.soups[0].held_out:.6g}" in table
    assert png.read_bytes().startswith(PNG) and png.stat().st_size > 10_000

    page = tmp_path / "report.html"
    assert main(["report", str(greedy_report), "-o", str(page)]) == 0
    text = page.read_text()
    assert text.count("<tr") == 1 + 4 + 1  # header, ingredients, soup
    image = re.search(r'src="data:image/png;base64,([^"]+)"', text)
    assert image and base64.b64decode(image.group(1)).startswith(PNG)


def test_sweep_report_plots_the_curve(tmp_path: Path) -> None:
    report = {
        "recipe": "wise-ft", "alpha": 0.5, "dataset": "val", "weights": [0.5, 0.5],
        "ingredients": ["zeroshot.safetensors", "finetuned.safetensors"],
        "sweep": [{"model_name": f"wise-ft_alpha={a:g}", "val": s, "alpha": a}
                  for a, s in ((0.0, 0.61), (0.5, 0.74), (1.0, 0.70))],
    }  # fmt: skip
    path = tmp_path / "wise.report.json"
    path.write_text(json.dumps(report))
    view = load_report(path)
    assert view.curve == [(0.0, 0.61), (0.5, 0.74), (1.0, 0.70)]
    assert view.soups[0].held_out == 0.74 and "alpha = 0.5" in view.soups[0].name
    assert main(["report", str(path), "-o", str(tmp_path / "wise.png")]) == 0
    assert (tmp_path / "wise.png").read_bytes().startswith(PNG)


def test_report_of_a_recipe_run_shows_the_recipe(
    tmp_path: Path, make_ingredients: Callable[..., list[Path]]
) -> None:
    make_ingredients(2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: uniform\nglob: 'run*.safetensors'\noutput: soup.safetensors\n")
    assert main(["run", str(recipe), "-q"]) == 0
    page = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "soup.report.json"), "-o", str(page)]) == 0
    assert "recipe.yaml" in page.read_text() and "method" in page.read_text()


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda p: p.write_text("{}"), [], "not a soup report"),
        (lambda p: p.write_text("{oops"), [], "not a JSON report"),
        (lambda p: None, [], "cannot read report"),
        (lambda p: p.write_text('{"recipe": "uniform"}'), ["-o", "r.pdf"], "as .png or .html"),
    ],
)
def test_report_errors(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    setup: Callable[[Path], object],
    args: list[str],
    message: str,
) -> None:
    path = tmp_path / "x.report.json"
    setup(path)
    assert main(["report", str(path), *args]) == 1
    assert message in capsys.readouterr().err


def test_report_refuses_to_overwrite(greedy_report: Path, tmp_path: Path) -> None:
    page = tmp_path / "exists.html"
    page.write_text("mine")
    assert main(["report", str(greedy_report), "-o", str(page)]) == 1
    assert page.read_text() == "mine"
    assert main(["report", str(greedy_report), "-o", str(page), "--overwrite"]) == 0
    assert page.read_text().startswith("<!doctype html>")
