"""Tiny models built inside the tests, saved in every format modelsoups reads."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from safetensors.torch import save_file
from torch import nn

# No timed unit tests: hypothesis' default 200 ms per example fails at random on a busy
# 2-core CI runner (seen at load 13 on a pure-string property), so no deadline anywhere.
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")

FORMATS = ("safetensors", "pt", "hf-folder", "hf-sharded", "bin-folder", "bin-sharded")


class TinyNet(nn.Module):
    """Conv + BatchNorm + Linear + a tied embedding/decoder pair: every awkward case small."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.embed = nn.Embedding(7, 5)
        self.decoder = nn.Linear(5, 7, bias=False)
        self.decoder.weight = self.embed.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x)).mean(dim=(2, 3))
        return self.decoder(self.fc(h))


def tiny_state_dict(seed: int, base_seed: int = 0, noise: float = 0.01) -> dict[str, torch.Tensor]:
    """A TinyNet fine-tuned 'by noise' from one shared base: same basin, different runs."""
    torch.manual_seed(base_seed)
    model = TinyNet()
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
        model.bn.running_mean.add_(0.1 * torch.randn(4, generator=g))
        model.bn.running_var.add_(0.1 * torch.rand(4, generator=g))
    model.bn.num_batches_tracked.fill_(10)
    return model.state_dict()


def _untie(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def save_as(sd: dict[str, torch.Tensor], path: Path, fmt: str) -> Path:
    """Save a state dict as `fmt` (one of FORMATS) at `path` (a file or folder name)."""
    if fmt == "safetensors":
        out = path.with_suffix(".safetensors")
        save_file(_untie(sd), out, metadata={"format": "pt"})
        return out
    if fmt == "pt":
        out = path.with_suffix(".pt")
        torch.save(sd, out)
        return out
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    (path / "tokenizer.json").write_text("{}")
    keys = list(sd)
    if fmt in ("hf-folder", "bin-folder"):
        if fmt == "hf-folder":
            save_file(_untie(sd), path / "model.safetensors", metadata={"format": "pt"})
        else:
            torch.save(_untie(sd), path / "pytorch_model.bin")
        return path
    half = len(keys) // 2
    parts = [keys[:half], keys[half:]]
    ext, index_name = (
        ("safetensors", "model.safetensors.index.json")
        if fmt == "hf-sharded"
        else ("bin", "pytorch_model.bin.index.json")
    )
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-00002.{ext}"
        shard = _untie({k: sd[k] for k in part})
        if ext == "safetensors":
            save_file(shard, path / name)
        else:
            torch.save(shard, path / name)
        weight_map.update({k: name for k in part})
    (path / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture
def make_ingredients(tmp_path: Path) -> Callable[..., list[Path]]:
    """make_ingredients(n, fmt="safetensors", dtype=None) -> paths of n tiny checkpoints."""

    def make(n: int, fmt: str = "safetensors", dtype: torch.dtype | None = None) -> list[Path]:
        paths = []
        for i in range(n):
            sd = tiny_state_dict(i)
            if dtype is not None:
                sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
            paths.append(save_as(sd, tmp_path / f"run{i}", fmt))
        return paths

    return make


@pytest.fixture
def quiet_cli() -> Iterator[None]:
    """In-process `main` runs start with --quiet and without --debug (flags `main` keeps in a
    module dict and resets after each run): only error lines reach stderr."""
    from modelsoups.cli.common import STATE

    saved = dict(STATE)
    STATE.update(quiet=True, debug=False)
    yield
    STATE.update(saved)


def reference_mean(
    sds: list[dict[str, torch.Tensor]], weights: list[float] | None = None
) -> dict[str, torch.Tensor]:
    """float64 weighted mean of float tensors; integer tensors from the first input."""
    n = len(sds)
    w = weights or [1.0 / n] * n
    total = sum(w)
    out = {}
    for k, v in sds[0].items():
        if v.is_floating_point():
            out[k] = sum(wi / total * s[k].double() for wi, s in zip(w, sds, strict=True))
        else:
            out[k] = v
    return out
