"""The bad-input battery, CLI side: option values, resumed histories, `soup report`, recipe
files, evaluator output and unwritable folders.

Same harness as `test_bad_input.py`: each case builds its inputs in a fresh folder, runs
`soup` in-process and must end with exit code 1, exactly one `soup: error: ...` line (at
most `MAX_LINE` characters) naming the culprit, no new or changed file (but a history the
case allows), and every input byte-for-byte unchanged. The values that look odd but are
valid (`--weights 1e308,1e308`, `--weights 1e-13,3e-13`, `--eval-timeout inf`) must work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from battery import Case, Ctx, Maker, Setup, read_only_folder, run_case
from conftest import save_as, tiny_state_dict
from safetensors.torch import load_file

from modelsoups.cli import MAX_LINE, main

pytestmark = pytest.mark.usefixtures("quiet_cli")

OK = "echo 1; : {ckpt}"  # an evaluator that scores everything 1


def greedy(c: Ctx, *extra: str, command: str = OK, out: Path | None = None) -> list[str]:
    a, b = c.make(2)
    return ["greedy", str(a), str(b), "-o", str(out or c.out), "--eval", command, *extra]


def wise_ft(c: Ctx, *extra: str, out: Path | None = None) -> list[str]:
    a, b = c.make(2)
    return ["wise-ft", str(a), str(b), "-o", str(out or c.out), "--eval", OK, *extra]


# ---------------------------------------------------------------------------------------
# Option values.


def eval_timeout_nan(c: Ctx) -> Setup:
    return Setup(greedy(c, "--eval-timeout", "nan"), ["timeout", "nan"])


def eval_timeout_zero(c: Ctx) -> Setup:
    return Setup(greedy(c, "--eval-timeout", "0"), ["timeout", "positive"])


def alphas_only_a_comma(c: Ctx) -> Setup:
    return Setup(wise_ft(c, "--alphas", ","), ["sweep", "','"])


def alphas_to_infinity(c: Ctx) -> Setup:
    return Setup(wise_ft(c, "--alphas", "0:inf:1"), ["'0:inf:1'"])


def alphas_unbounded(c: Ctx) -> Setup:
    return Setup(wise_ft(c, "--alphas", "0:1e12:1"), ["'0:1e12:1'", "more than 1000"])


def alphas_nan(c: Ctx) -> Setup:
    return Setup(wise_ft(c, "--alphas", "nan,0.5"), ["'nan,0.5'", "finite"])


def alphas_zero_step(c: Ctx) -> Setup:
    return Setup(wise_ft(c, "--alphas", "0:1:0"), ["'0:1:0'"])


def alphas_long_list(c: Ctx) -> Setup:
    values = ",".join(str(i / 2000) for i in range(2001))
    return Setup(wise_ft(c, "--alphas", values), ["2001 values", "more than 1000"])


def scales_tiny_step(c: Ctx) -> Setup:
    a, b, base = c.make(3)
    argv = ["task-arithmetic", str(a), str(b), "--base", str(base), "-o", str(c.out)]
    return Setup([*argv, "--eval", OK, "--scales", "0:1:1e-300"], ["more than 1000"])


def alpha_nan(c: Ctx) -> Setup:
    a, b = c.make(2)
    return Setup(["wise-ft", str(a), str(b), "-o", str(c.out), "--alpha", "nan"], ["finite"])


def weights_infinite(c: Ctx) -> Setup:
    a, b = c.make(2)
    argv = ["weighted", str(a), str(b), "--weights", "1e999,1", "-o", str(c.out)]
    return Setup(argv, ["finite"])


def tolerance_nan(c: Ctx) -> Setup:
    return Setup(greedy(c, "--tolerance", "nan"), ["tolerance", "nan"])


def shard_size_overflows(c: Ctx) -> Setup:
    a, b = c.make(2)
    size = "9" * 400 + "TB"
    argv = ["uniform", str(a), str(b), "-o", str(c.tmp / "soup"), "--max-shard-size", size]
    return Setup(argv, ["too large"], out=c.tmp / "soup")


def dataset_named_like_a_field(c: Ctx) -> Setup:
    return Setup(greedy(c, "--dataset", "model_name"), ["'model_name'", "--dataset"])


def workers_zero(c: Ctx) -> Setup:
    return Setup(greedy(c, "--workers", "0"), ["workers must be from 1 to 1024"])


def workers_without_end(c: Ctx) -> Setup:
    """Was: a pool of 10**30 processes, started until the run was killed."""
    return Setup(greedy(c, "--workers", str(10**30)), ["workers must be from 1 to 1024"])


def demo_seeds_without_end(c: Ctx) -> Setup:
    """Was: a list of 10¹² seeds, built before anything else."""
    argv = ["demo", "--seeds", "0-1000000000000", "--out", str(c.tmp / "demo")]
    return Setup(argv, ["at most 1000 seeds"])


def demo_workers_without_end(c: Ctx) -> Setup:
    argv = ["demo", "--workers", str(10**30), "--out", str(c.tmp / "demo")]
    return Setup(argv, ["--workers must be from 1 to 1024"])


def ray_cpus_without_end(c: Ctx) -> Setup:
    return Setup(greedy(c, "--ray", "--workers", str(10**9)), ["workers must be from 1"])


def output_empty(c: Ctx) -> Setup:
    """`-o ''` is the current folder: no name to put the report and history beside."""
    return Setup(greedy(c, out=Path("")), ["-o '.'", "name the soup"])


def max_length_beyond_any_tokenizer(c: Ctx) -> Setup:
    (a,) = c.make(1, "hf-folder")
    argv = ["eval", str(a), "--metric", "lm-loss", "--data", str(c.tmp / "val.jsonl")]
    return Setup([*argv, "--max-length", str(10**30)], ["max_length", "2**31-1"])


def batch_size_zero(c: Ctx) -> Setup:
    (a,) = c.make(1, "hf-folder")
    argv = ["eval", str(a), "--metric", "lm-loss", "--data", str(c.tmp / "val.jsonl")]
    return Setup([*argv, "--batch-size", "0"], ["batch_size", "from 1"])


def epochs_without_end(c: Ctx) -> Setup:
    a, b = c.make(2)
    argv = ["learned", str(a), str(b), "-o", str(c.out), "--metric", "lm-loss", "--data"]
    return Setup([*argv, str(c.tmp / "val.jsonl"), "--epochs", str(10**30)], ["--epochs"])


# ---------------------------------------------------------------------------------------
# A resumed history that cannot be trusted (written by hand, damaged, another tool's).


def history_case(c: Ctx, content: bytes, *names: str) -> Setup:
    hist = c.tmp / "soup.history.jsonl"
    hist.write_bytes(content)
    return Setup(greedy(c, "--resume"), [str(hist), *names])


def line(**record: object) -> bytes:
    return (json.dumps(record) + "\n").encode()


def history_score_null(c: Ctx) -> Setup:
    rec = line(kind="ingredient", model_name="run0", held_out=None)
    return history_case(c, rec, "line 1", "'held_out' is None")


def history_score_text(c: Ctx) -> Setup:
    rec = line(kind="ingredient", model_name="run0", held_out="high")
    return history_case(c, rec, "line 1", "'high'")


def history_score_nan(c: Ctx) -> Setup:
    rec = b'{"kind": "ingredient", "model_name": "run0", "held_out": NaN}\n'
    return history_case(c, rec, "line 1", "nan")


def history_score_missing(c: Ctx) -> Setup:
    rec = line(kind="ingredient", model_name="run0", accuracy=0.5)
    return history_case(c, rec, "line 1", "'held_out' is missing")


def history_name_missing(c: Ctx) -> Setup:
    return history_case(c, line(kind="ingredient", held_out=0.5), "line 1", "'model_name'")


def history_step_without_accepted(c: Ctx) -> Setup:
    good = line(kind="ingredient", model_name="run0", held_out=1.0)
    step = line(kind="greedy", model_name="run0", held_out=1.0, soup_size=1)
    return history_case(c, good + step, "line 2", "'accepted'")


def history_binary(c: Ctx) -> Setup:
    return history_case(c, bytes(range(256)) * 4, "binary")


def history_damaged_middle_line(c: Ctx) -> Setup:
    good = line(kind="ingredient", model_name="run0", held_out=1.0)
    return history_case(c, good + b"{garbage\n" + good, "line 2", "not JSON")


def history_not_objects(c: Ctx) -> Setup:
    return history_case(c, b"[1, 2, 3]\n", "line 1", "not a JSON object")


def history_score_of_400_digits(c: Ctx) -> Setup:
    rec = b'{"kind": "ingredient", "model_name": "run0", "held_out": ' + b"9" * 400 + b"}\n"
    return history_case(c, rec, "line 1", "not a finite number")


def history_score_of_5000_digits(c: Ctx) -> Setup:
    """Past Python's 4300-digit limit, json raises a ValueError that is not a JSON error."""
    rec = b'{"kind": "ingredient", "model_name": "run0", "held_out": ' + b"7" * 5000 + b"}\n"
    return history_case(c, rec, "line 1", "not JSON")


def history_nested_too_deep(c: Ctx) -> Setup:
    rec = b'{"kind": "ingredient", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    return history_case(c, rec, "line 1", "not JSON")


def history_last_line_whole_but_damaged(c: Ctx) -> Setup:
    """A last line that ends with its newline was written whole: damaged, not torn by a
    crash, so it is refused instead of dropped."""
    good = line(kind="ingredient", model_name="run0", held_out=1.0)
    return history_case(c, good + b"{garbage\n", "line 2", "not JSON")


def history_sparse_gigabyte(c: Ctx) -> Setup:
    hist = c.tmp / "soup.history.jsonl"
    with hist.open("wb") as f:
        f.truncate(1 << 30)  # sparse: no disk used; read whole it took 33 s and 2.4 GB
    return Setup(greedy(c, "--resume"), [str(hist), "not a history"])


def history_is_a_checkpoint(c: Ctx) -> Setup:
    """`--history` naming a safetensors file (here not an input): refused, not truncated."""
    other = save_as(tiny_state_dict(5), c.tmp / "other", "safetensors")
    setup = greedy(c, "--history", str(other), "--resume")
    return Setup(setup, [str(other), "binary"])


# ---------------------------------------------------------------------------------------
# `soup report` on reports that are not what they claim, and -o where it cannot write.


def report_file(c: Ctx, content: bytes | dict[str, object]) -> Path:
    path = c.tmp / "soup.report.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


def report_binary(c: Ctx) -> Setup:
    path = report_file(c, b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    return Setup(["report", str(path)], [str(path), "binary"])


def report_ingredients_wrong_type(c: Ctx) -> Setup:
    path = report_file(c, {"recipe": "greedy", "ingredients": "run0,run1"})
    return Setup(["report", str(path)], [str(path), "'ingredients' is a str"])


def report_recipe_not_text(c: Ctx) -> Setup:
    path = report_file(c, {"recipe": 3, "ingredients": []})
    return Setup(["report", str(path)], [str(path), "not a soup report"])


def report_nested_too_deep(c: Ctx) -> Setup:
    path = report_file(c, b"[" * 200_000 + b"]" * 200_000)
    return Setup(["report", str(path)], [str(path), "not"])


def report_integer_of_5000_digits(c: Ctx) -> Setup:
    path = report_file(c, b'{"recipe": "greedy", "held_out": ' + b"7" * 5000 + b"}")
    return Setup(["report", str(path)], [str(path), "not a JSON report"])


def report_is_a_fifo(c: Ctx) -> Setup:
    """Was: waits forever for a writer."""
    path = c.tmp / "soup.report.json"
    os.mkfifo(path)
    return Setup(["report", str(path)], [str(path), "not a regular file"])


def report_is_dev_zero(c: Ctx) -> Setup:
    """Was: read until MemoryError (5 GB, 47 s)."""
    path = c.tmp / "soup.report.json"
    path.symlink_to("/dev/zero")
    return Setup(["report", str(path)], [str(path), "not a regular file"])


def report_sparse_gigabyte(c: Ctx) -> Setup:
    path = c.tmp / "soup.report.json"
    with path.open("wb") as f:
        f.truncate(1 << 30)
    return Setup(["report", str(path)], [str(path), "at most"])


def report_output_folder_missing(c: Ctx) -> Setup:
    path = report_file(c, {"recipe": "uniform", "ingredients": ["a"], "weights": [1.0]})
    out = c.tmp / "missing" / "r.png"
    return Setup(["report", str(path), "-o", str(out)], [str(out), "does not exist"], out=out)


def report_output_read_only(c: Ctx) -> Setup:
    path = report_file(c, {"recipe": "uniform", "ingredients": ["a"], "weights": [1.0]})
    out = read_only_folder(c.tmp / "ro", c.stack) / "r.html"
    return Setup(["report", str(path), "-o", str(out)], [str(out), "cannot write"], out=out)


# ---------------------------------------------------------------------------------------
# Unwritable output folders, evaluator output, recipe files.


def greedy_output_read_only(c: Ctx) -> Setup:
    out = read_only_folder(c.tmp / "ro", c.stack) / "soup.safetensors"
    return Setup(greedy(c, out=out), [str(out), "cannot write"], out=out)


def wise_ft_output_read_only(c: Ctx) -> Setup:
    out = read_only_folder(c.tmp / "ro", c.stack) / "soup.safetensors"
    return Setup(wise_ft(c, "--alphas", "0,1", out=out), [str(out), "cannot write"], out=out)


def stock_output_read_only(c: Ctx) -> Setup:
    a, b, base = c.make(3)
    out = read_only_folder(c.tmp / "ro", c.stack) / "soup.safetensors"
    argv = ["stock", str(a), str(b), "--base", str(base), "-o", str(out)]
    return Setup(argv, [str(out), "cannot write"], out=out)


def eval_prints_binary(c: Ctx) -> Setup:
    argv = greedy(c, command="printf '\\377\\376\\001\\n'; : {ckpt}")
    return Setup(argv, ["candidate 'run0'", "cannot read a score"], keeps=["soup.history.jsonl"])


def eval_fails_with_binary_stderr(c: Ctx) -> Setup:
    command = "printf '\\377boom\\n' >&2; exit 5; : {ckpt}"
    return Setup(greedy(c, command=command), ["exited with code 5", "boom"],
                 keeps=["soup.history.jsonl"])  # fmt: skip


def recipe_case(c: Ctx, text: str | bytes) -> tuple[Path, list[str]]:
    path = c.tmp / "recipe.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path, ["run", str(path)]


def recipe_alias_bomb(c: Ctx) -> Setup:
    """448 bytes that expand to 10⁷ strings once the aliases are resolved."""
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefg"):
        prev = "abcdefg"[i]
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 10) + "]")
    path, argv = recipe_case(c, "\n".join(levels) + "\nmethod: uniform\n")
    assert len(path.read_bytes()) < 600
    return Setup(argv, [str(path), "aliases"])


def recipe_too_large(c: Ctx) -> Setup:
    path, argv = recipe_case(c, "method: uniform\n# " + "x" * (2 << 20) + "\n")
    return Setup(argv, [str(path), "at most"])


def recipe_huge_value(c: Ctx) -> Setup:
    """A 500 KB field value in a validation error: the line stays short."""
    path, argv = recipe_case(c, "method: " + "u" * 500_000 + "\n")
    return Setup(argv, [str(path), "method"])


def recipe_binary(c: Ctx) -> Setup:
    path, argv = recipe_case(c, b"\x00\x01\x02\xff\xfe" * 100)
    return Setup(argv, [str(path)])


# ---------------------------------------------------------------------------------------
# Every path the run writes is checked like the output (report, history, candidates).


def report_is_an_input(c: Ctx) -> Setup:
    a, b = c.make(2)
    argv = ["greedy", str(a), str(b), "-o", str(c.out), "--eval", OK, "--report", str(a)]
    return Setup(argv, [str(a), "input"])


def history_is_an_input_resumed(c: Ctx) -> Setup:
    """Was: the input truncated to 0 bytes."""
    a, b = c.make(2)
    argv = ["greedy", str(a), str(b), "-o", str(c.out), "--eval", OK, "--history", str(a)]
    return Setup([*argv, "--resume"], [str(a), "input"])


def stock_history_is_an_input(c: Ctx) -> Setup:
    a, b, base = c.make(3)
    argv = ["stock", str(a), str(b), "--base", str(base), "-o", str(c.out), "--eval", OK]
    return Setup([*argv, "--history", str(b)], [str(b), "input"])


def wise_ft_report_is_the_base(c: Ctx) -> Setup:
    a, b = c.make(2)
    argv = ["wise-ft", str(a), str(b), "-o", str(c.out), "--report", str(a)]
    return Setup(argv, [str(a), "input"])


def task_arithmetic_history_is_the_base(c: Ctx) -> Setup:
    a, b, base = c.make(3)
    argv = ["task-arithmetic", str(a), str(b), "--base", str(base), "-o", str(c.out)]
    argv += ["--eval", OK, "--scales", "0,1", "--history", str(base)]
    return Setup(argv, [str(base), "input"])


def report_inside_an_input_folder(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-folder")
    report = b / "soup.report.json"
    argv = ["greedy", str(a), str(b), "-o", str(c.out), "--eval", OK, "--report", str(report)]
    return Setup(argv, [str(report), "input"])


def report_is_the_history(c: Ctx) -> Setup:
    shared = c.tmp / "log.json"
    argv = greedy(c, "--report", str(shared), "--history", str(shared))
    return Setup(argv, [str(shared), "also writes"])


def report_is_the_output(c: Ctx) -> Setup:
    return Setup(greedy(c, "--report", str(c.out)), [str(c.out), "also writes"])


def history_inside_the_output_folder(c: Ctx) -> Setup:
    out = c.tmp / "soup-folder"
    hist = out / "history.jsonl"
    return Setup(greedy(c, "--history", str(hist), out=out), [str(hist), "also writes"], out=out)


def history_is_the_scores_file(c: Ctx) -> Setup:
    scores = c.tmp / "scores.json"
    scores.write_text(json.dumps({"run0": 0.9, "run1": 0.8}))
    argv = greedy(c, "--scores", str(scores), "--history", str(scores), "--resume")
    return Setup(argv, [str(scores), "input"])


def report_hard_link_to_an_input(c: Ctx) -> Setup:
    a, b = c.make(2)
    link = c.tmp / "report.json"
    os.link(a, link)
    argv = ["greedy", str(a), str(b), "-o", str(c.out), "--eval", OK, "--report", str(link)]
    return Setup(argv, [str(link), "input"])


def report_symlink_to_an_input(c: Ctx) -> Setup:
    a, b = c.make(2)
    link = c.tmp / "report.json"
    link.symlink_to(a)
    argv = ["greedy", str(a), str(b), "-o", str(c.out), "--eval", OK, "--report", str(link)]
    return Setup(argv, [str(link), "input"])


def recipe_report_is_an_ingredient(c: Ctx) -> Setup:
    c.make(2)
    text = "method: uniform\ningredients: [run0.safetensors, run1.safetensors]\n"
    _, argv = recipe_case(c, text + "output: soup.safetensors\nreport: run1.safetensors\n")
    return Setup(argv, ["run1.safetensors", "input"])


def recipe_report_is_the_recipe(c: Ctx) -> Setup:
    c.make(2)
    text = "method: uniform\ningredients: [run0.safetensors, run1.safetensors]\n"
    _, argv = recipe_case(c, text + "output: soup.safetensors\nreport: recipe.yaml\n")
    return Setup(argv, ["recipe.yaml", "input"])


def soup_report_output_is_the_report(c: Ctx) -> Setup:
    path = c.tmp / "report.html"  # JSON under an .html name
    path.write_text(json.dumps({"recipe": "uniform", "ingredients": ["a"], "weights": [1.0]}))
    argv = ["report", str(path), "-o", str(path), "--overwrite"]
    return Setup(argv, [str(path), "input"], out=path)


CASES: list[tuple[str, Callable[[Ctx], Setup]]] = [
    ("--eval-timeout nan", eval_timeout_nan),
    ("--eval-timeout 0", eval_timeout_zero),
    ("--alphas ,", alphas_only_a_comma),
    ("--alphas 0:inf:1", alphas_to_infinity),
    ("--alphas 0:1e12:1 (unbounded sweep)", alphas_unbounded),
    ("--alphas nan,0.5", alphas_nan),
    ("--alphas 0:1:0 (zero step)", alphas_zero_step),
    ("--alphas with 2001 values", alphas_long_list),
    ("--scales 0:1:1e-300", scales_tiny_step),
    ("--alpha nan", alpha_nan),
    ("--weights 1e999,1", weights_infinite),
    ("--tolerance nan", tolerance_nan),
    ("--max-shard-size of 400 digits", shard_size_overflows),
    ("--dataset named like a history field", dataset_named_like_a_field),
    ("--workers 0", workers_zero),
    ("--workers 10**30", workers_without_end),
    ("--ray --workers 10**9", ray_cpus_without_end),
    ("demo --seeds 0-10**12", demo_seeds_without_end),
    ("demo --workers 10**30", demo_workers_without_end),
    ("-o '' (no name)", output_empty),
    ("--max-length 10**30", max_length_beyond_any_tokenizer),
    ("--batch-size 0", batch_size_zero),
    ("learned --epochs 10**30", epochs_without_end),
    ("resumed history: null score", history_score_null),
    ("resumed history: text score", history_score_text),
    ("resumed history: NaN score", history_score_nan),
    ("resumed history: score missing", history_score_missing),
    ("resumed history: model_name missing", history_name_missing),
    ("resumed history: greedy step without 'accepted'", history_step_without_accepted),
    ("resumed history: binary", history_binary),
    ("resumed history: damaged middle line", history_damaged_middle_line),
    ("resumed history: not objects", history_not_objects),
    ("resumed history: score of 400 digits", history_score_of_400_digits),
    ("resumed history: score of 5000 digits", history_score_of_5000_digits),
    ("resumed history: nested 100000 deep", history_nested_too_deep),
    ("resumed history: whole last line damaged", history_last_line_whole_but_damaged),
    ("resumed history: sparse 1 GB", history_sparse_gigabyte),
    ("--history names a checkpoint", history_is_a_checkpoint),
    ("soup report: binary", report_binary),
    ("soup report: ingredients of the wrong type", report_ingredients_wrong_type),
    ("soup report: recipe not text", report_recipe_not_text),
    ("soup report: JSON nested 200000 deep", report_nested_too_deep),
    ("soup report: integer of 5000 digits", report_integer_of_5000_digits),
    ("soup report: a FIFO", report_is_a_fifo),
    ("soup report: /dev/zero", report_is_dev_zero),
    ("soup report: sparse 1 GB", report_sparse_gigabyte),
    ("soup report -o in a missing folder", report_output_folder_missing),
    ("soup report -o in a read-only folder", report_output_read_only),
    ("greedy -o in a read-only folder", greedy_output_read_only),
    ("wise-ft -o in a read-only folder", wise_ft_output_read_only),
    ("stock -o in a read-only folder", stock_output_read_only),
    ("evaluator prints bytes that are not UTF-8", eval_prints_binary),
    ("evaluator fails with non-UTF-8 stderr", eval_fails_with_binary_stderr),
    ("recipe: YAML alias bomb", recipe_alias_bomb),
    ("recipe: larger than 1 MiB", recipe_too_large),
    ("recipe: a 500 KB value", recipe_huge_value),
    ("recipe: binary", recipe_binary),
    ("--report is an input", report_is_an_input),
    ("--history is an input, --resume", history_is_an_input_resumed),
    ("stock --history is an input", stock_history_is_an_input),
    ("wise-ft --report is the zero-shot input", wise_ft_report_is_the_base),
    ("task-arithmetic --history is the base", task_arithmetic_history_is_the_base),
    ("--report inside an input folder", report_inside_an_input_folder),
    ("--report and --history the same file", report_is_the_history),
    ("--report is the output", report_is_the_output),
    ("--history inside the output folder", history_inside_the_output_folder),
    ("--history is the --scores file", history_is_the_scores_file),
    ("--report a hard link to an input", report_hard_link_to_an_input),
    ("--report a symlink to an input", report_symlink_to_an_input),
    ("recipe report: names an ingredient", recipe_report_is_an_ingredient),
    ("recipe report: the recipe file itself", recipe_report_is_the_recipe),
    ("soup report -o the report itself", soup_report_output_is_the_report),
]


@pytest.mark.parametrize("build", [b for _, b in CASES], ids=[i for i, _ in CASES])
def test_bad_cli_input(
    build: Case, tmp_path: Path, make_ingredients: Maker, capsys: pytest.CaptureFixture[str]
) -> None:
    run_case(build, tmp_path, make_ingredients, capsys, quiet=True)


def test_cli_battery_is_large_enough() -> None:
    assert len(CASES) >= 72
    assert len({i for i, _ in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------
# Odd values that are valid.


@pytest.mark.parametrize(
    ("weights", "want"), [("1e308,1e308", (0.5, 0.5)), ("1e-13,3e-13", (0.25, 0.75))]
)
def test_extreme_but_valid_weights_are_normalised(
    weights: str, want: tuple[float, float], tmp_path: Path, make_ingredients: Maker
) -> None:
    a, b = make_ingredients(2)
    out = tmp_path / "soup.safetensors"
    assert main(["weighted", str(a), str(b), "--weights", weights, "-o", str(out)]) == 0
    sa, sb, soup = load_file(a), load_file(b), load_file(out)
    for k in ("fc.weight", "conv.bias"):
        torch.testing.assert_close(soup[k], want[0] * sa[k] + want[1] * sb[k])


@pytest.mark.parametrize("timeout", ["inf", "1e308", str(10**30)])
def test_infinite_eval_timeout_means_no_limit(
    timeout: str, tmp_path: Path, make_ingredients: Maker
) -> None:
    """inf, and timeouts too long for Python's waits (was: OverflowError), mean no limit."""
    a, b = make_ingredients(2)
    out = tmp_path / "soup.safetensors"
    argv = ["greedy", str(a), str(b), "-o", str(out), "--eval", OK, "--eval-timeout", timeout]
    assert main(argv) == 0
    assert out.is_file()


def test_metrics_named_like_history_fields_never_overwrite_them(
    tmp_path: Path, make_ingredients: Maker
) -> None:
    """An evaluator's JSON with `held_out`, `model_name`, `kind`, `accepted` keys: they are
    logged as `eval.NAME`; the history's own fields keep their meaning, and resume works."""
    a, b = make_ingredients(2)
    out = tmp_path / "soup.safetensors"
    metrics = '{"score": 0.5, "held_out": 99, "model_name": 7, "kind": 1, "accepted": 0}'
    argv = ["greedy", str(a), str(b), "-o", str(out), "--eval", f"echo '{metrics}'; : {{ckpt}}"]
    assert main(argv) == 0
    records = [json.loads(x) for x in (tmp_path / "soup.history.jsonl").read_text().splitlines()]
    assert [r["model_name"] for r in records if r["kind"] == "ingredient"] == ["run0", "run1"]
    assert all(r["held_out"] == 0.5 for r in records)
    scored = [r for r in records if "eval.held_out" in r]  # all but the first soup of one
    assert len(scored) == len(records) - 1 == 3
    assert all(r["eval.model_name"] == 7 and r["eval.accepted"] == 0 for r in scored)
    steps = [r for r in records if r["kind"] == "greedy"]
    assert [s["accepted"] for s in steps] == [True, True]
    out.unlink()
    (tmp_path / "soup.report.json").unlink()
    assert main([*argv, "--resume"]) == 0  # the records read back as they were meant


def test_report_of_a_damaged_history_or_odd_fields_still_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Odd values inside a valid report are shown blank, and a torn or binary history
    line is skipped: `soup report` shows what it can instead of failing."""
    hist = tmp_path / "soup.history.jsonl"
    good = line(kind="greedy", model_name="run0", held_out=0.9, accepted=True, soup_size=1)
    hist.write_bytes(good + b'{"kind": "greedy", "model_na' + b"\n\xff\xfe\n")
    report = {
        "recipe": "greedy",
        "history": str(hist),
        "ingredients": [{"name": "run0", "held_out": "high", "weight": None}, 7],
        "weights": ["x", 0.5],
        "held_out": [1],
        "test": {"score": "n/a"},
        "sweep": [1, "2"],
        "alpha": "half",
        "recipe_file": "not a dict",
    }
    path = tmp_path / "soup.report.json"
    path.write_text(json.dumps(report))
    png = tmp_path / "r.png"
    assert main(["report", str(path), "-o", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "run0" in capsys.readouterr().out


def test_error_lines_are_short_and_single(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file name with a newline and 2000 characters: the error stays one capped line."""
    name = tmp_path / ("x\n" + "y" * 2000 + ".safetensors")
    capsys.readouterr()
    assert main(["inspect", str(name)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err.strip()) <= MAX_LINE
    assert "x\\ny" in err


def test_report_with_absurd_numbers_and_sizes_still_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scores of 400 digits, ±1e308, NaN and ±inf are shown blank (were: OverflowError, and
    matplotlib's singular-matrix error); 20000 ingredients print 200 rows at once (were: rich
    took minutes); a 10⁵-character recipe or metric name is cut (was: matplotlib stalled)."""
    monkeypatch.setenv("COLUMNS", "200")
    metric = "d" * 300
    ingredients: list[dict[str, object]] = [
        {"name": f"r{i}", metric: i / 20000} for i in range(20000)
    ]
    ingredients[:2] = [{"name": "big", metric: 10**400}, {"name": "far", metric: -1e308}]
    report = {"recipe": "r" * 100_000, "dataset": metric, "ingredients": ingredients,
              "weights": [1e308, float("nan")], "held_out": 1e308, "test": {"score": 10**400},
              "sweep": [{"alpha": float("inf"), metric: 1.0}], "alpha": 0.5}  # fmt: skip
    path = tmp_path / "soup.report.json"
    path.write_text(json.dumps(report))
    capsys.readouterr()
    for out in ("r.png", "r.html"):
        assert main(["report", str(path), "-o", str(tmp_path / out)]) == 0
    shown = capsys.readouterr().out
    assert " r198 " in shown and " r199 " not in shown and "19,801 more ingredients" in shown
    assert "<td>r19999</td>" in (tmp_path / "r.html").read_text()
