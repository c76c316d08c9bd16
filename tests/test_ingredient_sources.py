"""What a recipe sends to its workers: ingredients that cannot travel are copied only when
pickled (one job at a time), never all at once before any is scored, and not at all when
the jobs run in this process.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from conftest import TinyNet, save_as, tiny_state_dict

from modelsoups import greedy_soup
from modelsoups.executor import LocalExecutor
from modelsoups.ingredients import LocalSource, ingredient_sources
from modelsoups.io import open_checkpoint


def _closeness(sd: dict[str, torch.Tensor]) -> float:
    return -float((sd["fc.weight"].double() - 0.1).pow(2).sum())


def test_open_checkpoints_and_modules_are_sent_as_themselves_until_pickled(
    tmp_path: Path,
) -> None:
    path = save_as(tiny_state_dict(0), tmp_path / "a", "safetensors")
    ckpt, module, sd = open_checkpoint(path), TinyNet(), tiny_state_dict(1)
    sources = dict(ingredient_sources([path, ckpt, module, sd], ["p", "c", "m", "s"]))
    assert sources["p"] is path and sources["s"] is sd  # small, or plain data: as they are
    for name, x in (("c", ckpt), ("m", module)):
        source = sources[name]
        assert isinstance(source, LocalSource) and source.ingredient is x  # no copy
        copied = pickle.loads(pickle.dumps(source))  # what a worker gets: the tensors, then
        assert isinstance(copied, dict)
        own = {k: ckpt.get(k) for k in ckpt.infos} if x is ckpt else module.state_dict()
        assert copied.keys() == own.keys()
        assert all(torch.equal(copied[k], v) for k, v in own.items())
        read = source.open()
        assert all(torch.equal(read.get(k), v) for k, v in own.items())
        read.close()
    assert torch.equal(ckpt.get("fc.weight"), tiny_state_dict(0)["fc.weight"])  # still open


def test_greedy_over_open_checkpoints_in_workers_equals_in_process(tmp_path: Path) -> None:
    """Open checkpoints given to greedy: scored in this process (read through) or in two
    workers (copied when each job is pickled), the same soup."""
    paths = [save_as(tiny_state_dict(i, noise=0.05), tmp_path / f"r{i}", "safetensors")
             for i in range(4)]  # fmt: skip
    results = []
    for executor in (LocalExecutor(1), LocalExecutor(2)):
        ckpts = [open_checkpoint(p) for p in paths]
        results.append(greedy_soup(ckpts, _closeness, executor=executor))
    one, two = results
    assert one.selected == two.selected and one.ingredient_scores == two.ingredient_scores
    assert one.score == two.score
