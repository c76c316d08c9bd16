"""Similarity: same-base fine-tunes look alike, different initialisations are flagged."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import save_as, tiny_state_dict
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from modelsoups import inspect_checkpoints, uniform
from modelsoups.cli import main
from modelsoups.io import MemoryCheckpoint
from modelsoups.similarity import (
    SAME_INIT_THRESHOLD,
    init_warning,
    sample_vector,
    similarity_report,
)


def _mem(*sds):
    return [MemoryCheckpoint(sd, f"<state dict {i}>") for i, sd in enumerate(sds)]


def test_same_base_finetunes_are_similar_and_not_flagged() -> None:
    r = similarity_report(_mem(*(tiny_state_dict(i) for i in range(3))))
    assert min(min(row) for row in r.cosine) > 0.9
    assert r.warning is None


def test_different_initialisations_are_flagged_by_name() -> None:
    ckpts = _mem(tiny_state_dict(0), tiny_state_dict(1), tiny_state_dict(2, base_seed=5))
    w = init_warning(ckpts)
    assert w is not None and "different initialisations" in w and "<state dict 2>" in w


def test_greedy_warns_about_different_initialisations() -> None:
    from modelsoups import greedy_soup

    r = greedy_soup([tiny_state_dict(0), tiny_state_dict(1, base_seed=4)], lambda sd: 1.0)
    assert any("different initialisations" in w for w in r.warnings)
    assert not greedy_soup([tiny_state_dict(0), tiny_state_dict(1)], lambda sd: 1.0).warnings


def test_tensor_order_does_not_matter() -> None:
    sd = tiny_state_dict(0)
    backwards = dict(reversed(list(tiny_state_dict(1).items())))
    r = similarity_report(_mem(sd, backwards))
    assert r.cosine[0][1] > 0.9 and r.warning is None


def test_delta_cosine_from_a_base() -> None:
    base = tiny_state_dict(0, noise=0.0)
    ft = tiny_state_dict(1)
    r = similarity_report(_mem(ft, ft), base=MemoryCheckpoint(base, "<state dict 9>"))
    assert r.delta_cosine is not None
    assert r.delta_cosine[0][1] == 1.0


def test_sample_reads_a_fixed_block_per_tensor() -> None:
    sd = tiny_state_dict(0)
    v = sample_vector(MemoryCheckpoint(sd), per_tensor=4)
    floats = [t for t in sd.values() if t.is_floating_point()]
    assert v.size == sum(min(4, t.numel()) for t in floats)


def test_inspect_and_uniform_report_it(tmp_path: Path, capsys) -> None:
    a = save_as(tiny_state_dict(0), tmp_path / "a", "safetensors")
    b = save_as(tiny_state_dict(1, base_seed=3), tmp_path / "b", "safetensors")
    report = inspect_checkpoints([a, b])
    assert report.extra["similarity"].warning is not None
    result = uniform([a, b], tmp_path / "u.safetensors")
    assert any("different initialisations" in w for w in result.warnings)
    assert main(["inspect", str(a), str(b), "--base", str(a)]) == 0
    captured = capsys.readouterr()
    assert "cosine similarity of weights" in captured.out
    assert "deltas from the base" in captured.out
    assert "different initialisations" in captured.err


def test_undefined_cosine_is_nan_and_not_flagged() -> None:
    """An all-zero or non-finite sample has no direction: its cosine is undefined (NaN),
    which says nothing about the initialisation and must not raise the warning."""
    import math

    zero = {k: torch.zeros_like(v) if v.is_floating_point() else v
            for k, v in tiny_state_dict(0).items()}  # fmt: skip
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
           for k, v in tiny_state_dict(0).items()}  # fmt: skip
    for odd in (zero, nan):
        r = similarity_report(_mem(tiny_state_dict(1), odd))
        assert math.isnan(r.cosine[0][1]) and r.warning is None
    base = MemoryCheckpoint(tiny_state_dict(1), "<state dict 9>")
    same = similarity_report(_mem(tiny_state_dict(1), tiny_state_dict(1)), base=base)
    assert same.delta_cosine is not None and math.isnan(same.delta_cosine[0][1])


def _ingredients(groups: list[int], noise: list[float], seed: int) -> list[MemoryCheckpoint]:
    """Ingredients from a few initialisations (`groups[i]`: the init of ingredient i), each
    its init plus `noise[i]` times a random direction."""
    g = torch.Generator().manual_seed(seed)
    inits = {k: {"w": torch.randn(40, 3, generator=g), "b": torch.randn(7, generator=g)}
             for k in set(groups)}  # fmt: skip
    sds = [{name: t + s * torch.randn(t.shape, generator=g) for name, t in inits[k].items()}
           for k, s in zip(groups, noise, strict=True)]  # fmt: skip
    return _mem(*sds)


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(st.integers(0, 2), min_size=2, max_size=9),
    noise=st.lists(st.floats(0.0, 2.5), min_size=9, max_size=9),
    seed=st.integers(0, 10**6),
)
def test_init_warning_agrees_with_comparing_every_pair(
    groups: list[int], noise: list[float], seed: int
) -> None:
    """Comparing each ingredient with the others only when it lies far from their mean
    direction answers exactly what the all-pairs matrix answers."""
    ckpts = _ingredients(groups, noise[: len(groups)], seed)
    report = similarity_report(ckpts, per_tensor=32)
    pairs = [c for i, row in enumerate(report.cosine) for c in row[i + 1 :]]
    assume(all(abs(c - SAME_INIT_THRESHOLD) > 1e-5 for c in pairs))  # rounding at the edge
    warning = init_warning(ckpts)
    assert (warning is None) == (report.warning is None)
    if warning is not None:  # the pair it names is below the threshold
        named = [i for i, c in enumerate(ckpts) if f"{c.path} " in warning]
        assert len(named) == 2 and report.cosine[named[0]][named[1]] < SAME_INIT_THRESHOLD


def test_init_warning_names_the_outlier_among_many() -> None:
    """300 fine-tunes of one base and one of another: the odd one is named."""
    ckpts = _ingredients([0] * 150 + [1] + [0] * 150, [0.3] * 301, seed=3)
    warning = init_warning(ckpts)
    assert warning is not None and "<state dict 150>" in warning
    assert init_warning(ckpts[:150] + ckpts[151:]) is None


class _Counting(MemoryCheckpoint):
    """A checkpoint that counts the tensors read from it."""

    def __init__(self, sd: dict[str, torch.Tensor], label: str) -> None:
        super().__init__(sd, label)
        self.reads = 0

    def array(self, name: str):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().array(name)


def test_the_pairwise_matrix_reads_each_ingredient_once() -> None:
    """`soup inspect`'s N×N matrix compares samples: each ingredient (and the base) has
    each floating tensor read once, whatever N, not once per pair."""
    base = _Counting(tiny_state_dict(0, noise=0.0), "<base>")
    ckpts = [_Counting(tiny_state_dict(i), f"<ft {i}>") for i in range(12)]
    floats = sum(1 for i in base.infos.values() if i.is_float and i.numel)
    r = similarity_report(ckpts, base=base)
    assert len(r.cosine) == 12 and r.delta_cosine is not None and len(r.delta_cosine) == 12
    assert [c.reads for c in [base, *ckpts]] == [floats] * 13
