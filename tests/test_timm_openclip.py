"""timm and open_clip training checkpoints: `state_dict_ema`, `module.` prefixes, 0-d scalars.

timm's `train.py` saves `{"epoch", "arch", "args", "state_dict", "optimizer", "metric",
"state_dict_ema"}`; open_clip's `main.py` saves `{"epoch", "name", "state_dict", "optimizer"}`,
with every key prefixed by `module.` when trained under DDP. The tests below build those
exact layouts by hand around tiny modules whose parameter names follow timm's ViT/ResNet
and open_clip's CLIP (`cls_token`, `pos_embed`, `bn1.num_batches_tracked`, `logit_scale`
as a 0-d tensor, `in_proj_weight`), so they run on any machine. Where `timm` / `open_clip`
import, the same round trip also runs on their real tiny models; on a machine whose
torchvision does not import (torchvision's `_C.so` built for another torch), both packages
fail to import and those tests are skipped: see docs/ecosystem.md.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from modelsoups.cli import main


class TinyTimmLike(nn.Module):
    """Parameter names of a timm ViT with a ResNet-style stem (BatchNorm, int buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.conv1 = nn.Conv2d(3, 8, 4, stride=4)
        self.bn1 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv1(x)).flatten(2).transpose(1, 2)  # B, 4, 8
        h = torch.cat([self.cls_token.expand(len(x), -1, -1), h], dim=1) + self.pos_embed
        return self.head(h[:, 0])


class TinyClipLike(nn.Module):
    """Parameter names of open_clip's CLIP: 0-d `logit_scale`, `in_proj_weight`, projections."""

    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(20, 8)
        self.positional_embedding = nn.Parameter(torch.zeros(6, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln_final = nn.LayerNorm(8)
        self.text_projection = nn.Parameter(torch.zeros(8, 4))
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.token_embedding(ids) + self.positional_embedding
        h = self.ln_final(self.attn(h, h, h, need_weights=False)[0])
        return self.logit_scale.exp() * (h[:, -1] @ self.text_projection)


def _runs(cls: type[nn.Module], n: int) -> list[dict[str, torch.Tensor]]:
    """n fine-tuning runs of one base: same init, each with its own noise and BN stats."""
    sds = []
    for i in range(n):
        torch.manual_seed(0)
        model = cls()
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            for name, b in model.named_buffers():
                if b.is_floating_point():
                    b.add_(0.1 * torch.rand(b.shape, generator=g))
                elif name.endswith("num_batches_tracked"):
                    b.fill_(100)
        sds.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return sds


def _mean(sds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        k: (sum(s[k].double() for s in sds) / len(sds)).to(v.dtype) if v.is_floating_point() else v
        for k, v in sds[0].items()
    }


def _timm_checkpoint(model_sd: dict[str, torch.Tensor], ema_sd: dict[str, torch.Tensor]) -> dict:
    """The layout of timm's `CheckpointSaver` under DDP (args as a dict: see the test below)."""
    return {
        "epoch": 9,
        "arch": "tiny_timm_like",
        "args": {"lr": 0.01, "model_ema": True},
        "state_dict": {f"module.{k}": v for k, v in model_sd.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
        "metric": 71.5,
        "state_dict_ema": ema_sd,
        "version": 2,
    }


@pytest.mark.parametrize("which", ["state_dict", "state_dict_ema"])
def test_timm_training_checkpoints(tmp_path: Path, which: str) -> None:
    runs, emas = (
        _runs(TinyTimmLike, 3),
        [
            {k: v * 0.9 if v.is_floating_point() else v for k, v in sd.items()}
            for sd in _runs(TinyTimmLike, 3)
        ],
    )
    paths = []
    for i, (sd, ema) in enumerate(zip(runs, emas, strict=True)):
        torch.save(_timm_checkpoint(sd, ema), tmp_path / f"run{i}.pth.tar")
        paths.append(str(tmp_path / f"run{i}.pth.tar"))
    out = tmp_path / "soup.safetensors"
    assert main(["uniform", *paths, "--key", which, "-o", str(out), "-q"]) == 0

    soup = load_file(out)
    want = _mean(emas if which == "state_dict_ema" else runs)
    model = TinyTimmLike()
    model.load_state_dict(soup, strict=True)  # no `module.` left, nothing missing
    assert soup["bn1.num_batches_tracked"].dtype == torch.int64  # copied, not averaged
    for k, v in want.items():
        torch.testing.assert_close(soup[k], v, rtol=0, atol=1e-6)


def test_timm_checkpoint_with_namespace_args_needs_unsafe_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real timm checkpoints store `args` as an argparse.Namespace: weights_only refuses it."""
    paths = []
    for i, sd in enumerate(_runs(TinyTimmLike, 2)):
        ckpt = _timm_checkpoint(sd, sd)
        ckpt["args"] = argparse.Namespace(lr=0.01)
        torch.save(ckpt, tmp_path / f"run{i}.pth.tar")
        paths.append(str(tmp_path / f"run{i}.pth.tar"))
    out = tmp_path / "soup.safetensors"
    assert main(["uniform", *paths, "--key", "state_dict_ema", "-o", str(out), "-q"]) == 1
    assert "--unsafe-pickle" in capsys.readouterr().err
    argv = ["uniform", *paths, "--key", "state_dict_ema", "--unsafe-pickle", "-o", str(out), "-q"]
    assert main(argv) == 0
    TinyTimmLike().load_state_dict(load_file(out), strict=True)


def test_open_clip_ddp_checkpoints(tmp_path: Path) -> None:
    runs = _runs(TinyClipLike, 3)
    paths = []
    for i, sd in enumerate(runs):
        ckpt = {
            "epoch": 10,
            "name": "tiny-clip",
            "state_dict": {f"module.{k}": v for k, v in sd.items()},
            "optimizer": {"state": {}, "param_groups": []},
        }
        torch.save(ckpt, tmp_path / f"epoch_{i}.pt")
        paths.append(str(tmp_path / f"epoch_{i}.pt"))
    out = tmp_path / "soup.safetensors"
    assert main(["uniform", *paths, "-o", str(out), "-q"]) == 0  # the one nested state dict

    soup = load_file(out)
    assert soup["logit_scale"].shape == ()
    model, manual = TinyClipLike().eval(), TinyClipLike().eval()
    model.load_state_dict(soup, strict=True)
    manual.load_state_dict(_mean(runs), strict=True)
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), manual(ids), rtol=0, atol=1e-5)


def _real_round_trip(tmp_path: Path, build: object, prefix: str = "") -> None:
    """Soup three noisy copies of a real model; load the soup back into a fresh one."""
    sds = []
    for i in range(3):
        torch.manual_seed(0)
        model = build()  # type: ignore[operator]
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        sds.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        ckpt = {
            "state_dict": {prefix + k: v for k, v in sds[-1].items()},
            "state_dict_ema": sds[-1],
        }
        torch.save(ckpt, tmp_path / f"run{i}.pt")
    out = tmp_path / "soup.safetensors"
    paths = [str(tmp_path / f"run{i}.pt") for i in range(3)]
    assert main(["uniform", *paths, "--key", "state_dict", "-o", str(out), "-q"]) == 0
    fresh = build()  # type: ignore[operator]
    fresh.load_state_dict(load_file(out), strict=True)
    for k, v in _mean(sds).items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=1e-6)


def _import_or_skip(name: str) -> Any:
    """The package, or a skip saying why it does not import (any error, not just missing)."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # torchvision built for another torch raises RuntimeError
        pytest.skip(f"{name} does not import here: {type(e).__name__}: {e}")


def test_real_timm_model(tmp_path: Path) -> None:
    timm = _import_or_skip("timm")

    def build() -> nn.Module:
        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
            embed_dim=16, depth=1, num_heads=2, num_classes=3,
        )  # fmt: skip

    _real_round_trip(tmp_path, build, prefix="module.")


def test_real_open_clip_model(tmp_path: Path) -> None:
    open_clip = _import_or_skip("open_clip")

    def build() -> nn.Module:
        vision = open_clip.CLIPVisionCfg(
            layers=1, width=16, head_width=8, patch_size=8, image_size=32
        )
        text = open_clip.CLIPTextCfg(context_length=8, vocab_size=50, width=16, heads=2, layers=1)
        return open_clip.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text)

    _real_round_trip(tmp_path, build, prefix="module.")
