"""How close a soup is to the exact weighted mean (docs/guarantees.md, "Rounding").

float32 accumulation (the default) is within (N + 1)·2⁻²⁴·Σ|wᵢ·xᵢ| of the exact mean of
the inputs with the given weights: one ulp or less where the terms agree in sign, more ulps
of a result that cancels towards zero. float64 accumulation of fp32 inputs is the exact
mean rounded once to float32 (checked here where the float64 sum is exact: N a power of
two, magnitudes within 2⁻²⁰..2²⁰). References are exact rationals (`fractions.Fraction`).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsoups.average import weighted_state_dict

F32_TINY = Fraction(2) ** -149  # the smallest float32 step (subnormal)


def round_to_f32(q: Fraction) -> np.float32:
    """`q` rounded once to the nearest float32, ties to even."""
    guess = np.float32(float(q))  # float() is correctly rounded; to float32 may round twice
    best = None
    for c in (
        np.nextafter(guess, np.float32(-np.inf)),
        guess,
        np.nextafter(guess, np.float32(np.inf)),
    ):
        d = abs(Fraction(float(c)) - q)
        even = int(np.array(c).view(np.uint32)) % 2 == 0
        if best is None or d < best[0] or (d == best[0] and even):
            best = (d, c)
    assert best is not None
    return best[1]


def soup(columns: list[list[float]], weights: list[float], accumulate: str) -> np.ndarray:
    sds = [{"w": torch.tensor(c, dtype=torch.float32)} for c in columns]
    out = weighted_state_dict(sds, weights, normalize=False, accumulate=accumulate)
    return out["w"].numpy()


finite32 = st.floats(-(2.0**100), 2.0**100, width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(2, 16),
    size=st.integers(1, 8),
    uniform=st.booleans(),
)
def test_float32_accumulation_is_within_the_stated_bound(
    data: st.DataObject, n: int, size: int, uniform: bool
) -> None:
    columns = [data.draw(st.lists(finite32, min_size=size, max_size=size)) for _ in range(n)]
    if uniform:
        weights = [1.0 / n] * n
    else:
        raw = data.draw(st.lists(st.floats(0.01, 1.0), min_size=n, max_size=n))
        weights = [w / sum(raw) for w in raw]
    got = soup(columns, weights, "float32")
    for j in range(size):
        terms = [Fraction(w) * Fraction(float(c[j])) for w, c in zip(weights, columns, strict=True)]
        exact, magnitude = sum(terms, Fraction(0)), sum(abs(t) for t in terms)
        bound = (n + 1) * Fraction(2) ** -24 * magnitude + (n + 1) * F32_TINY
        assert abs(Fraction(float(got[j])) - exact) <= bound


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    log_n=st.integers(1, 4),
    size=st.integers(1, 8),
)
def test_float64_accumulation_is_the_exact_mean_rounded_once(
    data: st.DataObject, log_n: int, size: int
) -> None:
    n = 2**log_n
    magnitude = st.floats(2.0**-20, 2.0**20, width=32)
    value = st.builds(lambda m, s: m if s else -m, magnitude, st.booleans())
    columns = [data.draw(st.lists(value, min_size=size, max_size=size)) for _ in range(n)]
    got = soup(columns, [1.0 / n] * n, "float64")
    for j in range(size):
        exact = sum((Fraction(float(c[j])) for c in columns), Fraction(0)) / n
        assert got[j] == round_to_f32(exact)
