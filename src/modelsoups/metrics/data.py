"""Held-out data files of the built-in metrics: JSONL or CSV records, ImageFolder trees.

Every problem is a `DataError` naming the file and line: a missing or empty file, a line
that is not a JSON object, a missing field, a value of the wrong type.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import SoupError

__all__ = [
    "IMAGE_SUFFIXES",
    "DataError",
    "check_label",
    "field",
    "image_folder",
    "lengths_order",
    "read_records",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(SoupError):
    """A held-out data file cannot be used by the metric (names the file and line)."""


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """`(line number, record)` of a JSONL file, or of a CSV file (`.csv`, header row)."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read data file ({e})") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        records = [(i + 2, dict(r)) for i, r in enumerate(rows)]  # line 1 is the header
    else:
        records = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i}: not valid JSON ({e.msg})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path} line {i}: not a JSON object")
            records.append((i, value))
    if not records:
        raise DataError(f"{path}: no examples (empty data file)")
    return records


def field(path: Path, line: int, record: dict[str, Any], name: str, kind: type) -> Any:
    """`record[name]` checked to be a `kind` (an int label may be written "3" in a CSV)."""
    if name not in record or record[name] is None:
        raise DataError(f"{path} line {line}: no {name!r} field (has {sorted(record)[:5]})")
    value = record[name]
    if kind is int and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise DataError(f"{path} line {line}: {name!r} is {value!r}, not an integer") from None
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise DataError(
            f"{path} line {line}: {name!r} is {type(value).__name__}, not {kind.__name__}"
        )
    return value


def check_label(path: Path, line: int, label: int, classes: int) -> int:
    """A label id in 0..classes-1, else a `DataError`."""
    if not 0 <= label < classes:
        raise DataError(
            f"{path} line {line}: label {label} is out of range; the model has {classes} "
            f"classes (0..{classes - 1})"
        )
    return label


def image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """An ImageFolder tree: one subfolder per class, sorted names = label ids 0, 1, ...

    Returns the class names and `(image path, label)` pairs, in sorted order.
    """
    if not root.is_dir():
        what = "is not a folder (image-accuracy reads an ImageFolder)"
        what = what if root.exists() else "not found"
        raise DataError(f"{root}: data folder {what}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files = sorted((root / name).iterdir())
        items += [(f, label) for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise DataError(f"{root}: no images (expected one subfolder of images per class)")
    return classes, items


def lengths_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of `batch_size`, longest first, so that padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
