"""Option text -> value for the soup commands; anything else is a one-line `SoupError`.

Called where the value is used, so errors come in the order the commands meet them.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from ..errors import SoupError

if TYPE_CHECKING:
    from ..dtypes import DType


def parse_dtype(name: str | None) -> DType | None:
    """'bf16' -> the BF16 `DType`; None stays None (keep the inputs' dtype). The library's
    `output_dtype`, minus float8: readable as an input, not offered as an output here."""
    from ..average import output_dtype

    dtype = output_dtype(name)
    if dtype is not None and dtype.name.startswith("F8"):
        raise SoupError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16, fp64")
    return dtype


def parse_size(text: str | None) -> int | None:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2*2**30, '1000' -> 1000 bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise SoupError(f"cannot read size {text!r}; write e.g. 500MB, 5GB or 2GiB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    value = float(m.group(1)) * base**power
    if not math.isfinite(value) or value >= 2**63:
        raise SoupError(f"size {text[:40]!r} is too large")
    size = int(value)
    if size <= 0:
        raise SoupError(f"size must be positive, got {text!r}")
    return size


def parse_memory(text: str) -> int:
    """`--memory`: a size ('2GiB', '500MB') or 0."""
    return 0 if text.strip() == "0" else parse_size(text) or 0


def parse_floats(text: str, what: str) -> list[float]:
    """'0.5,0.3,0.2' -> [0.5, 0.3, 0.2]."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SoupError(
            f"cannot read {what} {text[:80]!r}; write numbers separated by commas"
        ) from None
