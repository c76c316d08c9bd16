"""Greedy soup: same choices as a straightforward re-implementation, ties, resume, history."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_state_dict
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsoups import greedy_soup, uniform_state_dict
from modelsoups.errors import EvaluationError, SoupError
from modelsoups.evaluate import FunctionEvaluator

KEYS = ("fc.weight", "conv.weight")


def make_score(target: dict[str, torch.Tensor], decimals: int = 4):
    """Held-out 'accuracy': closeness to a target, rounded so that ties can happen."""

    def score(sd: dict[str, torch.Tensor]) -> float:
        d = sum(float((sd[k].double() - target[k].double()).pow(2).sum()) for k in KEYS)
        return round(-d * 1e4, decimals)

    return score


def reference_greedy(sds, score, accept="ge"):
    """Recipe 1 written plainly: re-average from scratch for every candidate."""
    scores = [score(sd) for sd in sds]
    order = sorted(range(len(sds)), key=lambda i: -scores[i])
    soup, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        s = score(uniform_state_dict([sds[j] for j in [*soup, i]]))
        if s >= best if accept == "ge" else s > best:
            soup.append(i)
            best = s
    return soup, best


def ingredients(seed: int, n: int = 6) -> tuple[list[dict], dict]:
    sds = [tiny_state_dict(seed * 10 + i, noise=0.01 * (1 + i % 3)) for i in range(n)]
    target = tiny_state_dict(999, noise=0.0)  # the shared base: averaging helps
    return sds, target


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("accept", ["ge", "gt"])
def test_greedy_matches_straightforward_implementation(seed: int, accept: str) -> None:
    sds, target = ingredients(seed)
    score = make_score(target, decimals=2)
    result = greedy_soup(sds, score, accept=accept)
    soup, best = reference_greedy(sds, score, accept)
    assert result.selected == [f"ingredient_{i}" for i in soup]
    assert result.score == pytest.approx(best)
    expected = uniform_state_dict([sds[i] for i in soup])
    for k, v in result.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)


def test_ge_keeps_ties_and_gt_drops_them() -> None:
    sds, _ = ingredients(0, n=3)
    sds.append({k: v.clone() for k, v in sds[0].items()})  # a duplicate of the best
    score = make_score(sds[0])  # ingredient_0 is the target: the pair ties exactly
    ge = greedy_soup(sds, score, accept="ge")
    gt = greedy_soup(sds, score, accept="gt")
    assert ge.selected == ["ingredient_0", "ingredient_3"]
    assert gt.selected == ["ingredient_0"]
    for r in (ge, gt):  # the two differ exactly at the tie, nowhere else
        steps = {x["model_name"]: x["accepted"] for x in r.history if x["kind"] == "greedy"}
        assert steps["ingredient_1"] is False and steps["ingredient_2"] is False
    assert reference_greedy(sds, score, "ge")[0] == [0, 3]
    assert reference_greedy(sds, score, "gt")[0] == [0]


def test_tolerance_accepts_small_drops() -> None:
    sds, _ = ingredients(0, n=3)
    score = make_score(sds[0])
    strict = greedy_soup(sds, score)
    loose = greedy_soup(sds, score, tolerance=1e9)
    assert strict.selected == ["ingredient_0"]
    assert len(loose.selected) == 3


@settings(max_examples=15, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 50), min_size=2, max_size=5, unique=True),
    accept=st.sampled_from(["ge", "gt"]),
)
def test_held_out_score_never_decreases_and_weights_sum_to_one(seeds, accept) -> None:
    sds = [tiny_state_dict(s, noise=0.02) for s in seeds]
    r = greedy_soup(sds, make_score(tiny_state_dict(0, noise=0.0), decimals=1), accept=accept)
    accepted = [x["held_out"] for x in r.history if x.get("kind") == "greedy" and x["accepted"]]
    assert accepted == sorted(accepted)
    assert sum(r.weights) == pytest.approx(1.0)
    assert [x["soup_size"] for x in r.history if x.get("kind") == "greedy"][-1] == len(r.selected)


def test_history_has_official_shape(tmp_path: Path) -> None:
    sds, target = ingredients(0, n=3)
    score = make_score(target)
    hist = tmp_path / "h.jsonl"
    r = greedy_soup(sds, lambda sd: {"score": score(sd), "loss": 1.0}, history=str(hist),
                    dataset="val")  # fmt: skip
    lines = [json.loads(x) for x in hist.read_text().splitlines()]
    assert lines == r.history
    step = next(x for x in lines if x["kind"] == "greedy" and x["soup_size"] > 0 and "loss" in x)
    assert {"model_name", "val", "loss", "accepted", "soup_size"} <= set(step)


class Crashing:
    """Evaluates like `score`, but raises after `budget` calls (a simulated crash)."""

    def __init__(self, score, budget: int = 10**9) -> None:
        self.score, self.budget, self.calls = score, budget, 0

    def __call__(self, sd):
        self.calls += 1
        if self.calls > self.budget:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.score(sd)


@pytest.mark.parametrize("budget", [2, 7, 8])
def test_resume_after_crash_gives_same_result(tmp_path: Path, budget: int) -> None:
    sds, target = ingredients(1)
    score = make_score(target, decimals=2)
    full = greedy_soup(sds, score)
    hist = tmp_path / "h.jsonl"
    with pytest.raises(EvaluationError, match="CUDA out of memory"):
        greedy_soup(sds, Crashing(score, budget), history=str(hist))
    kept = hist.read_text().splitlines()
    assert len(kept) >= budget - 1  # everything scored before the crash is logged
    again = Crashing(score)
    resumed = greedy_soup(sds, again, history=str(hist), resume=True)
    assert resumed.selected == full.selected
    assert resumed.score == full.score
    evaluated = len(kept) - (len(kept) > len(sds))  # the first soup step costs nothing
    assert again.calls == len(sds) + (len(sds) - 1) - evaluated  # nothing re-evaluated


def test_torn_history_line_is_redone(tmp_path: Path) -> None:
    sds, target = ingredients(2, n=4)
    score = make_score(target)
    hist = tmp_path / "h.jsonl"
    full = greedy_soup(sds, score, history=str(hist))
    hist.write_text(hist.read_text()[:-7])  # crash mid-write
    resumed = greedy_soup(sds, score, history=str(hist), resume=True)
    assert resumed.selected == full.selected and resumed.history == full.history


def test_resume_with_other_ingredients_is_an_error(tmp_path: Path) -> None:
    sds, target = ingredients(0, n=4)
    score = make_score(target)
    hist = str(tmp_path / "h.jsonl")
    greedy_soup(sds, score, history=hist)
    with pytest.raises(SoupError, match="changed"):
        greedy_soup(sds, score, history=hist, resume=True, dataset="val")
    with pytest.raises(SoupError, match="changed"):
        greedy_soup(sds[:1] + sds[2:], score, history=hist, resume=True,
                    names=["ingredient_0", "ingredient_2", "ingredient_3"])  # fmt: skip


def test_resume_refuses_a_history_scored_by_another_scorer(tmp_path: Path) -> None:
    sds, target = ingredients(3, n=4)
    score = make_score(target, decimals=2)
    hist, loss = tmp_path / "h.jsonl", {"metric": "lm-loss", "data": "val.jsonl"}
    with pytest.raises(EvaluationError):
        greedy_soup(sds, Crashing(score, 5), history=str(hist), scorer=loss)
    logged = hist.read_bytes()
    assert all(json.loads(x)["scorer"] == loss for x in logged.splitlines())
    for other in ({**loss, "metric": "lm-choice"}, {**loss, "data": "test.jsonl"}, {"eval": "x"}):
        with pytest.raises(SoupError, match="was scored by") as e:
            greedy_soup(sds, Crashing(score), history=str(hist), resume=True, scorer=other)
        changed = [k for k in {*loss, *other} if loss.get(k) != other.get(k)]
        assert all(f"{k}={loss.get(k)!r}" in str(e.value) for k in changed), e.value
        assert all(f"{k}={other.get(k)!r}" in str(e.value) for k in changed), e.value
        assert hist.read_bytes() == logged
    again = Crashing(score)
    resumed = greedy_soup(sds, again, history=str(hist), resume=True, scorer=dict(loss))
    assert resumed.selected == greedy_soup(sds, score).selected
    assert again.calls == 7 - 5  # the logged scores were used


def test_a_history_without_a_scorer_resumes_and_records_it(tmp_path: Path) -> None:
    sds, target = ingredients(4, n=4)
    score = make_score(target, decimals=2)
    hist, spec = tmp_path / "h.jsonl", {"eval": "python ev.py {ckpt}"}
    with pytest.raises(EvaluationError):  # as older versions logged it: no scorer field
        greedy_soup(sds, Crashing(score, 5), history=str(hist))
    old = hist.read_text().splitlines()
    assert len(old) == 6 and not any("scorer" in json.loads(x) for x in old)
    resumed = greedy_soup(sds, score, history=str(hist), resume=True, scorer=spec)
    assert resumed.selected == greedy_soup(sds, score).selected
    lines = hist.read_text().splitlines()
    assert lines[:6] == old and all(json.loads(x)["scorer"] == spec for x in lines[6:])
    assert len(lines) == 6 + 2  # the two steps not logged before
    with pytest.raises(SoupError, match=r"eval='python ev.py \{ckpt\}'"):
        greedy_soup(sds, score, history=str(hist), resume=True, scorer={"eval": "other"})


def test_existing_history_without_resume_is_an_error(tmp_path: Path) -> None:
    hist = tmp_path / "h.jsonl"
    hist.write_text("")
    with pytest.raises(SoupError, match="--resume"):
        greedy_soup([tiny_state_dict(0)], lambda sd: 1.0, history=str(hist))


def test_given_scores_skip_individual_evaluations() -> None:
    sds, target = ingredients(0, n=4)
    score = make_score(target)
    given = {f"ingredient_{i}": score(sd) for i, sd in enumerate(sds)}
    ev = Crashing(score)
    r = greedy_soup(sds, ev, scores=given)
    assert ev.calls == len(sds) - 1
    assert r.selected == greedy_soup(sds, score).selected
    with pytest.raises(SoupError, match="unknown"):
        greedy_soup(sds, score, scores={"nope": 1.0})


def test_test_evaluator_is_reported_not_used_to_choose() -> None:
    sds, target = ingredients(0, n=4)
    score = make_score(target)
    r = greedy_soup(sds, score, test_evaluator=FunctionEvaluator(lambda sd: 0.5))
    assert r.test is not None and r.test.score == 0.5
    assert r.selected == greedy_soup(sds, score).selected


def test_inputs_are_not_modified() -> None:
    sds, target = ingredients(0, n=3)
    before = [{k: v.clone() for k, v in sd.items()} for sd in sds]
    greedy_soup(sds, make_score(target))
    for a, b in zip(sds, before, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_bad_accept_is_an_error() -> None:
    with pytest.raises(SoupError, match="accept"):
        greedy_soup([tiny_state_dict(0)], lambda sd: 1.0, accept="maybe")


class CountingDict(dict):
    """A state dict that counts how often each tensor is read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: dict[str, int] = {}

    def __getitem__(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().__getitem__(key)


@pytest.mark.parametrize("n", [3, 8])
def test_candidates_are_incremental_not_re_averaged(n: int) -> None:
    sds = [CountingDict(tiny_state_dict(i)) for i in range(n)]
    r = greedy_soup(sds, lambda sd: 0.0)  # every candidate ties: all are accepted
    assert len(r.selected) == n
    # each ingredient's tensor is read a fixed number of times whatever the soup size:
    # its own score, the similarity sample, the candidate (or the first soup); accepting a
    # candidate keeps its sum instead of adding the ingredient again
    assert max(max(sd.reads.values()) for sd in sds) <= 3


def test_candidates_reuse_buffers_and_the_result_owns_its_tensors() -> None:
    sds = [tiny_state_dict(i) for i in range(4)]
    seen: list[int] = []

    def score(sd: dict[str, torch.Tensor]) -> float:
        seen.append(sd["fc.weight"].data_ptr())
        return 0.0  # every candidate ties: all are accepted

    r = greedy_soup(sds, score)
    candidates = seen[len(sds) :]  # after each ingredient's own score
    assert len(candidates) == 3 and len(set(candidates)) == 1  # no fresh memory per step
    soup = r.state_dict()
    assert soup["fc.weight"].data_ptr() not in candidates
    torch.testing.assert_close(soup["fc.weight"], uniform_state_dict(sds)["fc.weight"])


def test_cli_greedy_warns_about_different_initialisations_once(tmp_path: Path, capsys) -> None:
    """Selection and the final write both check the initialisation: one warning, not two."""
    from conftest import save_as

    from modelsoups.cli import main

    a = save_as(tiny_state_dict(0), tmp_path / "a", "safetensors")
    b = save_as(tiny_state_dict(1, base_seed=4), tmp_path / "b", "safetensors")
    script = tmp_path / "ev.py"
    script.write_text("print(1.0)")  # every candidate ties: both are kept ('ge')
    out = tmp_path / "soup.safetensors"
    cmd = f"{sys.executable} {script} {{ckpt}}"
    assert main(["greedy", str(a), str(b), "-o", str(out), "--eval", cmd, "-q"]) == 0
    assert capsys.readouterr().err.count("different initialisations") == 1
    report = json.loads((tmp_path / "soup.report.json").read_text())
    assert sum("different initialisations" in w for w in report["warnings"]) == 1


def test_equal_scores_keep_input_order_unlike_the_paper_code() -> None:
    """Two ingredients score the same alone and worse together: the one listed first is
    the soup. The paper's code (`sorted` by score, then `reverse`) would start from the
    later-listed one, so the two orders give different soups."""
    a, b = tiny_state_dict(1), tiny_state_dict(2)

    def score(sd: dict[str, torch.Tensor]) -> float:  # 0 on either ingredient, < 0 between
        return -min(float((sd["fc.weight"] - x["fc.weight"]).abs().max()) for x in (a, b))

    assert greedy_soup([a, b], score, names=["a", "b"]).selected == ["a"]
    assert greedy_soup([b, a], score, names=["b", "a"]).selected == ["b"]
    scores = {"a": score(a), "b": score(b)}
    assert scores["a"] == scores["b"]
    paper = [name for name, _ in sorted(scores.items(), key=lambda x: x[1])]
    paper.reverse()  # model-soups/main.py's greedy order
    assert paper[0] == "b"
