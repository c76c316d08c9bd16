"""The bad-input battery, paths side: every path a run writes against every file it reads.

A run reads more than its ingredients: the `--data` and `--test-data` files of a metric
(an lm-eval task folder too), the `--model` folder, `--scores`, the `--merge-into` base, a
recipe file. It writes more than `-o`: the report, the history, learned coefficients, the
candidate folder (in `--workdir` when given). None of what it writes may be, contain or lie
inside what it reads, through a symbolic or a hard link included; each case must fail
before anything is written, with the harness of `test_bad_input.py`: exit code 1, one
`soup: error: ...` line naming the culprit, no file created or changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
from battery import Case, Ctx, Maker, Setup, one_error_line, run_case

pytestmark = pytest.mark.usefixtures("quiet_cli")

OK = "echo 1; : {ckpt}"  # an evaluator that scores everything 1
TEXTS = ["the cat sat on a mat", "one two three"]


def data_file(c: Ctx, name: str = "held_out.jsonl") -> Path:
    path = c.tmp / name
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def metric(c: Ctx, command: str, *extra: str, data: Path | None = None) -> list[str]:
    """`soup COMMAND a b --metric lm-loss --data held_out.jsonl ...` (refused before any
    model is built, so tiny non-LM ingredients do)."""
    a, b = c.make(2)
    held_out = data or data_file(c)
    return [command, str(a), str(b), "--metric", "lm-loss", "--data", str(held_out), *extra]


def folders(c: Ctx) -> list[str]:
    return list(map(str, c.make(2, "hf-folder")))


def greedy_workdir_inside_an_input_folder(c: Ctx) -> Setup:
    a, b = folders(c)
    argv = ["greedy", a, b, "-o", str(c.out), "--eval", OK, "--workdir", a]
    return Setup(argv, [a, "input"])


def greedy_workdir_links_into_an_input_folder(c: Ctx) -> Setup:
    a, b = folders(c)
    (c.tmp / "work").symlink_to(a, target_is_directory=True)
    argv = ["greedy", a, b, "-o", str(c.out), "--eval", OK, "--workdir", str(c.tmp / "work")]
    return Setup(argv, [a, "input"])


def greedy_workdir_inside_the_output_folder(c: Ctx) -> Setup:
    a, b = c.make(2)
    out = c.tmp / "soup"
    (out / "work").mkdir(parents=True)
    argv = ["greedy", str(a), str(b), "-o", str(out), "--overwrite", "--eval", OK,
            "--workdir", str(out / "work")]  # fmt: skip
    return Setup(argv, [str(out), "also writes"], out=out)


def greedy_workdir_is_a_fifo(c: Ctx) -> Setup:
    """A special file made in the test's own folder: the machine's /dev is never used."""
    a, b = c.make(2)
    os.mkfifo(c.tmp / "work")
    argv = ["greedy", str(a), str(b), "-o", str(c.out), "--eval", OK, "--workdir",
            str(c.tmp / "work")]  # fmt: skip
    return Setup(argv, [str(c.tmp / "work"), "is a FIFO (named pipe), not a folder"])


def fake_dev(c: Ctx) -> Path:
    """A folder standing for /dev (the one `DEVICE_FOLDERS` names while the case runs)."""
    from modelsoups.cli import outputs

    dev = c.tmp / "dev"
    (dev / "disk").mkdir(parents=True)
    c.stack.enter_context(mock.patch.object(outputs, "DEVICE_FOLDERS", (dev,)))
    return dev


def greedy_workdir_is_the_device_folder(c: Ctx) -> Setup:
    a, b = c.make(2)
    dev = fake_dev(c)
    argv = ["greedy", str(a), str(b), "-o", str(c.out), "--eval", OK, "--workdir", str(dev)]
    return Setup(argv, [f"{dev}: --workdir is in {dev}, where the system keeps devices"])


def greedy_workdir_in_the_device_folder(c: Ctx) -> Setup:
    a, b = c.make(2)
    work = fake_dev(c) / "disk"
    argv = ["greedy", str(a), str(b), "-o", str(c.out), "--eval", OK, "--workdir", str(work)]
    return Setup(argv, [str(work), "where the system keeps devices", "/dev/shm"])


def greedy_output_is_the_data_file(c: Ctx) -> Setup:
    data = data_file(c)
    argv = metric(c, "greedy", "-o", str(data), "--overwrite", data=data)
    return Setup(argv, [str(data), "input"], out=data)


def greedy_report_is_the_data_file(c: Ctx) -> Setup:
    data = data_file(c)
    argv = metric(c, "greedy", "-o", str(c.out), "--report", str(data), data=data)
    return Setup(argv, [str(data), "input"])


def greedy_report_hard_link_to_the_data_file(c: Ctx) -> Setup:
    data, link = data_file(c), c.tmp / "report.json"
    os.link(data, link)
    argv = metric(c, "greedy", "-o", str(c.out), "--report", str(link), data=data)
    return Setup(argv, [str(link), "input"])


def greedy_history_is_the_test_data(c: Ctx) -> Setup:
    test = data_file(c, "test.jsonl")
    argv = metric(c, "greedy", "-o", str(c.out), "--test-metric", "lm-loss", "--test-data",
                  str(test), "--history", str(test), "--resume")  # fmt: skip
    return Setup(argv, [str(test), "input"])


def greedy_output_is_the_model_folder(c: Ctx) -> Setup:
    model = c.tmp / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    argv = metric(c, "greedy", "--model", str(model), "-o", str(model), "--overwrite")
    return Setup(argv, [str(model), "input"], out=model)


def greedy_output_inside_the_lm_eval_task_folder(c: Ctx) -> Setup:
    tasks = c.tmp / "tasks"
    tasks.mkdir()
    (tasks / "ppl.yaml").write_text("task: ppl\n")
    a, b = c.make(2)
    out = tasks / "soup.safetensors"
    argv = ["greedy", str(a), str(b), "--metric", "lm-eval:ppl", "--data", str(tasks), "-o",
            str(out)]  # fmt: skip
    return Setup(argv, [str(tasks), "input"], out=out)


def wise_ft_history_is_the_data_file(c: Ctx) -> Setup:
    data = data_file(c)
    argv = metric(c, "wise-ft", "--alphas", "0,1", "-o", str(c.out), "--history", str(data),
                  "--resume", data=data)  # fmt: skip
    return Setup(argv, [str(data), "input"])


def stock_report_is_the_data_file(c: Ctx) -> Setup:
    data = data_file(c)
    base = c.make(3)[2]
    argv = metric(c, "stock", "--base", str(base), "-o", str(c.out), "--report", str(data),
                  data=data)  # fmt: skip
    return Setup(argv, [str(data), "input"])


def learned(c: Ctx, *extra: str, data: Path | None = None) -> list[str]:
    return metric(c, "learned", "--epochs", "1", *extra, data=data)


def learned_coefficients_is_an_input(c: Ctx) -> Setup:
    argv = learned(c, "-o", str(c.out), "--coefficients", str(c.tmp / "run0.safetensors"))
    return Setup(argv, ["run0.safetensors", "input"])


def learned_report_inside_an_input_folder(c: Ctx) -> Setup:
    a, b = folders(c)
    argv = ["learned", a, b, "--metric", "lm-loss", "--data", str(data_file(c)), "-o",
            str(c.out), "--report", f"{a}/config.json"]  # fmt: skip
    return Setup(argv, [a, "input"])


def learned_coefficients_is_the_data_file(c: Ctx) -> Setup:
    data = data_file(c)
    argv = learned(c, "-o", str(c.out), "--coefficients", str(data), data=data)
    return Setup(argv, [str(data), "input"])


def learned_coefficients_is_the_report(c: Ctx) -> Setup:
    both = str(c.tmp / "both.json")
    argv = learned(c, "-o", str(c.out), "--coefficients", both, "--report", both)
    return Setup(argv, [both, "also writes"])


def learned_coefficients_is_the_output(c: Ctx) -> Setup:
    argv = learned(c, "-o", str(c.out), "--coefficients", str(c.out))
    return Setup(argv, [str(c.out), "also writes"])


def learned_output_is_the_data_file(c: Ctx) -> Setup:
    data = data_file(c)
    argv = learned(c, "-o", str(data), "--overwrite", data=data)
    return Setup(argv, [str(data), "input"], out=data)


def output_hard_link_to_a_file_in_an_input_folder(c: Ctx) -> Setup:
    a, b = folders(c)
    link = c.tmp / "link.safetensors"
    os.link(Path(a) / "model.safetensors", link)
    return Setup(["uniform", a, b, "-o", str(link), "--overwrite"], [str(link), a], out=link)


def history_hard_link_to_a_file_in_an_input_folder(c: Ctx) -> Setup:
    a, b = folders(c)
    link = c.tmp / "history.jsonl"
    os.link(Path(a) / "config.json", link)
    argv = ["greedy", a, b, "-o", str(c.out), "--eval", OK, "--history", str(link), "--resume"]
    return Setup(argv, [str(link), a])


def recipe_workdir_inside_an_ingredient(c: Ctx) -> Setup:
    a, b = folders(c)
    recipe = c.tmp / "recipe.yaml"
    recipe.write_text(f"method: greedy\ningredients: [{a}, {b}]\noutput: {c.out}\n"
                      f"evaluator: {{command: '{OK}'}}\nworkdir: {a}\n")  # fmt: skip
    return Setup(["run", str(recipe)], [a, "input"])


def recipe_split_name_is_shell_code(c: Ctx) -> Setup:
    """`{split}` goes into the evaluator command as it is: its name must be plain."""
    a, b = c.make(2)
    recipe = c.tmp / "recipe.yaml"
    recipe.write_text(f"method: greedy\ningredients: [{a}, {b}]\noutput: {c.out}\n"
                      "evaluator: {command: 'echo 1; : {ckpt} {split}'}\n"
                      "splits: {held_out: '$(touch PWNED)'}\n")  # fmt: skip
    return Setup(["run", str(recipe)], ["splits.held_out", "$(touch PWNED)"])


CASES: list[tuple[str, Callable[[Ctx], Setup]]] = [
    ("greedy --workdir inside an input folder", greedy_workdir_inside_an_input_folder),
    ("greedy --workdir a link into an input folder", greedy_workdir_links_into_an_input_folder),
    ("greedy --workdir inside the output folder", greedy_workdir_inside_the_output_folder),
    ("greedy --workdir a FIFO", greedy_workdir_is_a_fifo),
    ("greedy --workdir the device folder", greedy_workdir_is_the_device_folder),
    ("greedy --workdir a folder in the device folder", greedy_workdir_in_the_device_folder),
    ("greedy -o is the --data file", greedy_output_is_the_data_file),
    ("greedy --report is the --data file", greedy_report_is_the_data_file),
    ("greedy --report a hard link to --data", greedy_report_hard_link_to_the_data_file),
    ("greedy --history is the --test-data file", greedy_history_is_the_test_data),
    ("greedy -o is the --model folder", greedy_output_is_the_model_folder),
    ("greedy -o inside the lm-eval task folder", greedy_output_inside_the_lm_eval_task_folder),
    ("wise-ft --history is the --data file", wise_ft_history_is_the_data_file),
    ("stock --report is the --data file", stock_report_is_the_data_file),
    ("learned --coefficients is an input", learned_coefficients_is_an_input),
    ("learned --report inside an input folder", learned_report_inside_an_input_folder),
    ("learned --coefficients is the --data file", learned_coefficients_is_the_data_file),
    ("learned --coefficients is the --report", learned_coefficients_is_the_report),
    ("learned --coefficients is the output", learned_coefficients_is_the_output),
    ("learned -o is the --data file", learned_output_is_the_data_file),
    ("-o a hard link to a file in an input folder", output_hard_link_to_a_file_in_an_input_folder),
    ("--history a hard link into an input folder", history_hard_link_to_a_file_in_an_input_folder),
    ("recipe workdir: inside an ingredient", recipe_workdir_inside_an_ingredient),
    ("recipe splits: a name that is shell code", recipe_split_name_is_shell_code),
]


@pytest.mark.parametrize("build", [b for _, b in CASES], ids=[i for i, _ in CASES])
def test_bad_path(
    build: Case, tmp_path: Path, make_ingredients: Maker, capsys: pytest.CaptureFixture[str]
) -> None:
    run_case(build, tmp_path, make_ingredients, capsys, quiet=True)


def test_paths_battery_is_large_enough() -> None:
    assert len(CASES) >= 24
    assert len({i for i, _ in CASES}) == len(CASES)


def test_a_workdir_beside_the_device_folder_is_used_and_left_empty(
    tmp_path: Path, make_ingredients: Maker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule refuses the device folder's own filesystem below it, not its neighbours."""
    from modelsoups.cli import main, outputs

    (tmp_path / "dev").mkdir()
    monkeypatch.setattr(outputs, "DEVICE_FOLDERS", (tmp_path / "dev",))
    a, b = make_ingredients(2)
    work, seen = tmp_path / "device-work", tmp_path / "seen.txt"
    work.mkdir()
    evaluator = f"echo {{ckpt}} >> {seen}; echo 1"
    argv = ["greedy", str(a), str(b), "-o", str(tmp_path / "s.safetensors"), "--eval", evaluator,
            "--workdir", str(work), "--memory", "0", "-q"]  # fmt: skip
    assert main(argv) == 0
    assert any(line.startswith(f"{work}/") for line in seen.read_text().splitlines())
    assert not list(work.iterdir())


def test_a_link_planted_at_the_candidate_folder_name_is_refused_not_followed(
    tmp_path: Path, make_ingredients: Maker, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone sharing the --workdir (/tmp, say) plants a link where this run's candidate
    folder goes (its name is predictable: host and pid): one line, exit 1, nothing written
    through it, and the link (not ours) left as it was."""
    import socket

    from modelsoups.cli import main

    a, b = make_ingredients(2)
    work, victim, out = tmp_path / "work", tmp_path / "victim", tmp_path / "soup.safetensors"
    work.mkdir()
    victim.mkdir()
    link = work / f".{out.name}.soup-candidate-{socket.gethostname()}-{os.getpid()}"
    link.symlink_to(victim, target_is_directory=True)
    capsys.readouterr()
    assert (
        main(["greedy", str(a), str(b), "-o", str(out), "--eval", OK, "--workdir", str(work)]) == 1
    )
    line = one_error_line(capsys.readouterr().err, str(link), "not this run's candidate folder")
    assert "a symbolic link" in line
    assert link.is_symlink() and not list(victim.iterdir()) and not out.exists()
