"""Scratch checkpoints (`io/scratch.py`): written by position, in any order, from several
threads, they hold the same bytes as the durable writer's; a missing or misfit part is an
error, not a short file."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from modelsoups.dtypes import DTYPES
from modelsoups.io.scratch import ScratchFile
from modelsoups.io.writer import Entry, OutputPlan, ShardedWriter

F32, BF16 = DTYPES["F32"], DTYPES["BF16"]


def tensors() -> dict[str, tuple[np.ndarray, Entry]]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 5)).astype(np.float32)
    b = rng.integers(0, 2**16, 1000, dtype=np.uint64).astype(np.uint16)  # bf16 bits
    empty = np.zeros((0, 3), np.float32)
    return {"a": (a, Entry("a", F32, a.shape)), "b": (b, Entry("b", BF16, b.shape)),
            "empty": (empty, Entry("empty", F32, empty.shape))}  # fmt: skip


def test_parts_in_any_order_from_threads_give_the_durable_writers_bytes(tmp_path: Path) -> None:
    data = tensors()
    entries = [e for _, e in data.values()]
    meta = {"format": "pt"}
    durable = tmp_path / "durable.safetensors"
    writer = ShardedWriter(durable, OutputPlan(durable, entries, meta, folder=False))
    for name, (x, _) in data.items():
        writer.write(name, x)
    writer.close()
    f = ScratchFile(tmp_path / "scratch.safetensors", entries, meta)
    parts = [(name, lo, x.reshape(-1)[lo : lo + 64]) for name, (x, _) in data.items()
             for lo in range(0, x.size, 64)][::-1]  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: f.sink(p[0])(p[1], p[2]), parts))
    f.close()
    assert (tmp_path / "scratch.safetensors").read_bytes() == durable.read_bytes()


def test_missing_or_misfit_parts_are_errors(tmp_path: Path) -> None:
    data = tensors()
    f = ScratchFile(tmp_path / "x.safetensors", [e for _, e in data.values()], {})
    a = data["a"][0].reshape(-1)
    with pytest.raises(RuntimeError, match="does not fit"):
        f.sink("a")(30, a)  # past the end
    with pytest.raises(RuntimeError, match="does not fit"):
        f.sink("b")(0, a)  # float32 data for a bf16 tensor
    f.sink("a")(0, a)
    with pytest.raises(RuntimeError, match="bytes written"):
        f.close()  # "b" never written
