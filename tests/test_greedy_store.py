"""Greedy soup beyond RAM: the streamed store equals the in-memory one bit for bit (their
candidates as tensors, as arrays and as the scratch files an eval command reads), the
memory budget picks between them, non-finite candidates are refused, `soup greedy
--memory/--workdir`."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import save_as, tiny_state_dict
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsoups import greedy_soup
from modelsoups.average import CHUNK
from modelsoups.candidate import write_candidate
from modelsoups.cli import main
from modelsoups.errors import NonFiniteError, SoupError
from modelsoups.evaluate import Score
from modelsoups.io.base import Checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


class Recording:
    """A held-out score (rounded, so that ties happen) that keeps a copy of every candidate
    as `get` gives it (float32 for a soup), as `array` does (the declared dtype) and as a
    command evaluator's scratch file holds it (written in parts, `scratch=True`), after
    checking that file byte for byte against the durable writer's."""

    def __init__(self, target: dict[str, torch.Tensor]) -> None:
        self.target, self.seen = target, []

    def evaluate(self, candidate: Checkpoint, *, name: str) -> Score:
        sd = {k: candidate.get(k).clone() for k in candidate.infos}
        arrays = {k: torch.from_numpy(candidate.array(k).copy()) for k in candidate.infos}
        with tempfile.TemporaryDirectory() as d:
            scratch, durable = Path(d) / "scratch.safetensors", Path(d) / "durable.safetensors"
            write_candidate(candidate, scratch, scratch=True)
            write_candidate(candidate, durable)
            assert scratch.read_bytes() == durable.read_bytes()
            written = safetensors.torch.load(scratch.read_bytes())
        self.seen += [sd, arrays, written]
        t = self.target
        return Score(
            round(-sum(float((sd[k].double() - t[k].double()).pow(2).sum()) for k in t), 1)
        )


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


@settings(max_examples=12, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 40), min_size=2, max_size=5, unique=True),
    dtype=st.sampled_from(sorted(DTYPES)),
    accept=st.sampled_from(["ge", "gt"]),
)
def test_streamed_and_in_memory_choose_the_same_soup_bit_for_bit(seeds, dtype, accept) -> None:
    sds = [cast(tiny_state_dict(s, noise=0.02), DTYPES[dtype]) for s in seeds]
    target = {k: v for k, v in tiny_state_dict(0, noise=0.0).items() if v.is_floating_point()}
    runs = []
    for memory in (2**40, 0):
        ev = Recording(target)
        r = greedy_soup(sds, ev, accept=accept, memory=memory)
        runs.append((r, ev.seen, r.state_dict()))
    (mem, mem_seen, mem_soup), (streamed, streamed_seen, streamed_soup) = runs
    assert (mem.store, streamed.store) == ("memory", "streamed")
    assert streamed.selected == mem.selected and streamed.history == mem.history
    assert len(streamed_seen) == len(mem_seen)
    assert all(same(a, b) for a, b in zip(mem_seen, streamed_seen, strict=True))
    assert same(mem_soup, streamed_soup)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_stores_agree_on_tensors_split_across_threads(dtype: str) -> None:
    """A tensor of over two slices (`CHUNK`) is computed, rounded and written by two
    threads, each writing its own parts of the scratch file."""
    g = torch.Generator().manual_seed(0)
    sds = [{"big": torch.randn(3 * CHUNK + 5, generator=g).to(DTYPES[dtype]),
            "steps": torch.tensor(7)} for _ in range(4)]  # fmt: skip
    target = {"big": sds[0]["big"].float()}
    runs = []
    for memory in (2**40, 0):
        ev = Recording(target)
        runs.append((greedy_soup(sds, ev, memory=memory), ev.seen))
    assert runs[0][0].selected == runs[1][0].selected
    assert all(same(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    assert same(runs[0][0].state_dict(), runs[1][0].state_dict())


def test_memory_budget_picks_the_store_and_is_checked() -> None:
    sds = [tiny_state_dict(i) for i in range(3)]
    need = greedy_soup(sds, lambda sd: 0.0).in_memory_bytes
    floats = sum(v.numel() for v in sds[0].values() if v.is_floating_point())
    assert need == 12 * floats + sum(
        v.numel() * v.element_size() for v in sds[0].values() if not v.is_floating_point()
    )
    assert greedy_soup(sds, lambda sd: 0.0, memory=need).store == "memory"
    assert greedy_soup(sds, lambda sd: 0.0, memory=need - 1).store == "streamed"
    for bad in (-1, True, 1.5, "2GiB"):
        with pytest.raises(SoupError, match="memory must be"):
            greedy_soup(sds, lambda sd: 0.0, memory=bad)  # type: ignore[arg-type]


def test_streamed_soup_reads_its_inputs_until_closed(tmp_path: Path) -> None:
    sds = [tiny_state_dict(i) for i in range(3)]
    paths = [save_as(sd, tmp_path / f"run{i}", "safetensors") for i, sd in enumerate(sds)]
    r = greedy_soup(paths, lambda sd: 0.0, memory=0)  # every candidate ties: all kept
    assert r.store == "streamed" and len(r.selected) == 3
    assert same(r.state_dict(), greedy_soup(sds, lambda sd: 0.0).state_dict())
    r.soup.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.soup.get("fc.weight")


@pytest.mark.parametrize("memory", [2**40, 0], ids=["memory", "streamed"])
def test_nan_ingredient_is_refused_by_name(memory: int) -> None:
    sds = [tiny_state_dict(i) for i in range(3)]
    sds[2]["fc.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"<state dict 2>.*'fc.weight'.*NaN"):
        greedy_soup(sds, lambda sd: 0.0, memory=memory)
    r = greedy_soup(sds, lambda sd: 0.0, memory=memory, allow_nonfinite=True)
    assert torch.isnan(r.state_dict()["fc.weight"][0, 0])


@pytest.mark.parametrize("memory", [2**40, 0], ids=["memory", "streamed"])
def test_float16_overflow_of_a_candidate_is_refused(memory: int) -> None:
    """An fp16 best ingredient and an fp32 one: their mean does not fit in float16."""
    first = {"w": torch.full((4,), 60000.0, dtype=torch.float16)}
    second = {"w": torch.full((4,), 80000.0)}
    score = lambda sd: -abs(float(sd["w"].float().mean()) - 60000.0)  # noqa: E731
    with pytest.raises(NonFiniteError, match="overflows float16"):
        greedy_soup([first, second], score, memory=memory)


def test_cli_streams_with_memory_0_and_writes_candidates_in_workdir(tmp_path: Path) -> None:
    paths = [save_as(tiny_state_dict(i), tmp_path / f"run{i}", "safetensors") for i in range(3)]
    seen = tmp_path / "seen.txt"
    script = tmp_path / "ev.py"
    script.write_text(f"import sys\nopen({str(seen)!r}, 'a').write(sys.argv[1] + '\\n')\nprint(1)")
    work = tmp_path / "scratch"
    work.mkdir()
    cmd = f"{sys.executable} {script} {{ckpt}}"
    outs, runs = {}, {"default": [], "streamed": ["--memory", "0", "--workdir", str(work)]}
    for name, extra in runs.items():
        outs[name] = tmp_path / f"{name}.safetensors"
        argv = ["greedy", *map(str, paths), "-o", str(outs[name]), "--eval", cmd, "-q", *extra]
        assert main(argv) == 0
    report = json.loads((tmp_path / "streamed.report.json").read_text())
    assert report["memory"]["store"] == "streamed" and report["memory"]["budget"] == 0
    assert json.loads((tmp_path / "default.report.json").read_text())["memory"]["store"] == (
        "memory"
    )
    assert outs["default"].read_bytes() == outs["streamed"].read_bytes()
    files = seen.read_text().splitlines()  # ingredients (private copies) and candidates
    candidates = [f for f in files if Path(f).name.startswith("candidate")]
    assert len(candidates) == 4  # 2 steps per run
    assert sum(c.startswith(str(work)) for c in candidates) == 2
    assert not list(work.iterdir())  # removed after selection


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--memory", "lots", "cannot read size"),
        ("--memory", "-1GB", "cannot read size"),
        ("--workdir", "missing", "not an existing folder"),
    ],
)
def test_cli_bad_memory_or_workdir_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    paths = [save_as(tiny_state_dict(i), tmp_path / f"run{i}", "safetensors") for i in range(2)]
    out = tmp_path / "soup.safetensors"
    argv = ["greedy", *map(str, paths), "-o", str(out), "--eval", "echo 1; : {ckpt}",
            option, str(tmp_path / value) if option == "--workdir" else value]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("soup: error:") and message in err[0]
    assert not out.exists() and not (tmp_path / "soup.history.jsonl").exists()
