"""A safetensors reader that validates the header and maps tensors without copying.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the
data. Every offset is checked against the file size before anything is read, so a truncated
or corrupt file is a clear `CheckpointError`, never a crash or a huge allocation.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import DTYPES
from ..errors import CheckpointError
from .base import Checkpoint, DuplicateKeyError, TensorInfo, loads_unique, normalise_keys
from .files import Stamp, check_regular, open_error

__all__ = ["DTYPES", "SafetensorsFile"]

MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


def _parse_header(path: Path, size: int, head: bytes) -> tuple[int, dict[str, Any]]:
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes is too small to be a safetensors file")
    (n,) = struct.unpack("<Q", head[:8])
    if n > size - 8:
        raise CheckpointError(
            f"{path}: header length {n} is larger than the file ({size} bytes); "
            "the file is truncated or not safetensors"
        )
    if n > MAX_HEADER:
        raise CheckpointError(f"{path}: header length {n} exceeds {MAX_HEADER} bytes")
    try:
        header = loads_unique(head[8 : 8 + n])
    except DuplicateKeyError as e:  # the reference implementation refuses it too
        raise CheckpointError(
            f"{path}: safetensors header names {e.key!r} twice; the file is corrupt"
        ) from None
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, 5000-digit ints, [[[[...
        raise CheckpointError(f"{path}: invalid JSON in safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    return n, header


def _tensor_info(path: Path, name: str, entry: Any, data_size: int) -> tuple[TensorInfo, int]:
    """Validate one header entry; return its info and start offset in the data section."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor {name!r}: header entry is not an object")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r}: unknown dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if (
        not isinstance(shape, list)
        or len(shape) > 64  # torch's and numpy's limit on dimensions
        or not all(type(d) is int and d >= 0 for d in shape)  # bool is an int: refuse it
        # strides must fit int64 (numpy counts them in bytes), even for an empty tensor
        or math.prod(max(d, 1) for d in shape) * dtype.itemsize >= 2**63
    ):
        raise CheckpointError(f"{path}: tensor {name!r}: invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor {name!r}: invalid data_offsets {offsets!r}")
    info = TensorInfo(name, tuple(shape), dtype, path)
    begin, end = offsets
    if end - begin != info.nbytes:
        raise CheckpointError(
            f"{path}: tensor {name!r}: data_offsets span {end - begin} bytes but shape "
            f"{list(shape)} of {entry['dtype']} needs {info.nbytes}"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} ends at byte {end} of a {data_size}-byte data section; "
            "the file is truncated"
        )
    return info, begin


class SafetensorsFile(Checkpoint):
    """One `.safetensors` file, memory-mapped; `array` (and `get`) return zero-copy views."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(Path(path), "safetensors")
        check_regular(self.path)  # before opening: opening a FIFO blocks
        try:  # O_NONBLOCK: should a FIFO replace the file meanwhile, fail, do not wait
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise open_error(self.path, e) from None
        try:
            st = os.fstat(fd)
            check_regular(self.path, st.st_mode)
            size, self._stamp = st.st_size, Stamp.of(self.path, st)
            head = os.pread(fd, 8, 0) if size >= 8 else b""
            if len(head) == 8:  # read exactly the header, never more
                n_claimed = int.from_bytes(head, "little")
                head += os.pread(fd, min(n_claimed, size - 8, MAX_HEADER), 8)
            n, header = _parse_header(self.path, size, head)
            # ACCESS_COPY: a private mapping gives writable arrays (torch.from_numpy wants
            # them) without any possibility of writing back to the file.
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        except OSError as e:  # out of descriptors (mmap keeps one), I/O error
            raise open_error(self.path, e) from None
        finally:
            os.close(fd)
        self._data_start = 8 + n
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise CheckpointError(f"{self.path}: __metadata__ is not a JSON object")
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        spans: list[tuple[int, int, str]] = []
        raw: dict[str, tuple[TensorInfo, int]] = {}
        for name, entry in header.items():
            info, begin = _tensor_info(self.path, name, entry, size - self._data_start)
            raw[name] = (info, begin)
            spans.append((begin, begin + info.nbytes, name))
        spans.sort()
        for (_, end_a, a), (begin_b, end_b, b) in itertools.pairwise(spans):
            if begin_b < end_a and end_b > begin_b:
                raise CheckpointError(f"{self.path}: tensors {a!r} and {b!r} overlap in the file")
        extra = size - self._data_start - max((end for _, end, _ in spans), default=0)
        if extra > 0:  # what the safetensors library refuses ("not fully covered")
            raise CheckpointError(f"{self.path}: {extra} bytes after the last tensor; the file "
                                  "was damaged or appended to")  # fmt: skip
        self._names, self.notes = normalise_keys(list(raw), self.path)
        self._offsets: dict[str, int] = {}
        for name, raw_name in self._names.items():
            info, begin = raw[raw_name]
            self.infos[name] = TensorInfo(name, info.shape, info.dtype, self.path)
            self._offsets[name] = self._data_start + begin

    def array(self, name: str) -> np.ndarray:
        info, start = self.infos[name], self._offsets[name]
        storage = info.dtype.numpy
        if info.numel == 0:
            return np.empty(info.shape, dtype=storage)
        # A file shrunk since it was opened would kill the process with SIGBUS once its
        # pages past the new end are read: one fstat first turns that into an error.
        if self._mm.size() != self._stamp.size:
            self._stamp.check(self._mm.size())
        flat = np.frombuffer(self._mm, dtype=storage, count=info.numel, offset=start)
        if start % info.dtype.itemsize:  # unaligned: an aligned copy (torch needs one)
            flat = flat.copy()
        return flat.reshape(info.shape)

    def raw_name(self, name: str) -> str:
        return self._names[name]

    def check_unchanged(self) -> None:
        if self._mm is not None:
            self._stamp.check(self._mm.size())

    def close(self) -> None:
        # Tensors handed out may still view the map; let the GC unmap when they die.
        self._mm = None  # type: ignore[assignment]
