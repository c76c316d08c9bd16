"""Usage errors (a value of the wrong type, an unknown option or command, a missing argument
or option value) are one `soup: error:` line naming what is wrong, with exit code 2 (click's
code for usage errors), never click's multi-line usage block."""

from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

import pytest
from battery import one_error_line, snapshot, soup_command
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsoups.cli import main

pytestmark = pytest.mark.usefixtures("quiet_cli")

SOUP = ["a.safetensors", "b.safetensors", "-o", "soup.safetensors"]
EVAL = ["--eval", "echo 1; : {ckpt}"]

CASES = [
    (["greedy", *SOUP, *EVAL, "--eval-timeout", "abc"], ["'--eval-timeout'", "number"]),
    (["greedy", *SOUP, *EVAL, "--workers", "two"], ["'--workers'", "integer"]),
    (["wise-ft", *SOUP, *EVAL, "--workers", "1.5"], ["'--workers'", "integer"]),
    (["learned", *SOUP, "--epochs", "x"], ["'--epochs'", "integer"]),
    (["stock", *SOUP, "--eval-timeout", ""], ["'--eval-timeout'"]),
    (["uniform", *SOUP, "--bogus"], ["--bogus", "No such option"]),
    (["weighted", *SOUP, "--weights"], ["'--weights'", "requires an argument"]),
    (["uniform", "a.safetensors", "-o"], ["'-o'", "requires an argument"]),
    (["greedy", "a.safetensors", *EVAL], ["'--output'", "Missing option"]),
    (["uniform"], ["'inputs'", "Missing argument"]),
    (["inspect"], ["Missing argument"]),
    (["frobnicate"], ["'frobnicate'", "No such command"]),
    (["report", "--bogus"], ["--bogus"]),
]


@pytest.mark.parametrize(("argv", "words"), CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_usage_error_is_one_line_with_exit_code_2(
    argv: list[str],
    words: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err, *words)
    assert "Usage:" not in line and captured.out == ""
    assert snapshot(tmp_path) == {}  # nothing written


@settings(max_examples=40)
@given(value=st.text(max_size=20).filter(lambda v: not v.startswith("-")))
def test_any_value_of_a_numeric_option_gives_one_line(value: str) -> None:
    """Whatever the value (text, NaN, inf, empty, control characters), `--workers` and
    `--eval-timeout` end in one line: exit 2 when it is not a number, 1 when the number
    is refused or the (missing) inputs are."""
    for option in ("--workers", "--eval-timeout"):
        argv = ["greedy", "/nonexistent/a.safetensors", "/nonexistent/b.safetensors",
                "-o", "/nonexistent/soup.safetensors", *EVAL, option, value]  # fmt: skip
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main([*argv, "-q"])
        assert rc in (1, 2), rc
        one_error_line(err.getvalue())


@pytest.mark.slow  # a real process imports the CLI
def test_usage_error_in_a_real_process_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([*soup_command(), *CASES[0][0]], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc.stderr, *CASES[0][1])
    assert proc.stdout == ""


def test_soup_alone_still_shows_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    """No arguments at all is a request for help, shown in full as click does (exit 2)."""
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "Usage: soup" in captured.out + captured.err
    assert "greedy" in captured.out + captured.err
