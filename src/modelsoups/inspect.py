"""`soup inspect`: what each checkpoint holds and whether the set can be souped."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .check import check_compatible
from .errors import SoupError
from .ingredients import open_ingredients
from .similarity import similarity_report
from .types import PathLike

__all__ = ["CheckpointSummary", "InspectReport", "human_bytes", "inspect_checkpoints"]


@dataclass
class CheckpointSummary:
    """One checkpoint as its headers describe it."""

    path: Path
    format: str
    tensors: int
    parameters: int
    dtypes: dict[str, int]
    size_on_disk: int
    notes: list[str]
    metadata: dict[str, str]


@dataclass
class InspectReport:
    """Summaries of every checkpoint plus the compatibility verdict for the set."""

    checkpoints: list[CheckpointSummary]
    compatible: bool
    verdict: str
    extra: dict[str, object] = field(default_factory=dict)


def _disk_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def inspect_checkpoints(
    inputs: Sequence[PathLike],
    *,
    key: str | None = None,
    unsafe_pickle: bool = False,
    base: PathLike | None = None,
) -> InspectReport:
    """Read the headers of `inputs` and say whether they can be souped together.

    Unreadable inputs raise (`CheckpointError`); an incompatible set is reported in
    `verdict` with `compatible=False`, since seeing why is the point of inspecting.
    A compatible set also gets `extra["similarity"]`: pairwise cosine similarity of the
    ingredients (and of their deltas from `base`), estimated on a sample of each tensor.
    """
    ckpts = open_ingredients([*inputs, *([base] if base is not None else [])], key=key,
                             unsafe_pickle=unsafe_pickle)  # fmt: skip
    base_ckpt = ckpts.pop() if base is not None else None
    try:
        summaries = [
            CheckpointSummary(
                path=c.path,
                format=c.format,
                tensors=len(c.infos),
                parameters=sum(i.numel for i in c.infos.values() if i.is_float),
                dtypes=dict(Counter(str(i.dtype) for i in c.infos.values())),
                size_on_disk=_disk_size(c.path),
                notes=list(c.notes),
                metadata=dict(c.metadata),
            )
            for c in ckpts
        ]
        extra: dict[str, object] = {}
        try:
            check_compatible(ckpts + ([base_ckpt] if base_ckpt else []))
            verdict, ok = f"compatible: {len(ckpts)} checkpoint(s) can be souped", True
            extra["similarity"] = similarity_report(ckpts, base=base_ckpt)
        except SoupError as e:
            verdict, ok = f"incompatible: {e}", False
    finally:
        for c in [*ckpts, *([base_ckpt] if base_ckpt else [])]:
            c.close()
    return InspectReport(summaries, ok, verdict, extra)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (decimal units, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
