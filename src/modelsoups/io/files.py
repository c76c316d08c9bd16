"""Input files as the operating system sees them: their type, their descriptors, their changes.

A soup reads its inputs through memory maps, which makes three OS facts matter:

- Only regular files can be mapped; a FIFO or a device would block or stream forever, so
  they are refused before anything opens them (`check_regular`).
- Each mapped file holds one descriptor for the whole run (Python's `mmap` keeps a copy of
  it), so N inputs need N descriptors: the soft limit is raised towards the hard one when
  needed, and running out is one clear line (`ensure_descriptors`, `open_error`).
- A mapped file that another process truncates kills the reader with SIGBUS the moment it
  touches a page past the new end, and one rewritten in place feeds it a mix of old and new
  bytes. Each file's identity, size and modification time are recorded when it is opened
  (`Stamp`) and compared before tensors are read and before a soup is published (the same
  stamps tell whether an eval command's run changed an input: `stamps`, sandbox.py). For the
  last race, a truncation between that check and the read, the `soup` command runs its
  work in a child process (`cli/supervise.py`); the records of `journal` tell the parent
  which inputs to check and which temporaries to remove.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, InputChangedError

__all__ = [
    "Stamp",
    "Stamps",
    "changed_during_run",
    "check_regular",
    "difference",
    "ensure_descriptors",
    "file_kind",
    "first_change",
    "journal",
    "open_error",
    "stamps",
]

# Descriptors kept free for everything else a run opens: the output, its shards, pipes to
# evaluators, imports.
SPARE_DESCRIPTORS = 64

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
    stat.S_IFLNK: "a symbolic link",
}


def check_regular(path: Path, mode: int | None = None) -> None:
    """Refuse anything but a regular file (symlinks to one are fine), before opening it:
    opening a FIFO blocks until a writer comes, and a device never ends."""
    if mode is None:
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise open_error(path, e) from None
        except ValueError:  # from a list file: no file name holds a NUL byte
            raise CheckpointError(f"{path!r}: a file name cannot contain a NUL byte") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"{path}: is {file_kind(mode)}, not a checkpoint file; give a file or a folder"
        )


def file_kind(mode: int) -> str:
    """What a file of `mode` (`st_mode`) is, for a message: "a FIFO (named pipe)", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_error(path: Path, e: OSError) -> CheckpointError:
    """A one-line `CheckpointError` for an `OSError` raised while opening an input."""
    if e.errno in (errno.EMFILE, errno.ENFILE):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return CheckpointError(
            f"{path}: too many open files: each input stays open (memory-mapped) while the "
            f"soup is made, and the limit is {soft} (hard limit {hard}); raise it with "
            "`ulimit -n` or soup fewer inputs at once"
        )
    if e.errno == errno.ENOENT:
        if os.path.islink(path):  # e.g. an interrupted download into the HF cache
            target = os.readlink(path)
            return CheckpointError(f"{path}: is a symbolic link to {target}, which is missing")
        return CheckpointError(f"{path}: no such file or folder")
    return CheckpointError(f"{path}: cannot open ({e.strerror or e})")


def ensure_descriptors(n_files: int) -> None:
    """Make room for `n_files` open inputs: raise the soft limit on open files (up to the
    hard one) when it is too low. What cannot be raised is reported by `open_error` when
    a file fails to open, naming the limit."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n_files + SPARE_DESCRIPTORS
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    target = need if hard == resource.RLIM_INFINITY else min(hard, max(need, 4096))
    # a sandbox may forbid it: then the open that fails says so
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@dataclass(frozen=True)
class Stamp:
    """What identifies a file's content without reading it: device, inode, size, mtime."""

    path: Path
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path, st: os.stat_result) -> Stamp:
        """The stamp of an input being opened (`st`: its fstat), journaled for the
        supervising parent."""
        stamp = cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        journal("input", path, size=stamp.size, dev=stamp.dev, ino=stamp.ino,
                mtime_ns=stamp.mtime_ns)  # fmt: skip
        return stamp

    @classmethod
    def now(cls, path: Path) -> Stamp | None:
        """The stamp of the file at `path` as it is now (not journaled); None if it is gone."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def change(self, size: int | None = None) -> str | None:
        """How the file changed since it was stamped, or None.

        `size` is the current size of the opened file (its memory map's); the path is
        stat'ed for the rest. A path that now names another file (replaced by a rename) or
        none (deleted) is not a change: the open file, still read, is intact.
        """
        if size is not None and size != self.size:
            return f"its size went from {self.size} to {size} bytes"
        now = Stamp.now(self.path)
        if now is None or (now.dev, now.ino) != (self.dev, self.ino):
            return None
        return difference(self, now)

    def check(self, size: int | None = None) -> None:
        """Raise `InputChangedError` if the file changed since it was stamped."""
        change = self.change(size)
        if change is not None:
            raise InputChangedError(changed_message(self.path, change))


# The stamps of an input: of the file, or of every file in the folder (None: not there).
Stamps = dict[Path, Stamp | None]


def stamps(path: Path) -> Stamps:
    """The stamps of a file, or of every file in a folder (None: gone since listed)."""
    files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p: Stamp.now(p) for p in files}


def difference(old: Stamp | None, new: Stamp | None) -> str | None:
    """How a file went from stamp `old` to stamp `new` (None: not there), in the words
    every "input changed" message uses; None if it did not change."""
    if old == new:
        return None
    if old is None:
        return "it appeared" if new is not None else None
    if new is None:
        return "it was deleted"
    if (new.dev, new.ino) != (old.dev, old.ino):
        return "it was replaced"
    if new.size != old.size:
        return f"its size went from {old.size} to {new.size} bytes"
    return "it was rewritten"


def first_change(before: Stamps, after: Stamps) -> tuple[Path, str] | None:
    """The first file (in path order) of an input whose stamps went from `before` to
    `after` (`stamps` of the same path, taken twice) that changed, and how; None if none."""
    if after == before:
        return None
    for path in sorted(set(before) | set(after)):
        change = difference(before.get(path), after.get(path))
        if change is not None:
            return path, change
    return None


def changed_message(path: Path | str, change: str) -> str:
    return (
        f"{path}: changed while the soup was reading it ({change}); is another process "
        "still writing it?"
    )


def changed_during_run(before: Stamps, after: Stamps, when: str) -> str | None:
    """The line `FILE: input changed during the run (how), seen WHEN` for the first file
    of an input that is not as it was (`first_change`), or None. The one wording of the
    run's checks: `guard.InputGuard`'s, and `sandbox.check_unchanged`'s after each eval
    command."""
    found = first_change(before, after)
    if found is None:
        return None
    path, change = found
    return f"{path}: input changed during the run ({change}), seen {when}"


# The supervised `soup` child sets this to a descriptor of a file shared with its parent:
# every input opened and every temporary created is appended to it as one JSON line.
JOURNAL_FD: int | None = None


def journal(kind: str, path: Path, **fields: int) -> None:
    """Record an opened input or a created temporary for the supervising parent (a no-op
    unless the process runs supervised)."""
    if JOURNAL_FD is None:
        return
    record = json.dumps({"kind": kind, "path": os.fsdecode(path), **fields}) + "\n"
    os.write(JOURNAL_FD, record.encode("utf-8", "surrogateescape"))
