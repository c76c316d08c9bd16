"""The low-rank algebra of LoRA soups against dense float64 references (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsoups.lowrank import concat_factors, factor_mean, relative_error, truncate


def factors(seed: int, ranks: list[int], d: int = 7, k: int = 5) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, k, generator=g, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(d, r, generator=g, dtype=torch.float64) for r in ranks]
    return As, Bs


CASES = dict(
    seed=st.integers(0, 10_000),
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    # a weight times a LoRA scale: 0, or far from the float64 underflow where squared norms
    # lose their digits (hypothesis found 1e-161)
    coefs=st.lists(
        st.floats(-2, 2, allow_nan=False).map(lambda c: c if abs(c) >= 1e-6 else 0.0),
        min_size=4,
        max_size=4,
    ),
)


@settings(max_examples=40, deadline=None)
@given(**CASES)
def test_concatenated_factors_are_exactly_the_weighted_sum_in_any_order(
    seed: int, ranks: list[int], coefs: list[float]
) -> None:
    As, Bs = factors(seed, ranks)
    c = coefs[: len(ranks)]
    dense = sum(ci * b @ a for ci, a, b in zip(c, As, Bs, strict=True))
    A, B = concat_factors(As, Bs, c)
    assert A.shape[0] == sum(ranks)
    torch.testing.assert_close(B @ A, dense)
    A2, B2 = concat_factors(As[::-1], Bs[::-1], c[::-1])
    torch.testing.assert_close(B2 @ A2, dense)


@settings(max_examples=40, deadline=None)
@given(**CASES, keep=st.integers(1, 8))
def test_truncation_error_is_the_measured_error_and_zero_at_full_rank(
    seed: int, ranks: list[int], coefs: list[float], keep: int
) -> None:
    As, Bs = factors(seed, ranks)
    A, B = concat_factors(As, Bs, coefs[: len(ranks)])
    dense = B @ A
    Ak, Bk, err = truncate(A, B, keep)
    assert Ak.shape[0] <= keep
    norm = float(torch.linalg.norm(dense))
    measured = float(torch.linalg.norm(dense - Bk @ Ak)) / norm if norm else 0.0
    assert abs(err - measured) < 1e-9
    _, _, full = truncate(A, B, sum(ranks))
    assert full < 1e-12


@settings(max_examples=40, deadline=None)
@given(**CASES)
def test_factor_mean_error_is_the_measured_error(
    seed: int, ranks: list[int], coefs: list[float]
) -> None:
    As, Bs = factors(seed, ranks)
    w = [1 / len(ranks)] * len(ranks)
    c = [wi * abs(ci) for wi, ci in zip(w, coefs, strict=False)]
    exact, naive = concat_factors(As, Bs, c), factor_mean(As, Bs, c, w)
    dense, approx = exact[1] @ exact[0], naive[1] @ naive[0]
    norm = float(torch.linalg.norm(dense))
    measured = float(torch.linalg.norm(dense - approx)) / norm if norm else 0.0
    assert abs(relative_error(exact, naive) - measured) < 1e-9
