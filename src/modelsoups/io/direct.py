"""Writing a new file sequentially, from a staging buffer straight to the disk (O_DIRECT).

A buffered `write` copies every byte into freshly allocated page cache, which the kernel
then writes back on `fsync`. Measured on a 2-core VM (450 MB, the output of a 110M-param
soup): 0.4-2.8 s of CPU for the buffered write plus 0.2 s of `fsync`, against 0.1 s of
CPU for O_DIRECT, whose wait for the disk overlaps the soup's arithmetic. So the data is
copied into one page-aligned staging buffer and written from it with O_DIRECT; the last
block is padded to the alignment and the file truncated to its real size. Filesystems
without O_DIRECT (tmpfs on older kernels, some network filesystems) get buffered writes.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path
from typing import Any

__all__ = ["DirectFile"]

ALIGN = 4096  # a multiple of every logical block size in use (512 B, 4 KiB)
STAGE = 8 << 20  # bytes per write: few system calls, and little memory


class DirectFile:
    """A new file at `path`, written front to back with `write`; `close` completes it
    (without fsync: the caller syncs once every file of a soup is written)."""

    def __init__(self, path: Path) -> None:
        self.path, self.size = path, 0
        direct = getattr(os, "O_DIRECT", 0)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self._fd = os.open(path, flags | direct, 0o644)
        except OSError as e:
            if not direct or e.errno != errno.EINVAL:
                raise
            self._fd, direct = os.open(path, flags, 0o644), 0
        self._direct = bool(direct)
        self._stage = mmap.mmap(-1, STAGE) if direct else None  # anonymous: page-aligned
        self._fill = self._written = 0

    def write(self, data: Any) -> None:
        """Append the bytes of `data` (bytes, or any C-contiguous buffer)."""
        view = memoryview(data).cast("B")
        self.size += len(view)
        if self._stage is None:
            _write_all(self._fd, view)
            return
        while view:
            n = min(len(view), STAGE - self._fill)
            self._stage[self._fill : self._fill + n] = view[:n]
            self._fill, view = self._fill + n, view[n:]
            if self._fill == STAGE:
                self._flush()

    def _flush(self) -> None:
        assert self._stage is not None
        end = -(-self._fill // ALIGN) * ALIGN  # the padding is truncated away on close
        try:
            _write_all(self._fd, memoryview(self._stage)[:end])
        except OSError as e:
            if e.errno != errno.EINVAL or self._written:
                raise
            # the filesystem accepted O_DIRECT at open but not this write (alignment):
            # nothing was written yet, so go on buffered
            import fcntl

            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            _write_all(self._fd, memoryview(self._stage)[: self._fill])
            self._stage, self._fill = None, 0
            return
        self._written += end
        self._fill = 0

    def close(self) -> None:
        """Write what is staged, cut the padding, close the file."""
        try:
            if self._stage is not None and self._fill:
                self._flush()
                os.ftruncate(self._fd, self.size)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file as it is (the caller removes it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._stage = None  # unmapped once no view of it is left (a traceback may hold one)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]
