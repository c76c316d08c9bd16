"""README-ecosystem.md is true: its files are written and its commands run, in order.

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
from safetensors.torch import load_file

from modelsoups.cli import main

README = Path(__file__).resolve().parent.parent / "README-ecosystem.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(README.read_text())]


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


def test_blocks_are_understood() -> None:
    kinds = {info.split()[0] for info, _ in blocks() if info}
    assert kinds <= {"python", "bash", "yaml"}, kinds
    for info, _ in blocks():
        assert info.startswith("bash") or "file=" in info or "no-run" in info, info


@pytest.mark.slow
def test_every_readme_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")
    pytest.importorskip("mlflow")
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    for name, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true"),
                        ("RAY_USAGE_STATS_ENABLED", "0")):  # fmt: skip
        monkeypatch.setenv(name, value)  # nothing leaves this machine
    ran = []
    for info, body in blocks():
        name = next((w[5:] for w in info.split() if w.startswith("file=")), None)
        if name is not None:
            (tmp_path / name).write_text(body)
        elif info == "bash":
            for command in commands(body):
                run(command, capsys)
                ran.append(command)
    assert len(ran) >= 15, ran
    # what the tour says happened, happened
    for out in ("greedy", "wise", "recipe-soup", "mlflow-soup", "timm-ema-soup", "timm-soup"):
        assert (tmp_path / f"{out}.safetensors").is_file(), out
    assert (tmp_path / "report.html").read_text().startswith("<!doctype html>")
    assert (tmp_path / "wise.png").stat().st_size > 1000
    assert "recipe_file" in (tmp_path / "recipe-soup.report.json").read_text()
    assert sorted(load_file(tmp_path / "timm-soup.safetensors")) == [
        "bn1.num_batches_tracked", "head.weight", "pos_embed",
    ]  # fmt: skip
    assert (tmp_path / "from-mlflow" / "scores.json").is_file()
    assert (tmp_path / "bert-soup" / "config.json").is_file()
