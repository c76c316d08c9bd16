"""The bad-input batteries' harness: what every failing `soup` must leave behind.

A case builds its inputs in a fresh folder and returns the CLI arguments (`Setup`); the
run must then end with exit code 1, exactly one `soup: error: ...` line of at most
`MAX_LINE` characters naming the culprit, no Python warning, no new, removed or changed
file (but a history the case allows), and every input byte-for-byte unchanged (sha256).
Shared by test_bad_input.py, test_bad_input_io.py and test_bad_input_cli.py, and by the
side-path, crash and truncation tests for their one-line and sha256 checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from modelsoups.cli import MAX_LINE, main
from modelsoups.cli.common import STATE

Maker = Callable[..., list[Path]]


@dataclass
class Ctx:
    """What a case builder gets: a fresh folder, the ingredient maker, a cleanup stack."""

    tmp: Path
    make: Maker
    stack: contextlib.ExitStack

    @property
    def out(self) -> Path:
        return self.tmp / "soup.safetensors"


@dataclass
class Setup:
    """What a case builder returns: the CLI arguments and what the error must mention."""

    argv: list[str]
    names: list[str] = field(default_factory=list)  # file paths, tensor names, ...
    out: Path | None = None
    keeps: list[str] = field(default_factory=list)  # new files that may stay (a history)


Case = Callable[[Ctx], Setup]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests(paths: list[Path]) -> dict[Path, str]:
    """Path -> sha256 of its bytes."""
    return {p: sha256(p) for p in paths}


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and 'dir' for every folder) under root, hidden
    ones included; FIFOs, sockets and broken links are named by their mode, never opened."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = "dir"
        elif p.is_file():
            out[rel] = sha256(p)
        else:
            out[rel] = f"mode {os.lstat(p).st_mode:o}"
    return out


def partials(folder: Path) -> list[Path]:
    """The writer's temporaries (`.NAME.soup-partial-HOST-PID`) in folder."""
    return sorted(folder.glob(".*.soup-partial-*"))


def read_only_folder(path: Path, stack: contextlib.ExitStack) -> Path:
    """A folder nobody can write into, root included: a read-only tmpfs mounted on it.

    chmod does not stop root, so as root a tmpfs is mounted read-only (needs
    CAP_SYS_ADMIN); without it the test is skipped. Non-root users get a chmod 555 folder.
    """
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        stack.callback(path.chmod, 0o755)
        return path
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip("running as root and cannot mount a read-only tmpfs (no CAP_SYS_ADMIN)")
    stack.callback(subprocess.run, ["umount", str(path)], check=False)
    return path


def soup_command() -> list[str]:
    """The `soup` console script (supervised), as a user runs it."""
    script = Path(sys.executable).parent / "soup"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from modelsoups.cli import run; run()"]


def one_error_line(stderr: str, *names: str) -> str:
    """The one `soup: error: ...` line of stderr (at most MAX_LINE characters), which must
    mention every one of names."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    line = lines[0]
    assert line.startswith("soup: error: "), line
    assert len(line) <= MAX_LINE, f"{len(line)} characters"
    for name in names:
        assert name in line, f"error does not mention {name!r}: {line}"
    return line


def assert_failed_cleanly(
    rc: int, stderr: str, setup: Setup, before: dict[str, str], root: Path
) -> None:
    """Exit code 1, one line naming setup.names, root exactly as in `before`."""
    assert rc == 1, f"exit code {rc}: {stderr}"
    one_error_line(stderr, *setup.names)
    after = snapshot(root)
    for name in setup.keeps:
        after.pop(name, None)
    assert after == before, "files were created, removed or changed"
    temporaries = (".soup-partial-", "soup-candidate-")
    leftovers = [p for p in root.rglob("*") if any(t in p.name for t in temporaries)]
    assert not leftovers, leftovers


def run_case(
    build: Case,
    tmp_path: Path,
    make_ingredients: Maker,
    capsys: pytest.CaptureFixture[str],
    *,
    quiet: bool = False,
) -> None:
    """Build one case, run `soup` in-process on it and check that it failed cleanly."""
    with contextlib.ExitStack() as stack:
        setup = build(Ctx(tmp_path, make_ingredients, stack))
        out = setup.out or tmp_path / "soup.safetensors"
        existed = out.exists()
        before = snapshot(tmp_path)
        capsys.readouterr()
        STATE.update(quiet=quiet, debug=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc = main(setup.argv)
        stderr = capsys.readouterr().err
        assert_failed_cleanly(rc, stderr, setup, before, tmp_path)
        assert out.exists() == existed
        assert [str(w.message) for w in caught] == []  # a warning is a second line
        assert not (tmp_path / "PWNED").exists(), "a pickle or a file name ran code"


def run_subprocess_case(build: Case, tmp_path: Path, make_ingredients: Maker) -> None:
    """The same through a real `soup` process: exit code and stderr as a user sees them."""
    with contextlib.ExitStack() as stack:
        setup = build(Ctx(tmp_path, make_ingredients, stack))
        before = snapshot(tmp_path)
        proc = subprocess.run(
            [*soup_command(), *setup.argv], capture_output=True, text=True, timeout=120
        )
        assert proc.stdout == ""
        assert_failed_cleanly(proc.returncode, proc.stderr, setup, before, tmp_path)
