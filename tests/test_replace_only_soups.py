"""What `--overwrite` (and a report, which is always replaced) may replace: a file, or a
folder of model files. Never a device, FIFO or socket (`-o /dev/null --overwrite` once
swapped the machine's /dev/null for a soup folder), never a folder holding anything else
(`-o ~ --overwrite` would have deleted a home folder). The special files here live in the
test's folder: a regression must not break the machine's /dev/null."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
from battery import Case, Ctx, Maker, Setup, run_case

from modelsoups.cli import main


def _fifo(c: Ctx) -> Path:
    path = c.tmp / "pipe"
    os.mkfifo(path)
    return path


def _socket(c: Ctx) -> Path:
    path = c.tmp / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    c.stack.callback(sock.close)
    return path


def _greedy(c: Ctx, *extra: str) -> list[str]:
    a, b = c.make(2)
    return ["greedy", str(a), str(b), "-o", str(c.out),
            "--eval", 'python -c "print(0.5)" {ckpt}', *extra]  # fmt: skip


def output_fifo_overwrite(c: Ctx) -> Setup:
    a, b = c.make(2)
    fifo = _fifo(c)
    return Setup(["uniform", str(a), str(b), "-o", str(fifo), "--overwrite"], [str(fifo)], fifo)


def output_socket_overwrite(c: Ctx) -> Setup:
    a, b = c.make(2)
    sock = _socket(c)
    return Setup(["uniform", str(a), str(b), "-o", str(sock), "--overwrite"], [str(sock)], sock)


def output_folder_with_a_subfolder(c: Ctx) -> Setup:
    a, b = c.make(2)
    home = c.tmp / "home"
    (home / "projects").mkdir(parents=True)
    (home / "model.safetensors").write_bytes(b"")
    argv = ["uniform", str(a), str(b), "-o", str(home), "--overwrite"]
    return Setup(argv, [str(home), "projects"], home)


def output_folder_with_other_files(c: Ctx) -> Setup:
    a, b = c.make(2)
    home = c.tmp / "work"
    home.mkdir()
    (home / "notes.txt").write_text("mine\n")
    return Setup(["weighted", str(a), str(b), "--weights", "1,2", "-o", str(home), "--overwrite"],
                 [str(home), "notes.txt"], home)  # fmt: skip


def report_fifo(c: Ctx) -> Setup:
    fifo = _fifo(c)
    return Setup(_greedy(c, "--report", str(fifo)), [str(fifo)])


def history_socket(c: Ctx) -> Setup:
    sock = _socket(c)
    return Setup(_greedy(c, "--history", str(sock)), [str(sock)])


CASES: list[tuple[str, Case]] = [
    ("-o FIFO --overwrite", output_fifo_overwrite),
    ("-o socket --overwrite", output_socket_overwrite),
    ("-o folder holding a subfolder --overwrite", output_folder_with_a_subfolder),
    ("-o folder holding other files --overwrite", output_folder_with_other_files),
    ("--report FIFO", report_fifo),
    ("--history socket", history_socket),
]


@pytest.mark.parametrize("build", [b for _, b in CASES], ids=[i for i, _ in CASES])
def test_special_files_and_foreign_folders_are_never_replaced(
    build: Case, tmp_path: Path, make_ingredients: Maker, capsys: pytest.CaptureFixture[str]
) -> None:
    run_case(build, tmp_path, make_ingredients, capsys, quiet=True)
    kinds = {p.name: stat.S_IFMT(os.lstat(p).st_mode) for p in tmp_path.iterdir()}
    assert kinds.get("pipe", stat.S_IFIFO) == stat.S_IFIFO
    assert kinds.get("sock", stat.S_IFSOCK) == stat.S_IFSOCK


def test_overwrite_still_replaces_a_soup_folder(
    tmp_path: Path, make_ingredients: Maker, quiet_cli: None
) -> None:
    a, b = make_ingredients(2)
    out = tmp_path / "soup"
    assert main(["uniform", str(a), str(b), "-o", str(out), "--max-shard-size", "1KB"]) == 0
    (out / "config.json").write_text("{}")
    assert main(["uniform", str(a), str(b), "-o", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file()
