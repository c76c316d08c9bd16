"""Side paths: what an eval command gets as `{ckpt}`, and runs sharing a history.

- No file name runs code: hostile checkpoint and output names (`$(...)`, backticks,
  quotes, `;`, spaces, newlines) with `{ckpt}` bare, in "..." and in '...': no PWNED file
  ever appears, and the evaluator reads exactly the bytes of the ingredient it scores.
- `{ckpt}` is private: `rm -rf {ckpt}`, a rewrite in place or a truncation by the
  evaluator leaves every input byte-for-byte unchanged; an input changed by anyone else
  while the command runs stops the run with one line naming it.
- One history, one run: a second run on the same history is refused with one line while
  the first holds it (flock), and the first run's history stays well-formed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from battery import Maker, digests, one_error_line, sha256, snapshot
from conftest import save_as, tiny_state_dict
from midrun import UNSUPERVISED

from modelsoups.cli import main
from modelsoups.errors import SoupError
from modelsoups.history import History

pytestmark = pytest.mark.usefixtures("quiet_cli")

HOSTILE = [
    "r$(touch PWNED)",
    "r`touch PWNED`",
    "r'; touch PWNED; '",
    'r"; touch PWNED; "',
    "r x; touch PWNED",
    "r\n$(touch PWNED)\n",
    "r$'\\x41'&&touch PWNED||",
]
QUOTING = {"bare": "{ckpt}", "double": '"{ckpt}"', "single": "'{ckpt}'"}


def hostile_inputs(folder: Path) -> list[Path]:
    folder.mkdir()
    return [
        save_as(tiny_state_dict(i), folder / f"{name}.x", "safetensors")
        for i, name in enumerate(HOSTILE)
    ]


@pytest.mark.parametrize("quoting", list(QUOTING), ids=list(QUOTING))
def test_no_file_name_runs_code_whatever_the_quoting(
    quoting: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where `touch PWNED` would land
    inputs = hostile_inputs(tmp_path / "runs")
    outdir = tmp_path / "out $(touch PWNED) `touch PWNED` ' \""
    outdir.mkdir()
    out = outdir / "soup;touch PWNED.safetensors"
    log = tmp_path / "seen.txt"
    command = f"sha256sum {QUOTING[quoting]} >> {log}; echo 1"
    before = digests(inputs)

    assert main(["greedy", *map(str, inputs), "-o", str(out), "--eval", command]) == 0

    assert not list(tmp_path.rglob("PWNED")), "a file name ran code"
    seen = [ln.split()[0] for ln in log.read_text().splitlines()]
    n = len(inputs)
    assert len(seen) == n + (n - 1)  # every ingredient, then every greedy step
    assert sorted(seen[:n]) == sorted(before.values())  # the evaluator read the inputs' bytes
    assert digests(inputs) == before
    assert out.is_file()


@pytest.mark.parametrize("quoting", list(QUOTING), ids=list(QUOTING))
def test_no_folder_name_runs_code_and_notes_stay_on_one_line(
    quoting: str,
    tmp_path: Path,
    make_ingredients: Maker,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HF folders with hostile names (a newline too): nothing runs, the evaluator finds the
    folder's files, and every note or warning naming the folder stays one line."""
    from modelsoups.cli.common import STATE

    monkeypatch.chdir(tmp_path)  # where `touch PWNED` would land
    runs = tmp_path / "runs"
    runs.mkdir()
    made = make_ingredients(2, "hf-folder")
    folders = [p.rename(runs / f"{HOSTILE[5 - i]}{i}") for i, p in enumerate(made)]
    out = tmp_path / "soup"
    command = f"test -f {QUOTING[quoting]}/config.json && echo 1"
    STATE["quiet"] = False
    capsys.readouterr()
    assert main(["greedy", *map(str, folders), "-o", str(out), "--eval", command]) == 0
    err = capsys.readouterr().err
    assert all(line.startswith("soup: ") for line in err.splitlines()), err
    assert "copied" in err  # the note naming the folder, its newline escaped
    assert not list(tmp_path.rglob("PWNED"))
    assert (out / "config.json").is_file()


def test_soup_ckpt_environment_names_the_same_file(tmp_path: Path, make_ingredients: Maker) -> None:
    a, b = make_ingredients(2)
    log = tmp_path / "env.txt"
    command = f'test "$SOUP_CKPT" = {{ckpt}} && sha256sum "$SOUP_CKPT" >> {log}; echo 1'
    out = tmp_path / "soup.safetensors"
    assert main(["greedy", str(a), str(b), "-o", str(out), "--eval", command]) == 0
    seen = [ln.split()[0] for ln in log.read_text().splitlines()]
    assert len(seen) == 3 and sorted(seen[:2]) == sorted([sha256(a), sha256(b)])


# An evaluator that damages what it is given, three ways, for files and folders alike.
DAMAGE = {
    "rm -rf": "rm -rf {ckpt}",
    "rewrite in place": (
        "for f in $(find {ckpt} -type f); do chmod u+w $f; "
        "printf garbage | dd of=$f conv=notrunc 2>/dev/null; done"
    ),
    "truncate": "for f in $(find {ckpt} -type f); do chmod u+w $f; : > $f; done",
}


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "hf-folder", "hf-sharded"])
@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_evaluator_damaging_ckpt_never_touches_an_input(
    damage: str, fmt: str, tmp_path: Path, make_ingredients: Maker
) -> None:
    inputs = make_ingredients(2, fmt)
    runs = snapshot(inputs[0].parent)
    out = tmp_path / "soup-out"
    out.mkdir()
    soup = out / "soup.safetensors"
    command = DAMAGE[damage] + "; echo 1"
    assert main(["greedy", *map(str, inputs), "-o", str(soup), "--eval", command]) == 0
    after = snapshot(inputs[0].parent)
    assert {k: v for k, v in after.items() if not k.startswith("soup-out")} == runs
    for p in inputs:
        assert p.exists()
    assert sorted(x.name for x in out.iterdir()) == [
        "soup.history.jsonl",
        "soup.report.json",
        "soup.safetensors",
    ]


def test_stock_evaluator_damaging_ckpt_keeps_the_soup(
    tmp_path: Path, make_ingredients: Maker
) -> None:
    """Model Stock scores the soup it wrote: the eval command gets a private copy of it, so
    `rm -rf {ckpt}` deletes the copy, not the soup."""
    base, a, b = make_ingredients(3)
    out = tmp_path / "soup.safetensors"
    command = "rm -rf {ckpt}; echo 1"
    assert (
        main(["stock", str(a), str(b), "--base", str(base), "-o", str(out), "--eval", command]) == 0
    )
    assert (
        out.is_file() and json.loads(out.with_name("soup.report.json").read_text())["held_out"] == 1
    )


def test_input_changed_while_the_evaluator_ran_stops_the_run(
    tmp_path: Path, make_ingredients: Maker, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another process (here the evaluator itself, through a path it knew) appends to an
    input while it is scored: one line naming the input, exit 1."""
    a, b = make_ingredients(2)
    out = tmp_path / "soup.safetensors"
    command = f"printf x >> {b}; echo 1; : {{ckpt}}"
    capsys.readouterr()
    assert main(["greedy", str(a), str(b), "-o", str(out), "--eval", command]) == 1
    line = one_error_line(capsys.readouterr().err, str(b), "input changed during the run")
    assert "its size went from" in line and "seen after scoring 'run0'" in line
    assert not out.exists() and not list(tmp_path.glob(".*soup-candidate-*"))


@pytest.mark.parametrize(
    ("fmt", "action", "file", "what"),
    [
        ("safetensors", "rm {b}", "", "(it was deleted)"),
        ("safetensors", "cp {a} {b}.new && mv {b}.new {b}", "", "(it was replaced)"),
        ("hf-folder", "rm {b}/model.safetensors", "model.safetensors", "(it was deleted)"),
        ("hf-folder", "printf x >> {b}/config.json", "config.json", "(its size went from"),
    ],
    ids=["file deleted", "file replaced", "shard deleted", "folder file rewritten"],
)
def test_input_deleted_or_replaced_while_the_evaluator_ran_stops_the_run(
    fmt: str,
    action: str,
    file: str,
    what: str,
    tmp_path: Path,
    make_ingredients: Maker,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Stricter than the readers' check (a rename or deletion leaves the open file intact):
    an ingredient's files must be the very same after its evaluation. The line names the
    very file of a folder that changed, and how, in the words of the run's other checks."""
    a, b = make_ingredients(2, fmt)
    out = tmp_path / "soup.safetensors"
    act = action.format(a=a if fmt == "safetensors" else a / "model.safetensors", b=b)
    command = f'[ "$SOUP_CANDIDATE" = run1 ] && {{ {act}; }}; echo 1; : {{ckpt}}'
    capsys.readouterr()
    assert main(["greedy", str(a), str(b), "-o", str(out), "--eval", command]) == 1
    line = one_error_line(capsys.readouterr().err, "'run1'", f"{b / file if file else b}: ")
    assert f"input changed during the run {what}" in line and "after the eval command" in line
    assert not out.exists() and not list(tmp_path.glob(".*soup-candidate-*"))


def test_ingredient_copy_is_read_only_and_plainly_named(
    tmp_path: Path, make_ingredients: Maker
) -> None:
    a, b = make_ingredients(2)
    log = tmp_path / "modes.txt"
    command = f"stat -c %a {{ckpt}} >> {log}; basename {{ckpt}} >> {log}; echo 1"
    out = tmp_path / "soup.safetensors"
    assert main(["greedy", str(a), str(b), "-o", str(out), "--eval", command]) == 0
    lines = log.read_text().split()
    assert lines[:4] == ["444", "ingredient.safetensors", "444", "ingredient.safetensors"]


# ---------------------------------------------------------------------------------------
# Inputs rewritten while candidates of them are scored: the run stops before the final write.

# Flip the last byte of a file in place: same size, new mtime.
FLIP = ("python3 -c \"import sys; f = open(sys.argv[1], 'r+b'); f.seek(-1, 2); "
        "b = f.read(1); f.seek(-1, 2); f.write(bytes([b[0] ^ 1]))\" {path}")  # fmt: skip


@pytest.mark.parametrize(
    ("command", "when", "seen"),
    [
        (["wise-ft", "--alphas", "0.25,0.75"], "wise-ft_alpha=0.25", "after scoring"),
        (["wise-ft", "--alphas", "0.25,0.75", "--workers", "2"], "wise-ft_alpha=0.25",
         "before the final write"),
        (["greedy"], "greedy soup of 1 + run1", "after scoring"),
        (["greedy", "--workers", "2"], "run0", "after scoring 'greedy soup of 1 + run1'"),
    ],
    ids=["sweep candidate", "sweep candidate in a worker", "greedy step", "ingredient in a worker"],
)  # fmt: skip
def test_input_rewritten_at_the_same_size_while_a_candidate_is_scored_stops_the_run(
    command: list[str],
    when: str,
    seen: str,
    tmp_path: Path,
    make_ingredients: Maker,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Was: the soup was written from the rewritten input, exit 0, and no score described
    it. Every file of every input is stamped when the run starts and checked after each
    evaluation in the soup's process, and before the final write."""
    a, b = make_ingredients(2)
    out = tmp_path / "soup.safetensors"
    flip = FLIP.format(path=b)
    evaluator = f'[ "$SOUP_CANDIDATE" = "{when}" ] && {flip}; echo 1; : {{ckpt}}'
    capsys.readouterr()
    name, *options = command
    assert main([name, str(a), str(b), "-o", str(out), "--eval", evaluator, *options]) == 1
    line = one_error_line(capsys.readouterr().err, str(b), "it was rewritten", seen)
    assert "input changed during the run" in line
    assert not out.exists() and not list(tmp_path.glob(".*soup-*"))


def test_file_added_to_an_input_folder_mid_run_stops_the_run(
    tmp_path: Path, make_ingredients: Maker, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = make_ingredients(2, "hf-sharded")
    out = tmp_path / "soup.safetensors"
    evaluator = f"touch {b}/model-00003-of-00003.safetensors; echo 1; : {{ckpt}}"
    capsys.readouterr()
    assert main(["greedy", str(a), str(b), "-o", str(out), "--eval", evaluator]) == 1
    one_error_line(capsys.readouterr().err, "model-00003-of-00003.safetensors", "it appeared")
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# One history, one run.


def test_a_locked_history_refuses_a_second_writer(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    with History(path) as first:
        first.append({"kind": "ingredient", "model_name": "a", "held_out": 1.0})
        with pytest.raises(SoupError, match="another soup run is using this history"):
            History(path, resume=True)
        with pytest.raises(SoupError, match="--resume"):
            History(path)
    with History(path, resume=True) as again:  # released: resumable
        assert again.records == [{"kind": "ingredient", "model_name": "a", "held_out": 1.0}]


def test_a_history_created_and_never_written_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    History(path).close()
    assert not path.exists()


@pytest.mark.slow  # a child process importing torch
def test_two_greedy_runs_never_interleave_one_history(
    tmp_path: Path, make_ingredients: Maker, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = make_ingredients(3)
    out = tmp_path / "soup.safetensors"
    hist = tmp_path / "soup.history.jsonl"
    argv = ["greedy", *map(str, inputs), "-o", str(out), "--eval", "sleep 1; echo 1; : {ckpt}"]
    first = subprocess.Popen([sys.executable, "-c", UNSUPERVISED, *argv], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (hist.exists() and hist.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hist.read_text(), "the first run never wrote its history"
        for extra in ([], ["--resume"]):
            capsys.readouterr()
            assert main([*argv, *extra]) == 1
            line = one_error_line(capsys.readouterr().err, str(hist))
        assert "another soup run" in line
    finally:
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    records = [json.loads(x) for x in hist.read_text().splitlines()]
    names = [r["model_name"] for r in records if r["kind"] == "ingredient"]
    assert sorted(names) == ["run0", "run1", "run2"]
    assert sum(r["kind"] == "greedy" for r in records) == 3
    assert os.path.exists(out)
