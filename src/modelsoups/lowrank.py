"""The low-rank algebra of LoRA soups: exact concatenation, rank truncation, factor means.

A LoRA module updates a weight by ΔW = s·B·A (B: d × r, A: r × k). A weighted soup of N
adapters is

    ΔW_soup = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ | … | w_N s_N B_N] · [A₁; …; A_N]

exactly one LoRA of rank Σrᵢ with scale 1 (`concat_factors`). `truncate` compresses it to
rank K by the truncated SVD of B·A, computed from QR factors of B and Aᵀ: with B = Q_b R_b
and Aᵀ = Q_a R_a, B·A = Q_b (R_b R_aᵀ) Q_aᵀ, so only the small core R_b R_aᵀ is decomposed
and the d × k product is never formed. `factor_mean` is the naive average of the factors,
(Σ wᵢsᵢBᵢ)(Σ wᵢAᵢ), which is not the soup: `relative_error` says by how much.
Everything here is float64 on small factor matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import SoupError

if TYPE_CHECKING:
    import torch

__all__ = ["concat_factors", "factor_mean", "lowrank_norm", "relative_error", "truncate"]


def concat_factors(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], coefs: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [A₁; …; A_N] (stacked on the rank axis), B = [c₁B₁ | … | c_N B_N]: B·A = Σ cᵢBᵢAᵢ.

    Works for any layout whose rank axis is dim 0 of A and dim 1 of B (linear, embedding
    and convolution LoRA alike)."""
    import torch

    A = torch.cat([a.double() for a in As], dim=0)
    B = torch.cat([c * b.double() for c, b in zip(coefs, Bs, strict=True)], dim=1)
    return A, B


def _pad_rank(x: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    import torch

    shape = list(x.shape)
    shape[dim] = rank - x.shape[dim]
    return torch.cat([x.double(), x.new_zeros(shape, dtype=torch.float64)], dim=dim)


def factor_mean(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    coefs: Sequence[float],
    weights: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive factor average: A = Σ wᵢAᵢ, B = Σ wᵢ·(cᵢ/wᵢ)·Bᵢ = Σ cᵢBᵢ, where cᵢ = wᵢsᵢ.

    This is what averaging the adapter files gives when every adapter has the same rank and
    alpha; smaller ranks are padded with zeros (which leaves each BᵢAᵢ unchanged)."""
    rank = max(a.shape[0] for a in As)
    A = sum((w * _pad_rank(a, rank, 0) for w, a in zip(weights, As, strict=True)))
    B = sum((c * _pad_rank(b, rank, 1) for c, b in zip(coefs, Bs, strict=True)))
    return A, B  # type: ignore[return-value]


def _matrix(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim != 2:
        raise SoupError(f"{what}: only 2-d (linear/embedding) LoRA factors can be compressed")
    return x.double()


def truncate(
    A: torch.Tensor, B: torch.Tensor, rank: int, *, name: str = "module"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors (A_K, B_K) of B·A and the relative Frobenius error
    ‖B·A − B_K·A_K‖/‖B·A‖ (Eckart–Young: the dropped singular values' share).

    The singular values are split evenly between the factors (√σ on each side).

    Example:
        >>> A_k, B_k, err = truncate(A, B, 8)  # doctest: +SKIP
    """
    import torch

    a, b = _matrix(A, name), _matrix(B, name)
    qb, rb = torch.linalg.qr(b)  # d × m, m × R
    qa, ra = torch.linalg.qr(a.T)  # k × n, n × R
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    total = float(s.square().sum())
    err = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
    return (root[:, None] * vh[:k]) @ qa.T, qb @ (u[:, :k] * root), err


def lowrank_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖_F from QR factors of B and Aᵀ, without forming B·A."""
    import torch

    # convolution LoRA: A is (r, in, kh, kw) and B is (out, r, 1, 1); ΔW is B·A flattened
    b = B.double().reshape(B.shape[0], B.shape[1])
    a = A.double().reshape(A.shape[0], -1)
    rb = torch.linalg.qr(b, mode="r")[1]
    ra = torch.linalg.qr(a.T, mode="r")[1]
    return float(torch.linalg.matrix_norm(rb @ ra.T))


def relative_error(
    exact: tuple[torch.Tensor, torch.Tensor], approx: tuple[torch.Tensor, torch.Tensor]
) -> float:
    """‖B·A − B'·A'‖/‖B·A‖ for factor pairs (A, B) and (A', B'), never forming d × k:
    the difference is itself low-rank, [B | −B']·[A; A']."""
    import torch

    (a, b), (a2, b2) = exact, approx
    norm = lowrank_norm(b, a)
    diff = lowrank_norm(torch.cat([b.double(), -b2.double()], 1), torch.cat([a, a2], 0).double())
    return diff / norm if norm > 0 else 0.0
