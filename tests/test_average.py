"""The weighted mean: equal to a float64 reference, order-free, exact on identical inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, reference_mean, tiny_state_dict
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsoups import IncompatibleError, NonFiniteError, SoupError
from modelsoups.average import load_soup, uniform_state_dict, weighted_state_dict

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_close_to(sd: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    for k, v in ref.items():
        got = sd[k]
        if v.is_floating_point():
            # within the output dtype's rounding of the float64 reference
            eps = torch.finfo(got.dtype).eps
            torch.testing.assert_close(got.double(), v, rtol=2 * eps, atol=2 * eps)
        else:
            assert torch.equal(got, v), k


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_uniform_soup_matches_float64_reference_within_output_rounding(dtype: torch.dtype) -> None:
    sds = [
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny_state_dict(i).items()}
        for i in range(5)
    ]
    soup = uniform_state_dict(sds)
    assert all(soup[k].dtype == v.dtype for k, v in sds[0].items())
    _assert_close_to(soup, reference_mean(sds))


def test_weighted_soup_matches_float64_reference() -> None:
    sds = [tiny_state_dict(i) for i in range(3)]
    soup = weighted_state_dict(sds, [0.5, 0.3, 0.2])
    _assert_close_to(soup, reference_mean(sds, [0.5, 0.3, 0.2]))


def test_weights_are_normalised_unless_told_not_to() -> None:
    sds = [tiny_state_dict(i) for i in range(2)]
    a = weighted_state_dict(sds, [2.0, 2.0])
    b = uniform_state_dict(sds)
    raw = weighted_state_dict(sds, [1.0, 1.0], normalize=False)
    torch.testing.assert_close(a["fc.weight"], b["fc.weight"])
    torch.testing.assert_close(raw["fc.weight"], sds[0]["fc.weight"] + sds[1]["fc.weight"])


def test_float64_accumulation_is_available() -> None:
    sds = [tiny_state_dict(i) for i in range(3)]
    soup = uniform_state_dict(sds, accumulate="float64", dtype=torch.float64)
    ref = reference_mean(sds)
    torch.testing.assert_close(soup["fc.weight"], ref["fc.weight"], rtol=1e-15, atol=1e-15)


def test_integer_buffers_are_copied_not_averaged() -> None:
    sds = [tiny_state_dict(i) for i in range(3)]
    soup = uniform_state_dict(sds)
    assert soup["bn.num_batches_tracked"].dtype == torch.int64
    assert int(soup["bn.num_batches_tracked"]) == 10


def test_differing_integer_buffers_are_refused_unless_first_is_asked_for() -> None:
    sds = [tiny_state_dict(i) for i in range(2)]
    sds[1]["bn.num_batches_tracked"] = torch.tensor(99)
    with pytest.raises(IncompatibleError, match="num_batches_tracked"):
        uniform_state_dict(sds)
    assert int(uniform_state_dict(sds, non_float="first")["bn.num_batches_tracked"]) == 10


def test_tied_weights_stay_tied_in_the_soup() -> None:
    soup = uniform_state_dict([TinyNet(), TinyNet()])
    assert soup["embed.weight"] is soup["decoder.weight"]


def test_nan_weights_are_refused_naming_the_ingredient_and_tensor() -> None:
    sds = [tiny_state_dict(i) for i in range(3)]
    sds[2]["fc.bias"][0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"state dict 2.*fc\.bias"):
        uniform_state_dict(sds)
    assert torch.isnan(uniform_state_dict(sds, allow_nonfinite=True)["fc.bias"][0])


def test_shape_mismatch_names_the_tensor() -> None:
    sds = [tiny_state_dict(i) for i in range(2)]
    sds[1]["fc.weight"] = torch.zeros(5, 5)
    with pytest.raises(IncompatibleError, match=r"fc\.weight.*\[5, 5\]"):
        uniform_state_dict(sds)


@pytest.mark.parametrize(
    ("weights", "message"),
    [([1.0], "1 weights for 2"), ([1.0, -1.0], "negative"), ([0.0, 0.0], "sum to 0")],
)
def test_bad_weights_are_refused(weights: list[float], message: str) -> None:
    with pytest.raises(SoupError, match=message):
        weighted_state_dict([tiny_state_dict(0), tiny_state_dict(1)], weights)


def test_soup_loads_into_a_module() -> None:
    model = load_soup(TinyNet(), uniform_state_dict([tiny_state_dict(0), tiny_state_dict(1)]))
    assert model(torch.zeros(1, 3, 5, 5)).shape == (1, 7)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 100))
def test_soup_of_identical_checkpoints_is_that_checkpoint(n: int, seed: int) -> None:
    sd = tiny_state_dict(seed)
    soup = uniform_state_dict([sd] * n)
    for k, v in sd.items():
        torch.testing.assert_close(soup[k], v, rtol=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(perm=st.permutations(range(4)))
def test_input_order_does_not_change_the_soup(perm: list[int]) -> None:
    sds = [tiny_state_dict(i) for i in range(4)]
    a = uniform_state_dict(sds)
    b = uniform_state_dict([sds[i] for i in perm])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 5), first=st.integers(0, 4))
def test_one_hot_weights_give_that_input(n: int, first: int) -> None:
    first %= n
    sds = [tiny_state_dict(i) for i in range(n)]
    weights = [1.0 if i == first else 0.0 for i in range(n)]
    soup = weighted_state_dict(sds, weights)
    for k, v in sds[first].items():
        if v.is_floating_point():
            assert torch.equal(soup[k], v), k
