"""docs/ecosystem.md is true: its files are written and its commands run, in order.

Fenced blocks whose info string has `file=NAME` are written to NAME in an empty folder;
every line of a `bash` block is a command: `soup ...` runs in this process (`main`, so that a
Ray runtime already started by tests/test_ray.py is reused), `python SCRIPT.py ...` runs the
script in this process too (`runpy`, saving a torch/transformers import per script); a
```` ```python no-run ```` block is shown but not run (it needs a package that may not import).
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from modelsoups.cli import main

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def blocks(doc: Path) -> list[tuple[str, str]]:
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(doc.read_text())]


def commands(body: str) -> list[str]:
    """Lines of a bash block, comments dropped, `\\` continuations joined."""
    out, pending = [], ""
    for line in body.splitlines():
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


def run(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    words = shlex.split(command)
    if words[0] == "soup":
        code = main(words[1:])
        assert code == 0, f"{command!r} exited {code}: {capsys.readouterr().err[-2000:]}"
    elif words[0] == "python" and words[1].endswith(".py"):
        argv = sys.argv
        sys.argv = words[1:]
        try:
            runpy.run_path(words[1], run_name="__main__")
        finally:
            sys.argv = argv
    else:
        raise AssertionError(f"README command that this test cannot run: {command!r}")


def check_blocks(doc: Path) -> None:
    """Every fenced block is a file to write, a bash block to run, or marked no-run."""
    kinds = {info.split()[0] for info, _ in blocks(doc) if info}
    assert kinds <= {"python", "bash", "yaml", "text"}, kinds
    for info, _ in blocks(doc):
        assert info.startswith("bash") or "file=" in info or "no-run" in info, info


def run_doc(doc: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Write the doc's files into `folder` (the cwd) and run its bash blocks; return them."""
    ran = []
    for info, body in blocks(doc):
        name = next((w[5:] for w in info.split() if w.startswith("file=")), None)
        if name is not None:
            (folder / name).write_text(body)
        elif info == "bash":
            for command in commands(body):
                run(command, capsys)
                ran.append(command)
    return ran
