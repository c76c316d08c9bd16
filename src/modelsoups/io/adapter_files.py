"""The tensors of a set of files, read when asked, in whichever process asks.

`ReopenedFiles` is what an `AdapterSpace` keeps of its N adapters (and of the base model
whose `modules_to_save` tensors it needs): for each, a path and the stamps it had when the
space was built (`io.files.stamps`: device, inode, size, mtime of the file, or of each file
of a folder), never a tensor. `read(i, key)` opens file i the first time a tensor of it is read in a
process (a safetensors file is memory-mapped: its pages, not an anonymous copy) and keeps
it open until `close()`, after which the next read opens it again. A path whose stamp has
changed is refused (`InputChangedError`): its tensors were checked (finite, shapes) when
the space was built, and a soup must not mix two versions of an input. Pickled into a
worker process (`--workers`, Ray), it carries the paths and stamps only and opens the
files there: workers need the same filesystem, as for every path the recipes send.

`.bin` adapters are pickles, which cannot be memory-mapped: `private_copy` converts one,
once, into a safetensors file in a private temporary folder (`tempfile.mkdtemp`), which is
removed with the `ReopenedFiles` that owns it (garbage collected, or at exit). Memory stays
flat in N for them too, at the cost of one temporary copy of each on disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputChangedError
from .base import Checkpoint
from .files import Stamps, ensure_descriptors, first_change
from .files import stamps as stamps_of

if TYPE_CHECKING:
    import torch

__all__ = ["ReopenedFiles", "private_copy"]


class ReopenedFiles:
    """Files (safetensors files, or model folders) opened lazily in each process.

    Args:
        paths: the files; each is opened with `io.open_checkpoint` when first read.
        stamps: their stamps when they were checked (default: taken now).
        owned: a temporary folder holding some of them (`private_copy`), removed with this
            object; copies of it in other processes (pickled) do not own it.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        stamps: Sequence[Stamps] | None = None,
        owned: Path | None = None,
    ) -> None:
        self.paths = list(paths)
        self.stamps = list(stamps) if stamps is not None else [stamps_of(p) for p in self.paths]
        self._open: dict[int, Checkpoint] = {}
        self._cleanup = (
            weakref.finalize(self, shutil.rmtree, owned, ignore_errors=True) if owned else None
        )

    def read(self, i: int, key: str) -> torch.Tensor:
        """Tensor `key` of file i: a view of its memory map for safetensors (read-only)."""
        ckpt = self._open.get(i)
        if ckpt is None:
            ckpt = self._open[i] = self._reopen(i)
        return ckpt.get(key)

    def _reopen(self, i: int) -> Checkpoint:
        from . import open_checkpoint

        path = self.paths[i]
        self.check(i)
        ensure_descriptors(len(self._open) + 1)
        return open_checkpoint(path)

    def check(self, i: int) -> None:
        """Raise `InputChangedError` if file i is not as it was stamped."""
        found = first_change(self.stamps[i], stamps_of(self.paths[i]))
        if found is not None:
            path, change = found
            raise InputChangedError(
                f"{path}: changed since the adapters were opened ({change}); a soup must "
                "not mix two versions of an input: run it again"
            )

    def check_unchanged(self) -> None:
        """Raise `InputChangedError` if any file read so far changed since it was stamped."""
        for i, ckpt in self._open.items():
            ckpt.check_unchanged()
            self.check(i)

    def close(self) -> None:
        """Unmap every open file (the next read opens it again)."""
        for ckpt in self._open.values():
            ckpt.close()
        self._open.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "stamps": self.stamps}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.paths, self.stamps = state["paths"], state["stamps"]
        self._open, self._cleanup = {}, None


def private_copy(weights: Checkpoint, folder: Path | None, name: str) -> tuple[Path, Path]:
    """`weights` (an opened `.bin` adapter) written as `name`.safetensors in `folder`, a
    private temporary folder made now if None; returns (file, folder)."""
    from safetensors.torch import save_file

    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="modelsoups-adapters-"))
    out = folder / f"{name}.safetensors"
    save_file({k: weights.get(k).contiguous() for k in weights.infos}, os.fspath(out))
    return out, folder
