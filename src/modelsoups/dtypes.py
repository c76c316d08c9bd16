"""Tensor dtypes without torch: the safetensors dtype names, and how numpy stores each one.

The file path (`soup uniform`, `soup weighted`, `soup inspect` on safetensors) never
imports torch, which takes ~2 s to import: a checkpoint's dtype is a `DType` named as in
the safetensors header (`F32`, `BF16`, ...), and its data is a numpy array in the dtype's
*storage* type. numpy has no bfloat16 or float8, so those are stored as their bits
(`uint16`, `uint8`); `average.py` widens and rounds them itself. torch tensors cross into
and out of numpy zero-copy (`to_numpy`, `to_torch`), importing torch only when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "DType", "as_dtype", "to_numpy", "to_torch"]


@dataclass(frozen=True)
class DType:
    """A tensor dtype: its safetensors name, torch name, size and numpy storage type."""

    name: str  # as in a safetensors header: "F32", "BF16", "I64", ...
    torch_name: str  # the torch attribute: "float32", "bfloat16", "int64", ...
    itemsize: int
    is_float: bool
    storage: str  # numpy dtype holding the data (bits only for bf16 and float8)

    @property
    def numpy(self) -> np.dtype[Any]:
        return np.dtype(self.storage)

    @property
    def native(self) -> bool:
        """True if numpy computes in this dtype (everything except bf16 and float8)."""
        return self.name not in ("BF16", "F8_E4M3", "F8_E5M2")

    def to_torch(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.torch_name)
        return dtype

    def __str__(self) -> str:
        return self.torch_name


_TABLE = [  # name, torch name, itemsize, is_float, numpy storage
    ("F64", "float64", 8, True, "<f8"),
    ("F32", "float32", 4, True, "<f4"),
    ("F16", "float16", 2, True, "<f2"),
    ("BF16", "bfloat16", 2, True, "<u2"),
    ("F8_E4M3", "float8_e4m3fn", 1, True, "u1"),
    ("F8_E5M2", "float8_e5m2", 1, True, "u1"),
    ("I64", "int64", 8, False, "<i8"),
    ("I32", "int32", 4, False, "<i4"),
    ("I16", "int16", 2, False, "<i2"),
    ("I8", "int8", 1, False, "i1"),
    ("U64", "uint64", 8, False, "<u8"),
    ("U32", "uint32", 4, False, "<u4"),
    ("U16", "uint16", 2, False, "<u2"),
    ("U8", "uint8", 1, False, "u1"),
    ("BOOL", "bool", 1, False, "?"),
]
DTYPES: dict[str, DType] = {row[0]: DType(*row) for row in _TABLE}
F32, F64, BF16 = DTYPES["F32"], DTYPES["F64"], DTYPES["BF16"]
_BY_TORCH_NAME = {d.torch_name: d for d in DTYPES.values()}
_ALIASES = {
    "fp32": "float32", "float": "float32",
    "fp16": "float16", "half": "float16",
    "bf16": "bfloat16",
    "fp64": "float64", "double": "float64",
}  # fmt: skip


def as_dtype(x: DType | str | Any) -> DType:
    """A `DType` from a `DType`, a torch dtype, a safetensors name (`"BF16"`), a torch name
    (`"bfloat16"`) or a short name (`"bf16"`, `"fp32"`). Raises `ValueError` otherwise."""
    if isinstance(x, DType):
        return x
    text = str(x).removeprefix("torch.")  # str(torch.bfloat16) == "torch.bfloat16"
    found = DTYPES.get(text) or _BY_TORCH_NAME.get(_ALIASES.get(text.lower(), text.lower()))
    if found is None:
        raise ValueError(f"unknown dtype {x!r}")
    return found


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The data of a CPU tensor as a numpy array in its storage type, without a copy
    (bf16 and float8 are reinterpreted as their bits; strides are kept)."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        bits = torch.int16 if t.dtype == torch.bfloat16 else torch.uint8
        return t.view(bits).numpy().view(as_dtype(t.dtype).numpy)
    return t.numpy()


def to_torch(array: np.ndarray, dtype: DType) -> torch.Tensor:
    """A torch tensor of `dtype` viewing `array` (in `dtype`'s storage type), no copy."""
    import torch

    if not array.size:  # numpy may give empty arrays strides torch's views refuse
        return torch.empty(array.shape, dtype=dtype.to_torch())
    if not array.flags.writeable:  # torch.from_numpy warns on read-only arrays
        array = array.copy()
    t = torch.from_numpy(array)
    return t if dtype.native else t.view(dtype.to_torch())
