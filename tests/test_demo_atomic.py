"""The demo's cache files are written whole or not at all."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelsoups.demo.atomic import save_json, save_tensors, write_atomic
from modelsoups.errors import OutputError


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=f"^{re.escape(str(path))}: disk full") as e:
        write_atomic(path, fail)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    save_json({"done": True}, path)
    with pytest.raises(ZeroDivisionError):
        write_atomic(path, lambda tmp: 1 / 0)
    assert path.read_text() == '{"done": true}\n'
    assert list(tmp_path.iterdir()) == [path]


def test_tensors_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_tensors({"w": torch.arange(3.0)}, path)
    assert torch.equal(load_file(str(path))["w"], torch.arange(3.0))
