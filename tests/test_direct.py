"""The output file writer: exact bytes whatever the sizes, and buffered where O_DIRECT fails."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from modelsoups.io import direct
from modelsoups.io.direct import STAGE, DirectFile


def _pieces(seed: int) -> list[bytes]:
    """Odd sizes: empty, tiny, one byte short of a stage, several stages at once."""
    rng = random.Random(seed)
    sizes = [0, 1, 8, 4095, STAGE - 1, 3, 2 * STAGE + 17, rng.randrange(1, 1 << 16)]
    return [rng.randbytes(n) for n in sizes]


def _write(path: Path, pieces: list[bytes]) -> None:
    f = DirectFile(path)
    for p in pieces:
        f.write(p)
    f.close()


def test_file_holds_exactly_the_bytes_written(tmp_path: Path) -> None:
    pieces = _pieces(0)
    _write(tmp_path / "out", pieces)
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)


def test_small_file_is_not_padded(tmp_path: Path) -> None:
    _write(tmp_path / "out", [b"abc"])
    assert (tmp_path / "out").read_bytes() == b"abc"


@pytest.mark.parametrize("where", ["open", "first write"])
def test_filesystems_refusing_o_direct_get_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    real_open, real_write, calls = os.open, os.write, {"write": 0}

    def fake_open(path: str, flags: int, mode: int = 0o777) -> int:
        if where == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    def fake_write(fd: int, data: object) -> int:
        calls["write"] += 1
        if where == "first write" and calls["write"] == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(direct.os, "open", fake_open)
    monkeypatch.setattr(direct.os, "write", fake_write)
    pieces = _pieces(1)
    _write(tmp_path / "out", pieces)
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)


def test_a_failed_write_is_raised_by_a_later_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes after the first run on a thread; their errors (disk full) still surface."""
    real_write, calls = os.write, {"write": 0}

    def fake_write(fd: int, data: object) -> int:
        calls["write"] += 1
        if calls["write"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(direct.os, "write", fake_write)
    f = DirectFile(tmp_path / "out")
    with pytest.raises(OSError, match="No space"):
        f.write(b"x" * (4 * STAGE))
        f.close()
    f.abort()
