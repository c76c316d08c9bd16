"""Do these ingredients share one initialisation? Pairwise cosine similarity, cheaply.

Soups only work for models fine-tuned from the same pretrained weights, which stay in one
low-error basin (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, §3 and Fig. 2):
averaging two independently initialised networks gives a useless model. Fine-tuned runs
of one base have weight vectors with cosine similarity close to 1; different random
initialisations are nearly orthogonal.

The estimate reads a fixed block of `per_tensor` contiguous elements from the middle of
every floating tensor (a zero-copy view of the memory map: one or two pages per tensor, not
a pass over the weights), which keeps the streaming uniform soup fast. Independent
initialisations are uncorrelated in any block; fine-tunes of one base agree in every block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .dtypes import DType
from .io.base import Checkpoint

__all__ = [
    "SAME_INIT_THRESHOLD",
    "SimilarityReport",
    "cosine_matrix",
    "init_warning",
    "sample_vector",
    "similarity_report",
]

# Below this weight cosine, two ingredients are very unlikely to share an initialisation
# (fine-tuned runs of one base measure > 0.9; independent initialisations measure ~0-0.3).
SAME_INIT_THRESHOLD = 0.5


def sample_vector(
    ckpt: Checkpoint, *, per_tensor: int = 128, names: Sequence[str] | None = None
) -> np.ndarray:
    """A float64 vector of `per_tensor` contiguous elements from the middle of each floating
    tensor (all of it when smaller), in the order of `names` (default: the file's order)."""
    parts = []
    for name in ckpt.infos if names is None else names:
        info = ckpt.infos[name]
        if not info.is_float or info.numel == 0:
            continue
        flat = ckpt.array(name).reshape(-1)
        start = max(0, info.numel // 2 - per_tensor // 2)
        block = flat[start : start + per_tensor]
        parts.append(block if info.dtype.native else _widened(block, info.dtype))
    if not parts:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([p.astype(np.float64) for p in parts])


def _widened(block: np.ndarray, dtype: DType) -> np.ndarray:
    """A bf16/float8 block as float32 (the soup kernel's widening, weight 1: exact)."""
    from .average import weighted_sum_arrays

    return weighted_sum_arrays([block], [dtype], [1.0])[0]


def cosine_matrix(vectors: Sequence[np.ndarray]) -> list[list[float]]:
    """Pairwise cosine similarities of `vectors`; NaN where it is undefined: a vector that is
    all zeros (e.g. zero-initialised tensors, or a delta of 0) or holds NaN/Inf."""
    unit, ok = _unit_rows(vectors)
    with np.errstate(all="ignore"):
        # einsum, not `unit @ unit.T`: a BLAS call leaves OpenBLAS threads spinning on the
        # cores the soup is about to use
        cos = np.clip(np.einsum("ik,jk->ij", unit, unit), -1.0, 1.0)
    cos[~(ok[:, None] & ok[None, :])] = np.nan
    return [[round(float(x), 6) for x in row] for row in cos]


@dataclass
class SimilarityReport:
    """Pairwise cosine of the ingredients' weights (and of their deltas from a base)."""

    names: list[str]
    cosine: list[list[float]]
    delta_cosine: list[list[float]] | None
    warning: str | None


def similarity_report(
    ckpts: Sequence[Checkpoint],
    *,
    base: Checkpoint | None = None,
    per_tensor: int = 128,
    threshold: float = SAME_INIT_THRESHOLD,
) -> SimilarityReport:
    """Cosine similarity of every pair of ingredients, estimated on a fixed sample.

    Checkpoints must be compatible (same keys and shapes). With `base`, also the cosine of
    the deltas θᵢ − θ₀ (what Model Stock and task arithmetic work with).
    """
    names = [str(c.path) for c in ckpts]
    keys = list(ckpts[0].infos)  # one order for all: files list their tensors differently
    vectors = [sample_vector(c, per_tensor=per_tensor, names=keys) for c in ckpts]
    cos = cosine_matrix(vectors)
    delta = None
    if base is not None:
        v0 = sample_vector(base, per_tensor=per_tensor, names=keys)
        delta = cosine_matrix([v - v0 for v in vectors])
    return SimilarityReport(names, cos, delta, _warning(names, cos, threshold))


def _warning(names: list[str], cos: list[list[float]], threshold: float) -> str | None:
    n = len(names)
    pairs = [(cos[i][j], i, j) for i in range(n) for j in range(i + 1, n)]
    pairs = [p for p in pairs if not math.isnan(p[0])]  # undefined: says nothing of the init
    if not pairs:
        return None
    worst, i, j = min(pairs)
    return _message(names[i], names[j], worst, threshold) if worst < threshold else None


def _message(a: str, b: str, cos: float, threshold: float) -> str:
    return (
        f"ingredients look like different initialisations: weight cosine similarity of "
        f"{a} and {b} is {cos:.2f} (< {threshold}); soups need models fine-tuned from the "
        "same pretrained weights, and this soup is probably useless"
    )


def init_warning(
    ckpts: Sequence[Checkpoint], *, per_tensor: int = 32, threshold: float = SAME_INIT_THRESHOLD
) -> str | None:
    """A warning if some pair of ingredients looks independently initialised, else None.

    The same answer as comparing every pair (is some pair's cosine below `threshold`?), in
    O(N) comparisons when the ingredients agree, not N²: angles on the sphere obey the
    triangle inequality, so two ingredients within half of arccos(threshold) of their mean
    direction are within arccos(threshold) of each other. Only the ingredients further out
    are compared with all the others, the furthest first, and the first pair found below the
    threshold is named.
    """
    if len(ckpts) < 2:
        return None
    keys = list(ckpts[0].infos)  # one order for all: files list their tensors differently
    unit, ok = _unit_rows([sample_vector(c, per_tensor=per_tensor, names=keys) for c in ckpts])
    unit, index = unit[ok], np.flatnonzero(ok)  # an undefined direction says nothing
    if len(index) < 2:
        return None
    center = unit.sum(axis=0)
    norm = math.sqrt(float(np.einsum("k,k->", center, center)))
    center = center / norm if norm > 0 and math.isfinite(norm) else unit[0]
    angle = np.arccos(np.clip(np.einsum("ik,k->i", unit, center), -1.0, 1.0))
    # 1e-6 rad: a margin for the rounding of the angles (none is known to better than ~1e-8)
    half = math.acos(min(max(threshold, -1.0), 1.0)) / 2 - 1e-6
    for i in sorted(np.flatnonzero(angle > half), key=lambda i: -angle[i]):
        cos = np.einsum("ik,k->i", unit, unit[i])
        j = int(np.argmin(cos))
        if cos[j] < threshold:
            names = sorted((int(index[i]), int(index[j])))
            return _message(str(ckpts[names[0]].path), str(ckpts[names[1]].path), float(cos[j]),
                            threshold)  # fmt: skip
    return None


def _unit_rows(vectors: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The rows scaled to length 1, and which rows have a direction (finite, not zero)."""
    m = np.stack([np.asarray(v, dtype=np.float64) for v in vectors])
    with np.errstate(all="ignore"):
        norms = np.linalg.norm(m, axis=1)
        ok = np.isfinite(norms) & (norms > 0)
        return m / np.where(ok, norms, 1.0)[:, None], ok  # scaled first: no under/overflow
