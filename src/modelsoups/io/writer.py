"""Streaming, atomic safetensors output: one file or a sharded Hugging Face folder.

The header is computed from names, shapes and dtypes before any data exists, so each
tensor can be averaged and written straight away: peak memory is one tensor, not a model.
Everything is written under a temporary name next to the destination
(`.NAME.soup-partial-HOST-PID`), fsynced, then renamed; on any error or interrupt the
temporary is removed, so the final name either holds a complete checkpoint or does not
exist. A SIGKILL leaves the temporary behind: the next run on the same host removes it once
its process is gone (a run on another host sharing the folder cannot tell, and leaves it).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import socket
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..dtypes import DType
from ..errors import OutputError
from .direct import DirectFile
from .files import journal
from .folder import MODEL_FILES

__all__ = [
    "OutputPlan",
    "ShardedWriter",
    "atomic_path",
    "check_destination",
    "check_output",
    "check_sharding",
    "remove_stale_partials",
    "safetensors_header",
    "temporary_name",
    "write_json",
]

PARTIAL = ".soup-partial-"


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class _Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


def safetensors_header(entries: Sequence[Entry], metadata: dict[str, str]) -> bytes:
    """The start of a safetensors file holding `entries` in order, up to its data: the
    header's length (8 bytes, little-endian) and the JSON header, padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": e.dtype.name,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


class _FileWriter:
    """Writes one safetensors file whose entries are known up front, in order."""

    def __init__(self, f: _Writable, entries: list[Entry], metadata: dict[str, str]) -> None:
        f.write(safetensors_header(entries, metadata))
        self._f, self._pending = f, list(reversed(entries))

    def write(self, name: str, array: np.ndarray) -> None:
        """Append `name`'s data: an array in the entry dtype's storage type (`DType.storage`)."""
        expected = self._pending.pop()
        if expected.name != name or array.shape != expected.shape:
            raise RuntimeError(f"writer expected {expected}, got {name} {array.shape}")
        if array.dtype != expected.dtype.numpy:
            raise RuntimeError(f"writer expected {expected}, got {name} as {array.dtype}")
        if array.size:
            self._f.write(np.ascontiguousarray(array).data)

    def close(self) -> None:
        if self._pending:
            raise RuntimeError(f"writer closed with {len(self._pending)} tensors missing")


def plan_shards(entries: list[Entry], max_shard_size: int | None) -> list[list[Entry]]:
    """Split entries, in order, into shards of at most `max_shard_size` bytes (one tensor
    larger than the limit gets a shard of its own, as `save_pretrained` does)."""
    if not max_shard_size:
        return [entries]
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


@dataclass
class OutputPlan:
    """Where and how the soup is written: one file, or a folder of one or more shards."""

    path: Path
    entries: list[Entry]
    metadata: dict[str, str]
    folder: bool
    max_shard_size: int | None = None


class ShardedWriter:
    """Writes an `OutputPlan` into an (already temporary) destination, tensor by tensor."""

    def __init__(self, target: Path, plan: OutputPlan) -> None:
        self.entries = plan.entries
        self._shards = plan_shards(plan.entries, plan.max_shard_size if plan.folder else None)
        n = len(self._shards)
        if plan.folder:
            names = (
                ["model.safetensors"]
                if n == 1
                else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            )
            self._paths = [target / name for name in names]
        else:
            self._paths = [target]
        self._metadata, self._index = plan.metadata, 0
        self._writer: _FileWriter | None = None
        self._file: DirectFile | None = None
        self._remaining = [len(s) for s in self._shards]  # shards are never empty...
        if n > 1:
            weight_map = {
                e.name: p.name for s, p in zip(self._shards, self._paths, strict=True) for e in s
            }
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in plan.entries), **plan.metadata},
                "weight_map": weight_map,
            }
            (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def write(self, name: str, array: np.ndarray) -> None:
        if self._writer is None:
            self._file = DirectFile(self._paths[self._index])
            self._writer = _FileWriter(self._file, self._shards[self._index], self._metadata)
        self._writer.write(name, array)
        self._remaining[self._index] -= 1
        if self._remaining[self._index] == 0:
            self._finish_file()
            self._index += 1

    def _finish_file(self) -> None:
        assert self._writer is not None and self._file is not None
        self._writer.close()
        self._file.close()
        self._writer = self._file = None

    def close(self) -> None:
        """Check that everything was written, then fsync every file (all at the end: the
        kernel writes the first shards back while the soup goes on)."""
        if any(self._remaining):
            raise RuntimeError("soup output closed before every tensor was written")
        if not self._shards[0]:  # ...except for a checkpoint with no tensors at all
            with open(self._paths[0], "wb") as f:
                _FileWriter(f, [], self._metadata).close()
        for path in self._paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._writer = self._file = None


def temporary_name(dest: Path, marker: str = PARTIAL) -> Path:
    """This process's temporary next to `dest`: `.NAME{marker}HOST-PID` (recorded for the
    supervising `soup` process, which removes it should this one die of a signal)."""
    tmp = dest.parent / f".{dest.name}{marker}{socket.gethostname()}-{os.getpid()}"
    journal("temporary", tmp)
    return tmp


def remove_stale_partials(dest: Path, marker: str = PARTIAL) -> None:
    """Remove temporaries of earlier runs for the same destination whose process is gone.

    Only this host's: on a shared filesystem another host's pid means nothing here, so its
    temporaries (live or not) are left alone, as are unnamed ones from older versions.
    """
    prefix = f".{dest.name}{marker}{socket.gethostname()}-"
    for p in dest.parent.glob(f"{glob.escape(prefix)}*"):
        pid = p.name.removeprefix(prefix)
        if pid.isdigit() and not _alive(int(pid)):
            _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output(out: Path, inputs: Sequence[Path], *, sidecars: Sequence[Path] = ()) -> None:
    """Refuse outputs that could overwrite or live inside an input.

    `sidecars` are the run's other written paths (report, history, coefficients, candidate
    folder, a plot): none may be an input, contain one or lie inside one, and none may be
    the output, lie inside it, or be another sidecar.
    """
    if out.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raise OutputError(
            f"{out}: modelsoups writes safetensors; name the output *.safetensors or a folder"
        )
    written = [out, *sidecars]
    for i, w in enumerate(written):
        _refuse_special(w)
        for p in inputs:
            if _overlap(w, p):
                what = "output" if i == 0 else "path the soup writes"
                raise OutputError(f"{w}: {what} is (or contains, or is inside) input {p}")
        for other in written[:i]:
            if _overlap(w, other):
                raise OutputError(f"{w}: is (or contains, or is inside) {other}, which this run "
                                  "also writes; give each output its own name")  # fmt: skip


def _refuse_special(path: Path) -> bool:
    """Refuse a `path` that exists but is neither a regular file nor a folder (a device, a
    FIFO, a socket); True when it is a folder."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # missing (or unreadable: the write itself will say so)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OutputError(f"{path}: is not a regular file or folder; soup never writes over it")
    return stat.S_ISDIR(mode)


def _overlap(a: Path, b: Path) -> bool:
    """`a` and `b` name the same file (links included), one lies inside the other, or `a` is
    a hard link to a file inside folder `b` (writing through it would change `b`)."""
    ra, rb = Path(os.path.realpath(a)), Path(os.path.realpath(b))  # no error on a loop
    with contextlib.suppress(OSError):
        if a.exists() and b.exists() and os.path.samefile(a, b):
            return True
    if ra == rb or ra in rb.parents or rb in ra.parents:
        return True
    return _linked_inside(a, b)


def _linked_inside(a: Path, folder: Path) -> bool:
    """`a` is a file with several names, one of them inside `folder` (a model folder: few
    files; only files with more than one link are looked for)."""
    try:
        st = os.stat(a)
        if st.st_nlink < 2 or not stat.S_ISREG(st.st_mode) or not folder.is_dir():
            return False
        for root, _, names in os.walk(folder):
            for n in names:
                other = os.stat(os.path.join(root, n), follow_symlinks=False)
                if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                    return True
    except OSError:
        return False
    return False


def check_sharding(out: Path, max_shard_size: int | None) -> None:
    """Refuse `max_shard_size` with a `.safetensors` output (shards need a folder); callers
    that evaluate before writing check it up front, not after the evaluations."""
    if max_shard_size is not None and out.suffix == ".safetensors":
        raise OutputError(f"{out}: --max-shard-size writes a folder; drop the .safetensors suffix")


def check_destination(dest: Path, *, overwrite: bool = False) -> None:
    """Refuse a `dest` whose folder does not exist, or that exists without `overwrite`
    (what `atomic_path` checks first; callers that evaluate before writing check it early)."""
    if not dest.parent.is_dir():
        raise OutputError(f"{dest}: output folder {dest.parent} does not exist")
    if dest.exists() and not overwrite:
        raise OutputError(f"{dest}: already exists; choose another name or pass --overwrite")
    check_replaceable(dest)


def check_replaceable(dest: Path) -> None:
    """Refuse to replace what soup could not have written, even with `--overwrite`: a
    device, FIFO or socket (`-o /dev/null` would swap the device for a file), or a folder
    holding anything but model files (`-o ~ --overwrite` would delete a home folder)."""
    if not _refuse_special(dest):
        return
    with os.scandir(dest) as entries:
        foreign = [e.name for e in entries if not (_model_file(e.name) and e.is_file())]
    if foreign:
        raise OutputError(f"{dest}: holds {foreign[0]!r}, which is not a model file; soup "
                          "replaces only a folder of model files")  # fmt: skip


def _model_file(name: str) -> bool:
    return name.endswith((".safetensors", ".json")) or name in MODEL_FILES


@contextlib.contextmanager
def atomic_path(
    dest: Path, *, folder: bool, overwrite: bool = False, durable: bool = True
) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; rename it to `dest` only if the block succeeds
    (and fsync the folders: `durable=False` skips that, for scratch files read once)."""
    check_destination(dest, overwrite=overwrite)
    remove_stale_partials(dest)
    tmp = temporary_name(dest)
    try:
        if folder:
            tmp.mkdir()
        else:
            tmp.touch()
    except OSError as e:
        raise OutputError(f"{dest}: cannot write in {dest.parent} ({e.strerror})") from None
    try:
        yield tmp
        _fsync_dir(tmp) if folder and durable else None
        if dest.exists() and not overwrite:  # another run finished first: never replace it
            raise OutputError(
                f"{dest}: appeared while the soup was being written (another run?); it was "
                "left as is and nothing was kept"
            )
        check_replaceable(dest)  # what appeared meanwhile gets the same check
        if dest.exists() and (folder or dest.is_dir()):
            # A folder cannot be swapped in one step: move the old one aside first, delete
            # it after the swap. A file is replaced atomically by the rename below.
            old = dest.parent / f".{dest.name}.soup-old-{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, dest)
        _fsync_dir(dest.parent) if durable else None
    except OSError as e:
        _remove(tmp)
        if e.errno == errno.ENOSPC:
            raise OutputError(f"{dest}: disk full while writing; nothing was kept") from None
        raise OutputError(f"{dest}: write failed ({e.strerror or e}); nothing was kept") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    """`obj` as JSON at `path` through `atomic_path`, replacing an older file (reports,
    coefficients, histories' summaries): a crash never leaves half a file."""
    if path.is_dir() and not path.is_symlink():  # replaced, it would take its files along
        raise OutputError(f"{path}: is a folder; name a .json file to write")
    text = json.dumps(obj, indent=indent) + "\n"
    with atomic_path(path, folder=False, overwrite=True) as tmp:
        tmp.write_text(text)
