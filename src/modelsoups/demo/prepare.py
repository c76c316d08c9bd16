"""Shared preparation for all seeds: data, cached frozen features, the LP-init start.

Nothing here depends on the seed, so `--seeds 0,1,2,3,4` pays for it once; and everything
expensive is cached under the cache folder, so a second run reads it back in seconds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .corpus import default_cache_dir, find_corpus
from .data import Splits, SplitSizes, load_snippets, make_splits
from .features import encode_split, feature_key, fit_linear_probe, save_features
from .model import Features, load_encoder, top_state_from_encoder

__all__ = ["Prepared", "default_cache_dir", "prepare"]

SPLITS = ("pool", "held_out", "test", "shift")
QUICK_SIZES = SplitSizes(pool=200, held_out=100, test=100)  # a code-path check, not a result


@dataclass
class Prepared:
    """Everything the seeds share: splits, features on disk and in memory, the start."""

    splits: Splits
    feature_dir: Path
    feats: dict[str, Features]
    config: dict[str, Any]  # the encoder's BertConfig as a dict (workers rebuild `Top`)
    init: dict[str, torch.Tensor]  # pretrained layers 4-5 + the linear-probe head
    init_path: Path
    probe: dict[str, Any]
    lp_logits: dict[str, torch.Tensor]
    timings: dict[str, float] = field(default_factory=dict)
    corpus: str = ""


def _build_features(splits: Splits, fdir: Path, log: Any) -> dict[str, Features]:
    """Encode every split through the frozen layers once and write the cache."""
    encoder, tokenizer = load_encoder()
    feats: dict[str, Features] = {}
    for name in SPLITS:
        log(f"caching frozen layers 0-3 for {name} ({len(splits.texts[name])} snippets)")
        feats[name] = encode_split(encoder, tokenizer, splits.texts[name], splits.labels[name])
        save_features(feats[name], fdir / f"{name}.safetensors")
    save_file(top_state_from_encoder(encoder), str(fdir / "pretrained_top.safetensors"))
    (fdir / "config.json").write_text(json.dumps(encoder.config.to_dict()))
    return feats


def _cached(fdir: Path) -> bool:
    names = [f"{s}.safetensors" for s in SPLITS] + ["pretrained_top.safetensors", "config.json"]
    return all((fdir / n).is_file() for n in names)


def prepare(*, quick: bool, cache_dir: Path, fresh: bool, log: Any) -> Prepared:
    """Load the data, build or read the feature cache, fit the probe, write the start."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    corpus = find_corpus(cache_dir)
    splits = make_splits(load_snippets(corpus), QUICK_SIZES if quick else SplitSizes())
    timings["data"] = time.perf_counter() - start
    fdir = cache_dir / f"features-{feature_key(splits)}"
    start = time.perf_counter()
    if _cached(fdir) and not fresh:
        log(f"reading cached features from {fdir}")
        feats = {s: Features.load(fdir / f"{s}.safetensors") for s in SPLITS}
    else:
        feats = _build_features(splits, fdir, log)
    timings["features"] = time.perf_counter() - start
    start = time.perf_counter()
    init, init_path, probe_info = _start(feats, fdir, fresh)
    timings["linear_probe"] = time.perf_counter() - start
    return Prepared(
        splits=splits,
        feature_dir=fdir,
        feats=feats,
        config=json.loads((fdir / "config.json").read_text()),
        init=init,
        init_path=init_path,
        probe=probe_info,
        lp_logits={s: feats[s].pooled @ init["head.weight"].T + init["head.bias"] for s in SPLITS},
        timings=timings,
        corpus=str(corpus),
    )


def _start(
    feats: dict[str, Features], fdir: Path, fresh: bool
) -> tuple[dict[str, torch.Tensor], Path, dict[str, Any]]:
    """The shared start: pretrained layers 4-5 + the linear probe (fitted once, cached).

    The LP init's logits are the probe on the pretrained pooled features: no forward pass.
    """
    info_path = fdir / "probe.json"
    if info_path.is_file() and not fresh:
        info = json.loads(info_path.read_text())
        init_path = fdir / info["init"]
        if init_path.is_file():
            return load_file(str(init_path)), init_path, info
    probe, info = fit_linear_probe(feats["pool"], feats["held_out"])
    init = load_file(str(fdir / "pretrained_top.safetensors"))
    init["head.weight"], init["head.bias"] = probe.weight.contiguous(), probe.bias.contiguous()
    init_path = fdir / f"init-C{probe.c:g}.safetensors"
    save_file(init, str(init_path))
    info["init"] = init_path.name
    info_path.write_text(json.dumps(info, indent=2))
    return init, init_path, info
