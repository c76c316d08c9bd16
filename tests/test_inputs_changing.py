"""Inputs that change while the soup reads them, and the OS limits of reading many files.

An evaluator, a training job still writing, or anyone else can truncate or rewrite an
input mid-run. Each way gives one `soup: error:` line naming the file, exit code 1 and no
leftovers:

- changed before a tensor is read: the reader's size check (in-process);
- rewritten in place, same size: the check of every input before the soup is published;
- cut short *during* a read (SIGBUS, which Python cannot catch): the supervising `soup`
  parent process (`cli/supervise.py`). A control run without the supervisor shows that
  the same truncation really kills the process with SIGBUS.

Deleting an input or replacing it by a rename is not a change of what is read: the open
file stays intact and the soup is correct. And 2000 inputs under `ulimit -n 1024` work
when the hard limit allows, or fail with one line.

The truncations are real (`os.truncate` on the real file); hooks only choose the moment,
as the crash tests' hooks choose when to kill.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from battery import digests, one_error_line, partials, soup_command
from midrun import TENSORS, alive, big_inputs, paused_soup, start_paused
from safetensors.torch import load_file, save_file

from modelsoups.cli import main

pytestmark = pytest.mark.usefixtures("quiet_cli")


def after_tensors(n: int, action: Callable[[], None], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `action` once, right after the writer has received `n` tensors."""
    from modelsoups.io import writer

    original, written = writer.ShardedWriter.write, []

    def write(self: object, name: str, array: object) -> None:
        original(self, name, array)  # type: ignore[arg-type]
        written.append(name)
        if len(written) == n:
            action()

    monkeypatch.setattr(writer.ShardedWriter, "write", write)


def run_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("kind", "delta"),
    [("file", -(8 << 20)), ("sharded folder", -(8 << 20)), ("file", +4096)],
    ids=["cut short", "cut short, folder output", "extended"],
)
def test_input_resized_mid_run_is_one_line(
    tmp_path: Path,
    kind: str,
    delta: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = big_inputs(tmp_path)
    kept = digests([a])
    out = tmp_path / ("soup.safetensors" if kind == "file" else "soup")
    extra = ["--max-shard-size", "10MB"] if kind != "file" else []
    size = b.stat().st_size
    # Cut the last two tensors (or append) while the 4th is written: the tensors being
    # read now (the 5th, maybe the 6th) stay whole, so this process cannot die of SIGBUS;
    # the next tensor's size check must stop the soup.
    after_tensors(4, lambda: os.truncate(b, size + delta), monkeypatch)
    rc, err = run_in_process(["uniform", str(a), str(b), "-o", str(out), *extra], capsys)
    assert rc == 1
    one_error_line(err, str(b), f"from {size} to {size + delta} bytes")
    assert not out.exists() and partials(tmp_path) == []
    assert digests([a]) == kept


def test_input_rewritten_in_place_is_caught_before_publishing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same size, other bytes, after its tensors were read: no size check can see it; the
    check of every input before the rename does (mtime)."""
    a, b = big_inputs(tmp_path)
    kept = digests([a])
    out = tmp_path / "soup.safetensors"

    def rewrite() -> None:
        time.sleep(0.01)  # a later mtime, even on coarse-grained clocks
        with open(b, "r+b") as f:
            f.seek(-4, os.SEEK_END)
            f.write(bytes(4))

    after_tensors(TENSORS, rewrite, monkeypatch)
    rc, err = run_in_process(["uniform", str(a), str(b), "-o", str(out)], capsys)
    assert rc == 1
    one_error_line(err, str(b), "it was rewritten")
    assert not out.exists() and partials(tmp_path) == []
    assert digests([a]) == kept


@pytest.mark.parametrize("how", ["deleted", "replaced by a rename"])
def test_input_deleted_or_replaced_mid_run_still_soups_the_old_file(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The open file is intact (a training job saving atomically does exactly this)."""
    a, b = big_inputs(tmp_path)
    want = {k: (v + load_file(b)[k]) / 2 for k, v in load_file(a).items()}

    def change() -> None:
        if how == "deleted":
            b.unlink()
        else:
            other = b.with_name("new.safetensors")
            save_file({k: torch.zeros_like(v) for k, v in want.items()}, other)
            os.replace(other, b)

    after_tensors(2, change, monkeypatch)
    out = tmp_path / "soup.safetensors"
    assert main(["uniform", str(a), str(b), "-o", str(out)]) == 0
    got = load_file(out)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v)


# ---------------------------------------------------------------------------------------
# SIGBUS: the file is cut short after the size check, while numpy reads it.

# `soup` (the console script, supervised) with a hook that truncates run1 right after
# handing out the view of one of its tensors for the soup (the second `array` call for
# it: the first is the similarity check's sample), so the read that follows faults.
SIGBUS_CHILD = textwrap.dedent(
    """
    import os, sys
    from modelsoups.io.safetensors_file import SafetensorsFile

    target, calls, original = sys.argv[1], [], SafetensorsFile.array

    def array(self, name):
        view = original(self, name)
        if str(self.path) == target and name == "layer5.weight":
            calls.append(name)
            if len(calls) == 2:
                os.truncate(self.path, 4096)
        return view

    SafetensorsFile.array = array
    from modelsoups.cli import run
    sys.argv = ["soup", *sys.argv[2:]]
    run()
    """
)


@pytest.mark.slow  # child processes importing torch
@pytest.mark.parametrize("supervised", [True, False], ids=["soup", "control: unsupervised"])
def test_input_cut_short_during_a_read(tmp_path: Path, supervised: bool) -> None:
    a, b = big_inputs(tmp_path)
    kept, size = digests([a]), b.stat().st_size
    out = tmp_path / "soup.safetensors"
    env = {**os.environ, **({} if supervised else {"SOUP_UNSUPERVISED": "1"})}
    argv = ["uniform", str(a), str(b), "-o", str(out)]
    proc = subprocess.run([sys.executable, "-c", SIGBUS_CHILD, str(b), *argv],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert b.stat().st_size == 4096, "the hook did not fire"
    if not supervised:  # what happens without the supervisor: a silent death, a leftover
        assert proc.returncode == -signal.SIGBUS, proc.stderr
        assert len(partials(tmp_path)) == 1
        return
    assert proc.returncode == 1, proc.stderr
    one_error_line(proc.stderr, str(b), f"from {size} to 4096 bytes", "Nothing was written")
    assert not out.exists() and partials(tmp_path) == []
    assert digests([a]) == kept


# `soup` (supervised) that cuts its second input in half once `n` tensors were written.
CUT_AFTER = textwrap.dedent(
    """
    import os, sys
    from modelsoups.io import writer

    n, target, original, written = int(sys.argv[1]), sys.argv[2], writer.ShardedWriter.write, []

    def write(self, name, tensor):
        original(self, name, tensor)
        written.append(name)
        if len(written) == n:
            os.truncate(target, os.stat(target).st_size // 2)

    writer.ShardedWriter.write = write
    from modelsoups.cli import run
    sys.argv = ["soup", *sys.argv[3:]]
    run()
    """
)


@pytest.mark.slow
def test_pickle_input_cut_short_mid_run_is_one_line(tmp_path: Path) -> None:
    """Pickles are memory-mapped by torch.load: the same checks, the same one line."""
    a, b = (p.with_suffix(".pt") for p in big_inputs(tmp_path))
    for p in (a, b):
        torch.save(load_file(p.with_suffix(".safetensors")), p)
        p.with_suffix(".safetensors").unlink()
    kept = digests([a])
    out = tmp_path / "soup.safetensors"
    argv = ["uniform", str(a), str(b), "-o", str(out)]
    proc = subprocess.run([sys.executable, "-c", CUT_AFTER, "3", str(b), *argv],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    one_error_line(proc.stderr, str(b), "changed while the soup was reading it")
    assert not out.exists() and partials(tmp_path) == []
    assert digests([a]) == kept


@pytest.mark.slow
def test_input_truncated_by_another_process_during_a_real_run(tmp_path: Path) -> None:
    """No hook at all: a real `soup` over 2 x 256 MiB, and another process cutting one
    input as soon as the soup's temporary appears. Whichever check catches it (the size
    check, or the supervisor after a SIGBUS), the user sees one line naming the file."""
    paths = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        sd = {f"layer{j}": torch.randn(1 << 22, generator=g) for j in range(16)}
        paths.append(tmp_path / f"run{i}.safetensors")
        save_file(sd, paths[-1])
    a, b = paths
    kept = digests([a])
    out = tmp_path / "soup.safetensors"
    proc = subprocess.Popen([*soup_command(), "uniform", str(a), str(b), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not partials(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    os.truncate(b, 1 << 20)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, f"the soup was not stopped (finished first?): {stderr}"
    one_error_line(stderr, str(b), "changed while the soup was reading it")
    assert not out.exists() and partials(tmp_path) == []
    assert digests([a]) == kept


# ---------------------------------------------------------------------------------------
# The supervisor and signals.


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to soup", "SIGINT to its process group"])
def test_signals_reach_the_supervised_soup_once(tmp_path: Path, how: str) -> None:
    """`kill PID` (the parent) is forwarded; Ctrl-C reaches parent and child and is
    forwarded too: either way the child cleans up once and exits 130 with one line."""
    inputs = big_inputs(tmp_path)
    before = digests(inputs)
    out = tmp_path / "soup.safetensors"
    proc = start_supervised(["uniform", *map(str, inputs), "-o", str(out)])
    if how.startswith("SIGTERM"):
        proc.terminate()
    else:
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["soup: interrupted; temporary files were removed"]
    assert not out.exists() and partials(tmp_path) == []
    assert digests(inputs) == before


def start_supervised(argv: list[str]) -> subprocess.Popen[str]:
    """`soup` (supervised) in a process group of its own, paused mid-write."""
    return start_paused(argv, child=paused_soup("run"), new_session=True)


@pytest.mark.slow
def test_killing_the_supervisor_kills_the_work(tmp_path: Path) -> None:
    """SIGKILL to `soup` leaves what it always left: no output, one dead-pid temporary."""
    inputs = big_inputs(tmp_path)
    out = tmp_path / "soup.safetensors"
    proc = start_supervised(["uniform", *map(str, inputs), "-o", str(out)])
    (partial,) = partials(tmp_path)
    child = int(partial.name.rsplit("-", 1)[1])
    assert child != proc.pid  # the work runs in a child process
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(child)
    assert not out.exists()


def many_inputs(folder: Path, n: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for i in range(n):
        paths.append(folder / f"m{i:04d}.safetensors")
        save_file({"w": torch.full((4,), float(i)), "n": torch.tensor(3)}, paths[-1])
    return paths


def run_limited(argv: list[str], nofile: tuple[int, int]) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    return subprocess.run([*soup_command(), *argv], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)  # fmt: skip


@pytest.mark.slow
def test_2000_inputs_under_ulimit_1024(tmp_path: Path) -> None:
    """The soft limit is raised towards the hard one: 2000 inputs soup. (Slow: ~30 s, most
    of it the similarity check comparing every pair of inputs.)"""
    paths = many_inputs(tmp_path / "many", 2000)
    out = tmp_path / "soup.safetensors"
    proc = run_limited(["uniform", str(tmp_path / "many" / "*.safetensors"), "-o", str(out)],
                       (1024, 4096))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    torch.testing.assert_close(load_file(out)["w"], torch.full((4,), 999.5))
    assert len(paths) == 2000


@pytest.mark.slow
def test_2000_inputs_under_a_hard_limit_of_1024_is_one_line(tmp_path: Path) -> None:
    paths = many_inputs(tmp_path / "many", 2000)
    before = hashlib.sha256(json.dumps(sorted(digests(paths).values())).encode()).hexdigest()
    out = tmp_path / "soup.safetensors"
    proc = run_limited(["uniform", str(tmp_path / "many" / "*.safetensors"), "-o", str(out)],
                       (1024, 1024))  # fmt: skip
    assert proc.returncode == 1
    one_error_line(proc.stderr, "too many open files", "limit is 1024", "ulimit -n")
    assert not out.exists() and partials(tmp_path) == []
    after = hashlib.sha256(json.dumps(sorted(digests(paths).values())).encode()).hexdigest()
    assert after == before


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("rewritten", "(it was rewritten)"),
        ("extended", "(its size went from 6 to 7 bytes)"),
        ("deleted", "(it was deleted)"),
        ("replaced", "(it was replaced)"),
        ("added", "(it appeared)"),
    ],
)
def test_the_run_checks_and_the_adapter_files_describe_a_change_in_the_same_words(
    tmp_path: Path, change: str, words: str
) -> None:
    """One notion of "not as it was" (`io.files.stamps`), one wording of the difference:
    the run's guard, the check after an eval command and the adapters' reopened files each
    give one line that names the very file of the folder and says how it changed."""
    from modelsoups.errors import SoupError
    from modelsoups.guard import InputGuard
    from modelsoups.io.adapter_files import ReopenedFiles
    from modelsoups.io.files import stamps
    from modelsoups.sandbox import check_unchanged

    folder = tmp_path / "run"
    folder.mkdir()
    file = folder / ("new.json" if change == "added" else "config.json")
    if change != "added":
        file.write_bytes(b"abcdef")
    before, guard, files = stamps(folder), InputGuard([folder]), ReopenedFiles([folder])
    if change == "rewritten":
        file.write_bytes(b"ABCDEF")
        os.utime(file, ns=(1, 1))  # another mtime, even on a coarse clock
    elif change == "extended":
        file.write_bytes(b"abcdefg")
    elif change == "deleted":
        file.unlink()
    elif change == "replaced":
        (folder / "tmp").write_bytes(b"abcdef")
        os.replace(folder / "tmp", file)
    else:
        file.write_bytes(b"{}")
    errors = []
    for check in (
        lambda: guard.check("now"),
        lambda: check_unchanged(folder, before, "c0"),
        lambda: files.check(0),
    ):
        with pytest.raises(SoupError) as e:
            check()
        errors.append(str(e.value))
    for line in errors:
        assert line.startswith(f"{file}: ") and words in line and "\n" not in line
