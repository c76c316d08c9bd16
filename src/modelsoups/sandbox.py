"""What an eval command gets as `{ckpt}`: a private, shell-safe path.

- **Private.** An ingredient is never handed over as the input itself: the command gets a
  read-only copy in the run's candidate folder (a reflink where the filesystem has them,
  btrfs or XFS, else a byte copy), so `rm {ckpt}` or a rewrite in place changes the copy
  only. After the command, the input's stamps (device, inode, size, mtime: `io.files.Stamp`,
  as the readers keep them) are compared with before: an input changed, deleted or replaced
  by anyone meanwhile stops the run with one line.
- **Shell-safe.** The path put into the command contains only characters that mean the
  same bare, inside "..." and inside '...' (`[A-Za-z0-9_@%+=:,./-]`); a path with anything
  else (spaces, quotes, `$(...)`, backticks, `;`, newlines) is reached through a symlink
  with a plain name in a private temporary folder. No quoting of `{ckpt}` can turn a file
  name into code.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import EvaluationError
from .io import HFFolder
from .io.base import Checkpoint
from .io.files import Stamps, changed_during_run, stamps

__all__ = ["check_unchanged", "private_copy", "shell_safe"]

_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_FICLONE = 0x40049409  # linux/fs.h: share the blocks copy-on-write (btrfs, XFS)


def private_copy(ckpt: Checkpoint, folder: Path) -> Path:
    """A read-only copy of `ckpt`'s files in `folder`, under a plain name."""
    if isinstance(ckpt, HFFolder):
        dst = folder / "ingredient"
        dst.mkdir()
        for src in ckpt.files:
            rel = src.relative_to(ckpt.path)
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            _copy(src, dst / rel)
        from .io.folder import copy_model_files

        copy_model_files(ckpt.path, dst)
        return dst
    suffix = ckpt.path.suffix if ckpt.path.suffix in _SUFFIXES else ""
    dst = folder / f"ingredient{suffix}"
    _copy(ckpt.path, dst)
    return dst


def _copy(src: Path, dst: Path) -> None:
    cloned = False
    with open(src, "rb") as fin, open(dst, "xb") as fout, contextlib.suppress(OSError, ImportError):
        import fcntl

        fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        cloned = True
    if not cloned:
        shutil.copyfile(src, dst)  # sendfile(2) on Linux: in the kernel, no Python loop
    os.chmod(dst, 0o444)


def check_unchanged(path: Path, before: Stamps, name: str) -> None:
    """Raise if the input at `path` is not the file(s) of `before` (`io.files.stamps` taken
    before the eval command ran): stricter than a reader's check, a deleted or replaced
    input counts too, since the soup goes on reading it."""
    line = changed_during_run(before, stamps(path), f"after the eval command scored {name!r}")
    if line is not None:
        raise EvaluationError(
            f"{line}; the command only got a private copy: check what else writes there"
        )


@contextlib.contextmanager
def shell_safe(path: Path) -> Iterator[Path]:
    """`path` itself if every character is shell-safe, else a plain-named symlink to it."""
    absolute = Path(os.path.abspath(path))
    if _SAFE.fullmatch(str(absolute)):
        yield absolute
        return
    base = tempfile.gettempdir()
    if not _SAFE.fullmatch(base):
        base = "/tmp" if os.path.isdir("/tmp") else base
    folder = Path(tempfile.mkdtemp(prefix="soup-ckpt-", dir=base))
    try:
        link = folder / ("candidate" + (absolute.suffix if absolute.suffix in _SUFFIXES else ""))
        link.symlink_to(absolute, target_is_directory=absolute.is_dir())
        if not _SAFE.fullmatch(str(link)):
            raise EvaluationError(f"cannot make a shell-safe name for {str(absolute)[:80]!r}")
        yield link
    finally:
        shutil.rmtree(folder, ignore_errors=True)
