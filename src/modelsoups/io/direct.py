"""Writing a new file sequentially, from a staging buffer straight to the disk (O_DIRECT).

A buffered `write` copies every byte into freshly allocated page cache, which the kernel
then writes back on `fsync`. Measured on a 2-core VM (450 MB, the output of a 110M-param
soup): 0.4-2.8 s of CPU for the buffered write plus 0.2 s of `fsync`, against 0.1 s of
CPU for O_DIRECT, whose wait for the disk overlaps the soup's arithmetic. So the data is
copied into page-aligned staging buffers and written from them with O_DIRECT; the last
block is padded to the alignment and the file truncated to its real size. Filesystems
without O_DIRECT (tmpfs on older kernels, some network filesystems) get buffered writes.
"""

from __future__ import annotations

import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["DirectFile"]

ALIGN = 4096  # a multiple of every logical block size in use (512 B, 4 KiB)
STAGE = 2 << 20  # bytes per write: few system calls, and little memory


class DirectFile:
    """A new file at `path`, written front to back with `write`; `close` completes it
    (without fsync: the caller syncs once every file of a soup is written).

    Two staging buffers: while one is written to the disk (on a thread of its own), the
    next is filled, so `write` returns as soon as its bytes are copied.
    """

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
        # private anonymous maps: page-aligned, as O_DIRECT needs, and counted as the
        # process's anonymous memory (mmap(-1) alone would be shared memory)
        private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        self._stages = [mmap.mmap(-1, STAGE, flags=private) for _ in range(2 if direct else 0)]
        self._stage: mmap.mmap | None = self._stages[0] if direct else None
        self._io = ThreadPoolExecutor(1) if direct else None
        self._pending: Future[None] | None = None  # the write of the other stage
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
                if self._stage is None:  # went buffered
                    _write_all(self._fd, view)
                    return

    def _flush(self) -> None:
        """Write the stage out (padded to `ALIGN`: cut on close) and switch stages."""
        assert self._stage is not None and self._io is not None
        stage, end = self._stage, -(-self._fill // ALIGN) * ALIGN
        if self._written:
            self._wait()
            self._pending = self._io.submit(_write_all, self._fd, memoryview(stage)[:end])
        else:  # the first block here: a filesystem that refuses O_DIRECT writes says so now
            try:
                _write_all(self._fd, memoryview(stage)[:end])
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._buffered()
                return
        self._written += end
        self._stage = self._stages[1] if stage is self._stages[0] else self._stages[0]
        self._fill = 0

    def _buffered(self) -> None:
        """O_DIRECT accepted at open but not for writing (alignment): go on buffered."""
        import fcntl

        assert self._stage is not None
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        _write_all(self._fd, memoryview(self._stage)[: self._fill])
        self._stage, self._stages, self._fill = None, [], 0

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # raises what the write raised (disk full...)

    def close(self) -> None:
        """Write what is staged, cut the padding, close the file."""
        try:
            if self._stage is not None and self._fill:
                self._flush()
            self._wait()
            if self._written != self.size and self._stages:
                os.ftruncate(self._fd, self.size)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file as it is (the caller removes it)."""
        if self._io is not None:
            self._io.shutdown(wait=True)  # the fd must outlive a write in progress
            self._io = None
        self._pending = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._stage, self._stages = None, []  # unmapped once no view is left (tracebacks)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]
