"""Ray executor: a local Ray runtime (2 CPUs, loopback only) gives the local executor's results.

One Ray runtime serves the whole session (started by the first test that needs it, left
to Ray's exit hook), since starting one costs ~10 s on 2 cores.
"""

from __future__ import annotations

import functools
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_as, tiny_state_dict
from safetensors.torch import load_file, save_file

from modelsoups import CommandEvaluator, FunctionEvaluator, LocalExecutor, SoupError, greedy_soup
from modelsoups.cli import main

ray = pytest.importorskip("ray")

from modelsoups.executor_ray import RayExecutor, init_local_ray, make_executor  # noqa: E402

EVAL = textwrap.dedent(
    """
    import sys
    import numpy as np
    from safetensors.numpy import load_file

    from pathlib import Path
    ckpt = Path(sys.argv[1])
    if ckpt.is_dir():
        ckpt = ckpt / "model.safetensors"
    sd, target = load_file(ckpt), load_file(sys.argv[2])
    keys = ("fc.weight", "conv.weight")
    d = sum(float(((sd[k].astype("f8") - target[k]) ** 2).sum()) for k in keys)
    print(round(-d * 1e4, 3))
    """
)


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[Any]:
    """A local Ray runtime with 2 CPUs, on loopback only; kept for the rest of the session."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    if not ray.is_initialized():
        init_local_ray(num_cpus=2)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield ray


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str]:
    """Five ingredients as safetensors files and an eval command scoring closeness to a base."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    paths = []
    for i in range(5):
        sd = tiny_state_dict(i, noise=0.01 * (1 + i % 3))
        paths.append(save_as(sd, tmp_path / f"run{i}", "safetensors"))
    target = {k: v.double().clone() for k, v in tiny_state_dict(99, noise=0.0).items()}
    save_file(target, tmp_path / "target.safetensors")
    (tmp_path / "eval.py").write_text(EVAL)
    command = f"{sys.executable} {tmp_path / 'eval.py'} {{ckpt}} {tmp_path / 'target.safetensors'}"
    return paths, command


@pytest.fixture(scope="module")
def local(sweep: tuple[list[Path], str]) -> Any:
    """The reference: the greedy soup computed in this process, one evaluation at a time."""
    paths, command = sweep
    return greedy_soup(paths, CommandEvaluator(command), executor=LocalExecutor(1))


def _same(a: Any, b: Any) -> None:
    assert a.selected == b.selected and a.score == b.score
    assert a.ingredient_scores == b.ingredient_scores
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_greedy_on_ray_equals_local(
    ray_runtime: Any, sweep: tuple[list[Path], str], local: Any
) -> None:
    paths, command = sweep
    on_ray = greedy_soup(paths, CommandEvaluator(command), executor=RayExecutor(num_cpus=2))
    _same(local, on_ray)
    assert 1 < len(on_ray.selected) < len(paths)  # a real choice was made


def test_shipping_files_through_the_object_store(
    ray_runtime: Any, sweep: tuple[list[Path], str], local: Any
) -> None:
    """As on a cluster without a shared filesystem: workers get copies, same result."""
    paths, command = sweep
    shipped = greedy_soup(paths, CommandEvaluator(command), executor=RayExecutor(ship_files=True))
    _same(local, shipped)
    with pytest.raises(SoupError, match="max_ship_bytes"):
        RayExecutor(ship_files=True, max_ship_bytes=10).map(str, [paths[0]])


def _closeness(sd: dict[str, torch.Tensor]) -> float:
    return -float((sd["fc.weight"].double() - 0.1).pow(2).sum())


def test_state_dicts_and_functions(ray_runtime: Any) -> None:
    """In-memory ingredients travel through the object store; the function is pickled."""
    sds = [tiny_state_dict(i, noise=0.05) for i in range(4)]
    local = greedy_soup(sds, FunctionEvaluator(_closeness))
    on_ray = greedy_soup(sds, FunctionEvaluator(_closeness), executor=RayExecutor())
    _same(local, on_ray)


def _fail_on_two(x: int) -> int:
    if x == 2:
        raise SoupError("two is not allowed")
    return x * 10


def test_map_keeps_order_and_reraises_the_first_error(ray_runtime: Any) -> None:
    ex = RayExecutor()
    assert ex.map(_fail_on_two, [3, 1, 0]) == [30, 10, 0]
    assert ex.map(_fail_on_two, []) == []
    with pytest.raises(SoupError, match="two is not allowed"):
        ex.map(_fail_on_two, [1, 2, 3])


class _Counted:
    """An item that, when the driver serializes it for a task, notes how many tasks had
    finished then (lines in `done`); it arrives in the task as an int."""

    def __init__(self, value: int, done: Path, notes: list[tuple[int, int]]) -> None:
        self.value, self.done, self.notes = value, done, notes

    def __reduce__(self) -> tuple[type, tuple[int]]:
        finished = len(self.done.read_text().splitlines()) if self.done.exists() else 0
        self.notes.append((self.value, finished))
        return int, (self.value,)


def _note_done(done: Path, x: int) -> int:
    with done.open("a") as f:
        f.write(f"{x}\n")
    return x * x


def test_tasks_are_submitted_as_earlier_ones_finish_not_all_up_front(
    ray_runtime: Any, tmp_path: Path
) -> None:
    """Ray serializes a task's argument when it is submitted (an in-memory ingredient: a
    copy of its tensors in the object store): item k is serialized only once at most
    2 × 2 CPUs tasks are unfinished, not all N at once (was: 24 serialized before any ran)."""
    done, notes = tmp_path / "done.txt", []
    items = [_Counted(i, done, notes) for i in range(24)]
    assert RayExecutor().map(functools.partial(_note_done, done), items) == [
        i * i for i in range(24)
    ]
    assert [k for k, _ in notes] == list(range(24))
    assert max(k - finished for k, finished in notes) <= 4, notes


def test_cli_greedy_with_ray_equals_local(
    ray_runtime: Any, sweep: tuple[list[Path], str], local: Any, tmp_path: Path
) -> None:
    paths, command = sweep
    out = tmp_path / "ray.safetensors"
    argv = ["greedy", *map(str, paths), "--eval", command, "--ray", "-o", str(out), "-q"]
    assert main(argv) == 0
    got, want = load_file(out), local.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-7)
    report = json.loads(out.with_name("ray.report.json").read_text())
    assert report["selected"] == local.selected


def test_missing_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(SoupError, match=r"pip install 'modelsoups\[ray\]'"):
        make_executor(2, ray=True)
    assert isinstance(make_executor(2), LocalExecutor)


def test_cli_wise_ft_sweep_with_ray_equals_local(
    ray_runtime: Any, sweep: tuple[list[Path], str], tmp_path: Path
) -> None:
    paths, command = sweep
    reports = []
    for extra in ([], ["--ray"]):
        out = tmp_path / f"wise{len(extra)}.safetensors"
        argv = ["wise-ft", str(paths[0]), str(paths[1]), "--alphas", "0,0.5,1", "--eval", command]
        assert main([*argv, *extra, "-o", str(out), "-q"]) == 0
        reports.append(json.loads(out.with_name(f"wise{len(extra)}.report.json").read_text()))
    local, on_ray = reports
    assert [r["held_out"] for r in local["sweep"]] == [r["held_out"] for r in on_ray["sweep"]]
    assert local["alpha"] == on_ray["alpha"]


def _cwd(_: int) -> str:
    import os

    return os.getcwd()


def test_tasks_run_in_the_callers_folder(
    ray_runtime: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers started elsewhere still see relative paths (and eval commands) as we do."""
    monkeypatch.chdir(tmp_path)
    assert RayExecutor().map(_cwd, [1, 2]) == [str(tmp_path), str(tmp_path)]


def test_cli_greedy_metric_with_ray_equals_local(
    ray_runtime: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`--metric` on Ray: the metric's spec goes to the workers, each builds its own model."""
    from hf_models import causal_lm
    from test_metrics import TEXTS, write_jsonl

    root = tmp_path_factory.mktemp("ray-metric")
    paths = [causal_lm(root / "a", noise_seed=1), causal_lm(root / "b", noise_seed=2),
             causal_lm(root / "c", seed=5, noise_seed=3)]  # fmt: skip
    data = write_jsonl(root / "val.jsonl", [{"text": t} for t in TEXTS])
    reports = []
    for extra in ([], ["--ray"]):
        out = root / f"soup{len(extra)}"
        argv = ["greedy", *map(str, paths), "--metric", "lm-loss", "--data", str(data)]
        assert main([*argv, "--device", "cpu", *extra, "-o", str(out), "-q"]) == 0
        reports.append(json.loads((root / f"soup{len(extra)}.report.json").read_text()))
    local, on_ray = reports
    assert on_ray["selected"] == local["selected"]
    assert 1 <= len(local["selected"]) < 3  # the one from another init is left out
    for a, b in zip(local["ingredients"], on_ray["ingredients"], strict=True):
        assert a["held_out"] == pytest.approx(b["held_out"], abs=1e-6)
    assert on_ray["held_out"] == pytest.approx(local["held_out"], abs=1e-6)
    assert on_ray["scorer"]["held_out"]["metric"] == "lm-loss"


def test_cli_greedy_over_adapters_with_ray_equals_local(
    ray_runtime: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Adapter candidates on Ray: each task opens the adapters' files by path (the space's
    ingredients pickle as metadata) and scores them in its own PeftModel."""
    pytest.importorskip("peft")
    from lora_models import make_adapter, make_base

    root = tmp_path_factory.mktemp("ray-lora")
    base = make_base(root / "base")
    runs = [make_adapter(base, root / f"run{i}", r=r, seed=i + 1) for i, r in enumerate((4, 8, 4))]
    data = root / "ids.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [(7 * i + j) % 64 for j in range(16)]})
                            + "\n" for i in range(3)))  # fmt: skip
    reports = []
    for extra in ([], ["--ray"]):
        out = root / f"soup{len(extra)}"
        argv = ["greedy", *map(str, runs), "--metric", "lm-loss", "--data", str(data)]
        assert main([*argv, *extra, "-o", str(out), "-q"]) == 0
        reports.append(json.loads((root / f"soup{len(extra)}.report.json").read_text()))
        assert (out / "adapter_config.json").is_file()
    local, on_ray = reports
    assert on_ray["selected"] == local["selected"]
    got = [i["held_out"] for i in on_ray["ingredients"]]
    assert got == pytest.approx([i["held_out"] for i in local["ingredients"]], abs=1e-6)
    assert len(set(got)) == 3
    assert on_ray["held_out"] == pytest.approx(local["held_out"], abs=1e-6)
