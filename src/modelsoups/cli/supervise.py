"""`soup` does its work in a child process, so that even a death by signal ends in one line.

Inputs are memory-mapped. When another process truncates an input while the soup reads
it, the next read of a page past the new end raises SIGBUS inside numpy: Python cannot
turn that into an exception, and the process dies without a word, leaving its temporary
files. The readers compare each input's size before reading a tensor, and every input's
size and modification time before a soup is published (`io/files.py`); that catches an
input changed *before* a read. For a truncation *during* one, `soup` forks once its
imports are done: the child runs the command, the parent waits. The child appends to a
journal shared with the parent (an anonymous in-memory file) every input it opens, with
its size and modification time, and every temporary it creates. If the child dies of a
signal, the parent removes those temporaries, names the input that changed, and prints
one line: `soup: error: FILE: changed while the soup was reading it (...)`.

Signals: the parent forwards SIGINT, SIGTERM and SIGHUP to the child, which cleans up and
exits 130 as before; the child takes only the first of them (Ctrl-C reaches both
processes, and the parent forwards it again). If the parent is killed, the kernel kills
the child too (PR_SET_PDEATHSIG), which then leaves what a SIGKILL leaves.

Only on Linux; elsewhere, or with `SOUP_UNSUPERVISED=1`, the command runs in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from ..io import files

__all__ = ["supervised"]

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def supervised(main: Callable[[], int]) -> int:
    """Run `main` in a forked child and return (in the child) its exit code; the parent
    waits, reports a death by signal in one line, and exits with the child's code."""
    if sys.platform != "linux" or os.environ.get("SOUP_UNSUPERVISED"):
        return main()
    try:
        journal = os.memfd_create("soup-journal", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return main()
    watched = {*FORWARDED, signal.SIGCHLD}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)  # no signal lost before wait
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        _become_child(parent, journal)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return main()
    status = _wait(pid, watched)
    if os.WIFEXITED(status):
        _exit(os.WEXITSTATUS(status))
    code = report_death(os.WTERMSIG(status), read_journal(journal))
    _exit(code)


def _become_child(parent: int, journal: int) -> None:
    files.JOURNAL_FD = journal
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, interrupt_once)


def interrupt_once(_signum: int, _frame: object) -> NoReturn:
    """Raise KeyboardInterrupt (the CLI cleans up and exits 130) for the first SIGINT or
    SIGTERM only: a second one, as when Ctrl-C reaches this process and the supervisor
    forwards it too, must not interrupt the cleanup."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _wait(pid: int, watched: set[signal.Signals]) -> int:
    while True:
        info = signal.sigwaitinfo(watched)
        if info.si_signo == signal.SIGCHLD:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, info.si_signo)


def _exit(code: int) -> NoReturn:
    """End the parent without running exit handlers: they belong to the child's work."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def read_journal(fd: int) -> list[dict[str, object]]:
    """The records the child appended (a line cut by its death is skipped)."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    records = []
    for line in b"".join(chunks).splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def report_death(sig: int, records: list[dict[str, object]]) -> int:
    """Remove the dead child's temporaries, print one line, return the exit code."""
    for r in records:
        if r.get("kind") == "temporary":
            _remove(Path(str(r["path"])))
    changes = [(r["path"], _change(r)) for r in records if r.get("kind") == "input"]
    changed = [(path, change) for path, change in changes if change is not None]
    if sig == signal.SIGBUS and changed:
        path, change = changed[0]
        line = files.changed_message(str(path), change)
    elif sig == signal.SIGBUS:
        line = "an input could not be read (SIGBUS: a file cut short, or an I/O error)."
    else:
        name = signal.Signals(sig).name
        line = (
            f"the soup process was killed by {name}"
            + (" (out of memory?)" if sig == signal.SIGKILL else "")
            + "."
        )
    print(f"soup: error: {line} Nothing was written.", file=sys.stderr)
    return 1 if sig == signal.SIGBUS else 128 + sig


def _change(r: dict[str, object]) -> str | None:
    def num(key: str) -> int:
        value = r.get(key)
        return value if isinstance(value, int) else -1

    stamp = files.Stamp(Path(str(r["path"])), num("dev"), num("ino"), num("size"),
                        num("mtime_ns"))  # fmt: skip
    return stamp.change()


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()
