"""Crash safety: a killed or starved soup never leaves a half-written checkpoint behind.

- SIGKILL in the middle of writing a large output (file and sharded folder): the final
  name does not exist, only a temporary named `.NAME.soup-partial-HOST-PID`, which the next
  run on this host removes; the inputs are byte-for-byte unchanged.
- SIGTERM at the same point: the CLI cleans up itself and exits 130.
- A concurrent run never removes the temporary of a run that is still alive.
- Disk full (a 1 MiB tmpfs, when mountable) and a file-size limit (RLIMIT_FSIZE): one clear
  error line, the partial output removed.

The child processes pause at a chosen tensor through a hook on the writer, so the kill
lands mid-write every time instead of racing the clock.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from battery import digests, one_error_line, partials, soup_command
from midrun import (
    NUMEL,
    TENSORS,
    alive,
    big_inputs,
    file_size_limited,
    start_paused,
)
from safetensors.torch import load_file, save_file

from modelsoups import LocalExecutor
from modelsoups.cli import main
from modelsoups.io.writer import remove_stale_partials

pytestmark = pytest.mark.usefixtures("quiet_cli")

# Pauses right after the first rename the soup makes (the swap into the final name).
CHILD_AFTER_RENAME = textwrap.dedent(
    """
    import json, os, sys, time

    rename = os.replace

    def replace(src, dst):
        rename(src, dst)
        print("paused", flush=True)
        time.sleep(120)

    os.replace = replace
    from modelsoups.cli import main
    sys.exit(main(json.loads(sys.argv[2])))
    """
)


@pytest.mark.slow  # a child process importing torch: ~3-5 s on 2 busy cores
@pytest.mark.parametrize("kind", ["file", "sharded folder"])
def test_sigkill_mid_write_leaves_no_output(tmp_path: Path, kind: str) -> None:
    inputs = big_inputs(tmp_path)
    before = digests(inputs)
    out = tmp_path / ("soup.safetensors" if kind == "file" else "soup")
    extra = ["--max-shard-size", "10MB"] if kind != "file" else []
    argv = ["uniform", *map(str, inputs), "-o", str(out), *extra]

    proc = start_paused(argv)
    (partial,) = partials(tmp_path)
    assert partial.name == f".{out.name}.soup-partial-{socket.gethostname()}-{proc.pid}"
    written = sum(p.stat().st_size for p in [partial, *partial.rglob("*")] if p.is_file())
    # half the tensors were handed to the writer; what reached the file depends on its
    # staging buffers (2 MiB blocks), but some of it did
    assert 0 < written < TENSORS * NUMEL * 4, "the kill should land mid-write"
    remove_stale_partials(out)  # what a concurrent run does: a live run's partial stays
    assert partial.exists()
    proc.kill()
    proc.wait(timeout=10)

    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert partials(tmp_path) == [partial]  # only the clearly named temporary is left
    assert digests(inputs) == before

    # The next run for the same output removes the dead run's temporary and succeeds.
    assert main(argv) == 0
    assert partials(tmp_path) == []
    assert digests(inputs) == before
    a, b = load_file(inputs[0]), load_file(inputs[1])
    soup = load_file(out) if kind == "file" else _load_folder(out)
    for name in a:
        torch.testing.assert_close(soup[name], (a[name] + b[name]) / 2)


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1, "the sharded case should write several shards"
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        out.update(load_file(shard))
    return out


@pytest.mark.slow
def test_sigkill_during_overwrite_keeps_a_complete_file(tmp_path: Path) -> None:
    """--overwrite of a file: one atomic rename, so a kill at any point leaves the old or
    the new soup under the name, never nothing (was: old moved aside, then new renamed)."""
    inputs = big_inputs(tmp_path)
    out = tmp_path / "soup.safetensors"
    out.write_bytes(b"previous soup")
    argv = ["uniform", *map(str, inputs), "-o", str(out), "--overwrite"]
    proc = start_paused(argv, child=CHILD_AFTER_RENAME)
    proc.kill()
    proc.wait(timeout=10)
    assert out.is_file()
    soup = load_file(out)  # the complete new soup
    assert len(soup) == TENSORS
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name, *(p.name for p in inputs)]
    )


@pytest.mark.slow
def test_sigterm_mid_write_cleans_up(tmp_path: Path) -> None:
    inputs = big_inputs(tmp_path)
    before = digests(inputs)
    out = tmp_path / "soup.safetensors"
    proc = start_paused(["uniform", *map(str, inputs), "-o", str(out)])
    assert partials(tmp_path)
    proc.terminate()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["soup: interrupted; temporary files were removed"]
    assert not out.exists()
    assert partials(tmp_path) == []
    assert digests(inputs) == before


def test_only_this_hosts_dead_temporaries_are_removed(tmp_path: Path) -> None:
    """On a shared filesystem a pid from another host means nothing here: its temporary
    (maybe of a live run) is left; this host's temporary of a dead process is removed."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    out = tmp_path / "soup.safetensors"
    mine = tmp_path / f".soup.safetensors.soup-partial-{socket.gethostname()}-{pid}"
    other = tmp_path / f".soup.safetensors.soup-partial-other-host.example-{pid}"
    mine.write_bytes(b"x")
    other.mkdir()
    remove_stale_partials(out)
    assert not mine.exists() and other.is_dir()


# ---------------------------------------------------------------------------------------
# Disk full.


@pytest.fixture
def tiny_disk(tmp_path: Path) -> object:
    """A 1 MiB tmpfs: writing a soup of a few MiB into it fills it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN); RLIMIT_FSIZE covers it")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("name", ["soup.safetensors", "soup-folder"])
def test_disk_full(
    tmp_path: Path, tiny_disk: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = big_inputs(tmp_path)
    before = digests(inputs)
    out = tiny_disk / name
    extra = ["--max-shard-size", "600KB"] if not name.endswith(".safetensors") else []
    capsys.readouterr()
    rc = main(["uniform", *map(str, inputs), "-o", str(out), *extra])
    assert rc == 1
    one_error_line(capsys.readouterr().err, str(out), "disk full")
    assert list(tiny_disk.iterdir()) == []  # neither the output nor the partial
    assert digests(inputs) == before


@pytest.mark.slow
def test_file_size_limit(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (works without privileges): writes past 1 MiB fail with EFBIG."""
    inputs = big_inputs(tmp_path)
    before = digests(inputs)
    out = tmp_path / "soup.safetensors"
    argv = ["uniform", *map(str, inputs), "-o", str(out)]
    proc = subprocess.run([sys.executable, "-c", file_size_limited(1 << 20), *argv],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    one_error_line(proc.stderr, str(out), "nothing was kept")
    assert not out.exists()
    assert partials(tmp_path) == []
    assert digests(inputs) == before
    assert set(os.listdir(tmp_path)) == {p.name for p in inputs}


# ---------------------------------------------------------------------------------------
# Greedy soup: the history survives a SIGKILL and --resume continues exactly.

# Held-out "accuracy" of a candidate: minus the squared distance of `w` to the base. Pure
# Python (no torch import), so an evaluation costs milliseconds. Every call is logged to
# $CALLS; at call number $KILL_AT it SIGKILLs the soup process ($KILL_PID).
EVAL_SCRIPT = textwrap.dedent(
    """
    import array, json, os, signal, struct, sys, time

    path = sys.argv[sys.argv.index("--ckpt") + 1]
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    begin, end = header["w"]["data_offsets"]
    w = array.array("f", data[begin:end])
    with open(os.environ["CALLS"], "a") as f:
        f.write(os.environ["SOUP_CANDIDATE"] + "\\n")
    with open(os.environ["CALLS"]) as f:
        count = len(f.read().splitlines())
    if os.environ.get("KILL_AT") and count == int(os.environ["KILL_AT"]):
        os.kill(int(os.environ["KILL_PID"]), signal.SIGKILL)
        time.sleep(10)
    print(-sum((x - 1.0) ** 2 for x in w))
    """
)

# `soup` in a child that tells the eval script its pid.
GREEDY_CHILD = (
    "import os, sys; os.environ['KILL_PID'] = str(os.getpid()); "
    "from modelsoups.cli import main; sys.exit(main(sys.argv[1:]))"
)


def greedy_inputs(folder: Path) -> list[Path]:
    """Five fine-tunes around a base of ones; run3 is far off and must be rejected."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    paths = []
    for i, scale in enumerate([1.0, 1.2, 0.9, 3.0, 1.1]):
        sd = {"w": 1.0 + 0.1 * scale * torch.randn(64, generator=g), "n": torch.tensor(7)}
        paths.append(folder / f"run{i}.safetensors")
        save_file(sd, paths[-1])
    return paths


def calls(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_greedy_history_survives_sigkill_and_resume_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = greedy_inputs(tmp_path / "runs")
    before = digests(inputs)
    script = tmp_path / "eval_score.py"
    script.write_text(EVAL_SCRIPT)
    command = f"{sys.executable} {script} --ckpt {{ckpt}}"

    def argv(folder: str, *extra: str) -> list[str]:
        (tmp_path / folder).mkdir(exist_ok=True)
        out = tmp_path / folder / "soup.safetensors"
        return ["greedy", *map(str, inputs), "-o", str(out), "--eval", command, *extra]

    # Reference: an uninterrupted run. 5 ingredient evaluations + 4 greedy steps.
    monkeypatch.setenv("CALLS", str(tmp_path / "calls-ref.txt"))
    assert main(argv("ref")) == 0
    ref_calls = calls(tmp_path / "calls-ref.txt")
    assert len(ref_calls) == 9
    ref_report = json.loads((tmp_path / "ref" / "soup.report.json").read_text())
    assert "run3" not in ref_report["selected"]
    ref_history = (tmp_path / "ref" / "soup.history.jsonl").read_text().splitlines()

    # Crash: SIGKILL while the second greedy candidate is being scored (call 7).
    env = {**os.environ, "CALLS": str(tmp_path / "calls-crash.txt"), "KILL_AT": "7"}
    proc = subprocess.run(
        [sys.executable, "-c", GREEDY_CHILD, *argv("crash")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    out = tmp_path / "crash" / "soup.safetensors"
    assert not out.exists() and partials(out.parent) == []
    # The killed evaluation's candidate folder is left, named for the host and the pid...
    (leftover,) = [p.name for p in out.parent.glob(".*soup-candidate-*")]
    host = re.escape(socket.gethostname())
    assert re.fullmatch(rf"\.soup\.safetensors\.soup-candidate-{host}-\d+", leftover), leftover
    history = (tmp_path / "crash" / "soup.history.jsonl").read_text().splitlines()
    assert history == ref_history[:7]  # 5 ingredients, the first soup, one scored step

    # Resume: only what was not logged is evaluated (the killed call is redone).
    monkeypatch.setenv("CALLS", str(tmp_path / "calls-resume.txt"))
    assert main(argv("crash", "--resume")) == 0
    assert calls(tmp_path / "calls-resume.txt") == ref_calls[6:]
    assert (tmp_path / "crash" / "soup.history.jsonl").read_text().splitlines() == ref_history
    report = json.loads((tmp_path / "crash" / "soup.report.json").read_text())
    assert report["selected"] == ref_report["selected"]
    assert report["weights"] == ref_report["weights"]
    ref_soup, soup = load_file(tmp_path / "ref" / "soup.safetensors"), load_file(out)
    assert soup.keys() == ref_soup.keys()
    assert all(torch.equal(soup[k], ref_soup[k]) for k in soup)
    assert digests(inputs) == before
    # ...and the next run removes it: nothing but the soup and its sidecars remains.
    assert partials(out.parent) == []
    assert not list(out.parent.glob(".*soup-candidate-*"))


# ---------------------------------------------------------------------------------------
# Two runs racing for one output name.


@pytest.mark.parametrize("name", ["soup.safetensors", "soup-folder"])
def test_output_that_appears_meanwhile_is_never_replaced(
    tmp_path: Path,
    make_ingredients: Callable[..., list[Path]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    """Without --overwrite, an output another run finished while this one was writing is
    kept as is (was: a file silently replaced, a folder moved aside and deleted)."""
    from modelsoups.io import writer

    a, b = make_ingredients(2)
    out = tmp_path / name
    original = writer.ShardedWriter.write

    def write(self: object, tensor_name: str, tensor: torch.Tensor) -> None:
        if not out.exists():  # the other run publishes its soup now
            if name.endswith(".safetensors"):
                out.write_bytes(b"the other run's soup")
            else:
                out.mkdir()
                (out / "model.safetensors").write_bytes(b"the other run's soup")
        original(self, tensor_name, tensor)  # type: ignore[arg-type]

    monkeypatch.setattr(writer.ShardedWriter, "write", write)
    capsys.readouterr()
    assert main(["uniform", str(a), str(b), "-o", str(out)]) == 1
    one_error_line(capsys.readouterr().err, "appeared while the soup was being written")
    kept = out if out.is_file() else out / "model.safetensors"
    assert kept.read_bytes() == b"the other run's soup"
    assert partials(tmp_path) == []


# ---------------------------------------------------------------------------------------
# Opening inputs: one loop (ingredients.open_ingredients) for paths, state dicts and modules.


def test_open_ingredients_opens_paths_and_state_dicts_and_closes_on_error(
    tmp_path: Path, make_ingredients: Callable[..., list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelsoups import ingredients

    (a,) = make_ingredients(1)
    ckpts = ingredients.open_ingredients([a, {"w": torch.ones(3)}])
    assert ckpts[1].format == "memory" and torch.equal(ckpts[1].get("w"), torch.ones(3))
    ingredients.close_all(ckpts)
    closed: list[Path] = []
    monkeypatch.setattr(ingredients, "close_all", lambda cs: closed.extend(c.path for c in cs))
    with pytest.raises(Exception, match="missing"):
        ingredients.open_ingredients([a, tmp_path / "missing.safetensors"])
    assert closed == [a]  # the one already open was closed


# ---------------------------------------------------------------------------------------
# Signals with parallel evaluations: stop now, not after every queued evaluation.


@pytest.mark.slow  # worker processes importing torch
@pytest.mark.parametrize("where", ["workers", "ray"])
@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_signal_stops_parallel_evaluations(
    tmp_path: Path, make_ingredients: Callable[..., list[Path]], how: str, where: str
) -> None:
    """Four 60 s evaluations on two workers (local processes, or tasks on a local Ray
    runtime): SIGTERM to the soup (or SIGINT to its process group, as a terminal's Ctrl-C)
    kills the running ones and skips the queued ones; the soup exits 130 with one line and
    leaves no evaluator and no candidate folder behind (was: SIGTERM waited for every
    queued evaluation, 62 s; with --ray, Ray's own SIGTERM handler aborted the process with
    a page of its log, SIGABRT)."""
    if where == "ray":
        pytest.importorskip("ray")
    inputs = make_ingredients(4)
    before = digests(inputs)
    pids = tmp_path / "pids.txt"
    out = tmp_path / "soup.safetensors"
    command = f"echo $$ >> {pids}; sleep 60; echo 1; : {{ckpt}}"
    argv = ["greedy", *map(str, inputs), "-o", str(out), "--eval", command, "--workers", "2"]
    argv += ["--ray"] if where == "ray" else []
    proc = subprocess.Popen([*soup_command(), *argv], stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # a Ray runtime starts in 10-60 s at load 10
        while len(calls(pids)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(calls(pids)) == 2, "the two workers never started their evaluations"
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)  # the evaluations would take 60 s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["soup: interrupted; temporary files were removed"]
    deadline = time.monotonic() + 10  # killed at once; gone once the kernel has reaped them
    while [p for p in map(int, calls(pids)) if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in map(int, calls(pids)) if alive(p)], "an evaluator is still running"
    assert len(calls(pids)) == 2, "a queued evaluation started after the signal"
    assert not out.exists() and not list(tmp_path.glob(".*soup-candidate-*"))
    assert digests(inputs) == before


class Stopped(Exception):
    pass


def _stop_handler(_signum: int, _frame: object) -> None:
    raise Stopped


@pytest.mark.slow  # two worker processes
def test_a_signal_during_a_parallel_map_goes_to_the_handler_in_force_before_it() -> None:
    """SIGTERM while `LocalExecutor.map` waits on its workers is noted, the workers are
    stopped, and the handler installed before `map` then runs (here it raises), from one
    known place rather than from inside concurrent.futures' locks; the handler stays."""
    previous = signal.signal(signal.SIGTERM, _stop_handler)
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        start = time.monotonic()
        timer.start()
        with pytest.raises(Stopped):
            LocalExecutor(2).map(time.sleep, [60, 60])
        assert time.monotonic() - start < 40  # the jobs would take 60 s
        assert signal.getsignal(signal.SIGTERM) is _stop_handler
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------
# The history's disk fills up.


@pytest.mark.slow  # a child process importing torch
def test_history_append_past_the_file_size_limit(
    tmp_path: Path, make_ingredients: Callable[..., list[Path]]
) -> None:
    """RLIMIT_FSIZE stands in for a full disk (EFBIG instead of ENOSPC, same path): the
    ingredient scores are logged (resumed), the next line no longer fits. One line, exit 1,
    the history exactly as it was (no torn line), nothing else left."""
    inputs = make_ingredients(2)
    out = tmp_path / "soup.safetensors"
    hist = tmp_path / "soup.history.jsonl"
    limit = 1 << 16
    records = [{"kind": "ingredient", "model_name": f"run{i}", "held_out": 1.0 - i / 10,
                "pad": ""} for i in range(2)]  # fmt: skip
    size = sum(len(json.dumps(r)) + 1 for r in records)
    records[0]["pad"] = "x" * (limit - 20 - size)  # 20 bytes left: no greedy step fits
    hist.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert hist.stat().st_size == limit - 20
    history_before = hist.read_bytes()
    before = digests(inputs)
    argv = ["greedy", *map(str, inputs), "-o", str(out), "--eval", "echo 1; : {ckpt}",
            "--resume"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", file_size_limited(limit), *argv],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    one_error_line(proc.stderr, str(hist), "while appending to the history")
    assert hist.read_bytes() == history_before
    assert sorted(os.listdir(tmp_path)) == sorted([hist.name, *(p.name for p in inputs)])
    assert digests(inputs) == before
