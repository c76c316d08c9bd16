"""Fuzzing the checkpoint readers: hostile bytes get a `CheckpointError`, nothing else.

Whatever a file holds — random bytes, a valid safetensors file with flipped bytes, cut
short, its header length or header fields replaced by arbitrary JSON — opening it and
reading every tensor must:

- raise nothing but the project's own `SoupError` subclasses (no traceback for users),
- finish quickly (an alarm turns a hang into a failure; a hang in C code ends the run),
- allocate no more than the file size suggests: Python allocations stay within a small
  multiple of the file size (tracemalloc), and the tensors handed out never add up to
  more bytes than the file holds.
"""

from __future__ import annotations

import faulthandler
import io
import json
import signal
import struct
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelsoups.dtypes import DTYPES
from modelsoups.errors import CheckpointError, SoupError
from modelsoups.io import open_checkpoint

SECONDS = 2  # per example: generous for a file of a few hundred bytes
FUZZ = settings(
    max_examples=150,
    deadline=None,  # the alarm below is the real limit; deadlines flake on a busy CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # same examples every run: CI stays reproducible
)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="soup-fuzz-") as d:
        yield Path(d)


class Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang(f"reader still busy after {SECONDS} s")


def read_everything(path: Path) -> SoupError | None:
    """Open `path` and read every tensor, under the three rules of this module; return the
    error it raised, if any."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    size = sum(p.stat().st_size for p in files)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    # The alarm cannot interrupt a hang inside C code (torch.load's zip reader); this
    # ends the whole run with a traceback instead of hanging CI.
    faulthandler.dump_traceback_later(10 * SECONDS, exit=True)
    tracemalloc.start()
    handed_out = 0
    error = None
    try:
        with open_checkpoint(path) as ckpt:
            for name in list(ckpt.infos):
                t = ckpt.get(name)
                assert tuple(t.shape) == ckpt.infos[name].shape
                assert t.dtype == ckpt.infos[name].dtype.to_torch()
                handed_out += t.numel() * t.element_size()
                # What the soup does next: widen to float32 (must not blow up either).
                t.to(torch.float32 if t.dtype.is_floating_point else t.dtype).sum()
    except SoupError as e:
        assert str(path) in str(e), f"error does not name the file: {e}"
        assert "\n" not in str(e)
        error = e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, old)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert handed_out <= size, f"{handed_out} tensor bytes from a {size}-byte file"
    assert peak <= 1024 * 1024 + 64 * size, f"peak Python allocation {peak} B for {size} B"
    return error


# ---------------------------------------------------------------------------------------
# Building safetensors files, valid and not.


def pack(header: Any, data: bytes, length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


@st.composite
def valid_safetensors(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """A small, valid file: a few tensors of any supported dtype, packed in any order."""
    names = draw(st.lists(st.sampled_from(["a", "b.weight", "module.c", "d", "é"]), max_size=4))
    header: dict[str, Any] = {}
    data = b""
    for name in dict.fromkeys(names):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        n = DTYPES[dtype].itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += draw(st.binary(min_size=n, max_size=n))
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    return header, data


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, 4, 2**31, 2**63 - 1, 2**63, 2**64, -1])
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(sorted(DTYPES)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@st.composite
def mutated_header(draw: st.DrawFn) -> bytes:
    """A valid file whose header has one field replaced, removed or an entry added."""
    header, data = draw(valid_safetensors())
    names = [k for k in header if k != "__metadata__"]
    kind = draw(st.sampled_from(["field", "drop", "entry", "metadata", "raw"]))
    if kind == "field" and names:
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(json_values)
    elif kind == "drop" and names:
        name = draw(st.sampled_from(names))
        del header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "entry":
        header[draw(st.text(max_size=6))] = draw(json_values)
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values)
    elif kind == "raw":
        return pack(draw(json_values), data)
    return pack(header, data)


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    """A valid file with bytes overwritten, cut short, or its length field replaced."""
    raw = bytearray(pack(*draw(valid_safetensors())))
    kind = draw(st.sampled_from(["flip", "truncate", "length", "append"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    elif kind == "truncate":
        del raw[draw(st.integers(0, len(raw))) :]
    elif kind == "length":
        raw[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    else:
        raw += draw(st.binary(min_size=1, max_size=64))
    return bytes(raw)


def write(workdir: Path, raw: bytes, suffix: str = ".safetensors") -> Path:
    path = workdir / f"fuzz{suffix}"
    path.write_bytes(raw)
    return path


@FUZZ
@given(raw=st.binary(max_size=512))
def test_random_bytes(workdir: Path, raw: bytes) -> None:
    read_everything(write(workdir, raw))


@FUZZ
@given(raw=mutated_header())
def test_mutated_headers(workdir: Path, raw: bytes) -> None:
    read_everything(write(workdir, raw))


@FUZZ
@given(raw=mutated_bytes())
def test_mutated_bodies(workdir: Path, raw: bytes) -> None:
    read_everything(write(workdir, raw))


@FUZZ
@given(file=valid_safetensors())
def test_valid_files_round_trip(workdir: Path, file: tuple[dict[str, Any], bytes]) -> None:
    """The generator itself makes readable files: the mutations start from valid ones."""
    header, data = file
    path = write(workdir, pack(header, data))
    with open_checkpoint(path) as ckpt:
        assert len(ckpt.keys()) == len([k for k in header if k != "__metadata__"])
        for name in list(ckpt.infos):
            raw_name = ckpt.raw_name(name)  # type: ignore[attr-defined]
            begin, end = header[raw_name]["data_offsets"]
            t = ckpt.get(name)
            assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == data[begin:end]


def test_known_crashers(workdir: Path) -> None:
    """Inputs that once escaped as TypeError/RuntimeError/ValueError/RecursionError."""
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    crashers = [
        {"a": {**entry, "dtype": [1]}},  # unhashable dtype
        {"a": {**entry, "dtype": {}}},
        {"a": {**entry, "shape": [True]}},  # bool is an int to isinstance
        {"a": {**entry, "shape": [0, 2**64], "data_offsets": [0, 0]}},  # empty but huge
        {"a": {**entry, "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}},
        {"a": {**entry, "shape": [1] * 65}},  # more dimensions than torch supports
    ]
    raws = [pack(h, b"\0" * 8) for h in crashers]
    raws += [pack(b"[" * 100_000 + b"]" * 100_000, b""), pack(b"[" + b"1" * 5000 + b"]", b"")]
    for raw in raws:
        assert isinstance(read_everything(write(workdir, raw)), CheckpointError)


# ---------------------------------------------------------------------------------------
# End to end: valid but arbitrary ingredients (any dtype, shape, values, keys that may not
# match) give a soup or a SoupError, never another exception.

values = st.sampled_from([0.0, 1.0, -2.5, 1e-8])
specials = st.sampled_from([None, 1e5, 3e38, -3e38, float("nan"), float("inf")])


shapes = st.sampled_from([(), (1,), (2, 3), (0, 4)])
dtype_names = st.just("F32") | st.sampled_from(sorted(DTYPES))  # F32 half the time


@st.composite
def ingredient(draw: st.DrawFn, schema: dict[str, tuple[str, tuple[int, ...]]]) -> dict:
    """Tensors following `schema` (name -> dtype, shape), with a rare missing key or odd
    dtype/shape, and values that include extremes, NaN and Inf."""
    sd = {}
    for key, (dtype_name, shape) in schema.items():
        kind = draw(st.sampled_from(["as schema"] * 18 + ["missing", "odd"]))
        if kind == "missing":
            continue
        if kind == "odd":
            dtype_name, shape = draw(dtype_names), draw(shapes)
        numel = 1
        for d in shape:
            numel *= d
        elements = draw(st.lists(values, min_size=numel, max_size=numel))
        special = draw(specials)
        if numel and special is not None:  # one extreme or non-finite value, at most
            elements[draw(st.integers(0, numel - 1))] = special
        data = torch.tensor(elements)
        sd[key] = data.reshape(shape).to(DTYPES[dtype_name].to_torch())
    return sd


@settings(FUZZ, max_examples=80)
@given(
    data=st.data(),
    n=st.integers(1, 3),
    allow_nonfinite=st.booleans(),
    dtype=st.sampled_from([None, torch.float16, torch.bfloat16, torch.float8_e4m3fn]),
)
def test_arbitrary_ingredients_soup_or_soup_error(
    workdir: Path, data: st.DataObject, n: int, allow_nonfinite: bool, dtype: torch.dtype | None
) -> None:
    """... and without --allow-nonfinite, a soup that was written holds no NaN or Inf."""
    from safetensors.torch import load_file, save_file

    from modelsoups.stream import average_checkpoints

    keys = st.sampled_from(["a", "b", "module.c", "n"])
    schema = data.draw(st.dictionaries(keys, st.tuples(dtype_names, shapes), min_size=1))
    paths = []
    for i in range(n):
        paths.append(workdir / f"ingredient{i}.safetensors")
        save_file(data.draw(ingredient(schema)), paths[-1])
    out = workdir / "soup.safetensors"
    out.unlink(missing_ok=True)
    try:
        average_checkpoints(
            paths, out, allow_nonfinite=allow_nonfinite, non_float="first", dtype=dtype
        )
    except SoupError:
        assert not out.exists()
    else:
        soup = load_file(out)
        for name, t in soup.items():
            if t.is_floating_point() and not allow_nonfinite:
                assert bool(torch.isfinite(t.float()).all()), f"{name}: {t}"
    assert not list(workdir.glob(".*soup-partial*"))


# ---------------------------------------------------------------------------------------
# Hugging Face folders: the shard index is as untrusted as the shards.

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
shard_names = st.sampled_from(
    [SHARD1, SHARD2, "missing.bin",
     "", ".", "..", "../x.safetensors", "/etc/hostname", "config.json",
     "model.safetensors.index.json"]
) | st.text(max_size=12)  # fmt: skip
tensor_keys = st.sampled_from(["a", "b", "module.a", "_orig_mod.b"]) | st.text(max_size=6)
prefixed_keys = st.builds(
    lambda n, k: "module." * n + k, st.sampled_from([1, 2, 1500, 10**5]), st.sampled_from("abc")
)


@FUZZ
@given(
    index=st.one_of(
        st.builds(  # the valid map plus random entries, so that deep checks are reached
            lambda extra: {"weight_map": {"a": SHARD1, "b": SHARD2, **extra}},
            st.dictionaries(
                prefixed_keys | tensor_keys, st.sampled_from([SHARD1, SHARD2]) | shard_names
            ),
        ),
        st.fixed_dictionaries(
            {"weight_map": st.dictionaries(tensor_keys | prefixed_keys, shard_names, max_size=5)}
        ),
        json_values,
    )
)
def test_mutated_shard_indexes(workdir: Path, index: Any) -> None:
    folder = workdir / "hf"
    if not folder.exists():
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / SHARD1).write_bytes(
            pack({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
        )
        (folder / SHARD2).write_bytes(
            pack({"b": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]}}, b"\1\2")
        )
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    read_everything(folder)


# ---------------------------------------------------------------------------------------
# Pickles: torch.load(weights_only=True) on hostile bytes must also end in CheckpointError.


def _saved_pickle() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}, buf)
    return buf.getvalue()


SAVED = _saved_pickle()


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, len(SAVED) - 1), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, len(SAVED)),
)
def test_mutated_pickles(workdir: Path, flips: list[tuple[int, int]], cut: int) -> None:
    raw = bytearray(SAVED)
    for pos, byte in flips:
        raw[pos] = byte
    read_everything(write(workdir, bytes(raw[: max(cut, 1)]), ".pt"))


@settings(FUZZ, max_examples=40)
@given(shape=st.lists(st.integers(1, 2**12), min_size=1, max_size=3))
def test_pickled_broadcast_views(workdir: Path, shape: list[int]) -> None:
    """`torch.save(t.expand(...))` stores one element: the shape must not be believed."""
    path = workdir / "fuzz.pt"
    torch.save({"w": torch.zeros(1).expand(*shape)}, path)
    read_everything(path)


@FUZZ
@given(raw=st.binary(min_size=1, max_size=256))
def test_random_pickles(workdir: Path, raw: bytes) -> None:
    read_everything(write(workdir, raw, ".pt"))
