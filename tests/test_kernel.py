"""The numpy kernel gives torch's results: bf16 rounding bit for bit, fp16, float8, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelsoups.average import CHUNK, all_finite, weighted_sum, weighted_sum_arrays
from modelsoups.dtypes import DTYPES, as_dtype, to_numpy, to_torch


def _edge_floats() -> torch.Tensor:
    """Random values over the whole float32 range plus the awkward ones: subnormals (of
    float32 and of bf16), exact ties, values next to bf16's max and the rounding carries."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64)
    randoms = bits.to(torch.int32).view(torch.float32)
    randoms = randoms[torch.isfinite(randoms)]
    bf16_max = float(torch.finfo(torch.bfloat16).max)
    specials = [
        0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1e-40, 1.1754942e-38, 1.17549435e-38,
        bf16_max, -bf16_max, 3.3961776e38, 3.3961777e38, 3.39e38, 3.4028235e38, -3.4028235e38,
    ]  # fmt: skip
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x3F80_8001, 0x7F7F_8000,
                         0x0000_8000, 0x0001_8000, 0x8001_8000], dtype=torch.int64)  # fmt: skip
    ties_f = ties.to(torch.int32).view(torch.float32)
    return torch.cat([randoms, -randoms[:1000], torch.tensor(specials), ties_f])


def test_float32_to_bf16_rounds_exactly_like_torch() -> None:
    x = _edge_floats()
    bf16 = DTYPES["BF16"]
    ours, _ = weighted_sum_arrays([x.numpy()], [DTYPES["F32"]], [1.0], out_dtype=bf16)
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, want)


def test_float64_to_bf16_and_fp16_round_like_torch() -> None:
    x = _edge_floats().double() * 1.0000001
    for name in ("BF16", "F16"):
        dtype = DTYPES[name]
        acc = DTYPES["F64"]
        ours, _ = weighted_sum_arrays([x.numpy()], [acc], [1.0], accumulate=acc, out_dtype=dtype)
        want = to_numpy(x.to(dtype.to_torch()))
        assert np.array_equal(ours, want), name


def test_bf16_widens_exactly() -> None:
    bits = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.bfloat16)
    ours, _ = weighted_sum_arrays([to_numpy(x)], [DTYPES["BF16"]], [1.0])
    want = x.float().numpy()
    assert np.array_equal(ours, want, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float8_e4m3fn, torch.float8_e5m2])  # fmt: skip
@pytest.mark.parametrize("weights", [[1 / 3] * 3, [0.5, 0.3, 0.2]])
def test_weighted_sum_matches_torch_within_float32_rounding(
    dtype: torch.dtype, weights: list[float]
) -> None:
    """Spans several CHUNK slices and ends on a partial one; output in the input dtype.
    The reference is torch's float32 `mul_`/`add_(alpha=w)` (the kernel before numpy):
    fused or not, the two differ by at most one rounding in the output dtype."""
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(2 * CHUNK + 17, generator=g).to(dtype) for _ in range(3)]
    got = weighted_sum(ts, weights, out_dtype=dtype)
    assert got.dtype == dtype
    if weights[0] == weights[1] == weights[2]:  # summed first, scaled once
        acc = (ts[0].float() + ts[1].float() + ts[2].float()) * weights[0]
    else:
        acc = ts[0].float() * weights[0]
        for t, w in zip(ts[1:], weights[1:], strict=True):
            acc.add_(t.float(), alpha=w)
    want = acc.to(dtype)
    info = torch.finfo(dtype)
    step = float(info.smallest_normal) * float(info.eps)  # spacing of subnormals
    scale = sum(abs(w) * t.double().abs() for w, t in zip(weights, ts, strict=True))
    assert isinstance(scale, torch.Tensor)  # cancellation: the error scales with Σ|wᵢtᵢ|
    bound = 2 * info.eps * scale + step  # two roundings per add where torch fuses them
    assert bool(((got.double() - want.double()).abs() <= bound).all())
    if dtype == torch.float32 and weights[0] == weights[1]:
        assert torch.equal(got, (ts[0] + ts[1] + ts[2]) * weights[0])


def test_uniform_float32_sum_is_bit_identical_to_adding_in_order() -> None:
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(1000, generator=g) for _ in range(5)]
    want = ts[0].clone()
    for t in ts[1:]:
        want.add_(t)
    want.mul_(1 / 5)
    assert torch.equal(weighted_sum(ts, [1 / 5] * 5), want)


def test_finiteness_is_reported_per_dtype() -> None:
    for name in ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F64"):
        dtype = DTYPES[name]
        t = torch.zeros(CHUNK + 3).to(dtype.to_torch())
        assert all_finite(to_numpy(t), dtype)
        t[CHUNK + 1] = float("nan")
        assert not all_finite(to_numpy(t), dtype), name
    big = torch.full((CHUNK,), 3e38)  # the sum overflows, every term is finite
    assert all_finite(big.numpy(), DTYPES["F32"])


def test_tensors_cross_to_numpy_and_back_without_copies() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float8_e5m2, torch.int64, torch.bool):
        t = torch.ones(4, 3).to(dtype)[:, 1]  # a strided view
        a = to_numpy(t)
        assert a.dtype == as_dtype(dtype).numpy
        assert a.__array_interface__["data"][0] == t.data_ptr()
        back = to_torch(a, as_dtype(dtype))
        assert back.dtype == dtype and back.data_ptr() == t.data_ptr()
        assert torch.equal(back, t)
