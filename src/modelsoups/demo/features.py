"""Frozen features and the shared start: cached layer-3 states, and the linear probe.

Run once per data/model version and cached on disk: the embeddings and layers 0-3 over
every snippet (the expensive part of a forward pass, never trained), and the pretrained
layers 4-5 mean-pooled, on which a logistic-regression head is fitted. That head on top of
the pretrained layers 4-5 is the one shared initialisation of every ingredient (LP-FT: the
paper starts each fine-tuning run from the same zero-shot/LP head; without a shared head
the ingredients land in different basins and their soups collapse).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from .atomic import save_tensors
from .data import Splits
from .model import FROZEN_LAYERS, MAX_LEN, Features, additive_mask, model_path

__all__ = ["FORMAT", "LinearProbe", "encode_split", "feature_key", "fit_linear_probe"]

FORMAT = 1  # bump when what is cached changes meaning
PROBE_CS = (0.1, 1.0, 10.0)  # inverse L2 strengths tried; chosen on held-out, as in sklearn


def feature_key(splits: Splits) -> str:
    """Cache key: the exact texts, the model's files and the cached-layer layout."""
    h = hashlib.sha256(f"{FORMAT}:{MAX_LEN}:{FROZEN_LAYERS}".encode())
    for name in sorted(splits.texts):
        h.update(name.encode())
        h.update(json.dumps([splits.texts[name], splits.labels[name]]).encode())
    folder = Path(model_path())
    for f in [*sorted(folder.glob("*.json")), folder / "model.safetensors"]:
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def encode_split(
    encoder: Any, tokenizer: Any, texts: list[str], labels: list[int], batch_size: int = 128
) -> Features:
    """Run embeddings + layers 0-3 once over `texts`, keep the states; pool layers 4-5 too.

    States are rounded to float16 before the pretrained layers 4-5 see them, so the probe is
    fitted on exactly the inputs that `Top` gets from the cache.
    """
    ids = tokenizer(texts, truncation=True, max_length=MAX_LEN)["input_ids"]
    lengths = torch.tensor([len(x) for x in ids])
    per_snippet: list[torch.Tensor] = [torch.empty(0)] * len(ids)
    pooled = torch.empty(len(ids), encoder.config.hidden_size)
    layers = encoder.encoder.layer
    with torch.inference_mode():
        for idx in torch.split(torch.argsort(lengths, stable=True), batch_size):
            width = int(lengths[idx].max())
            batch = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx.tolist()):
                batch[row, : len(ids[i])] = torch.tensor(ids[i])
            mask = additive_mask(lengths[idx], width)
            h = encoder.embeddings(input_ids=batch, token_type_ids=torch.zeros_like(batch))
            for layer in layers[:FROZEN_LAYERS]:
                h = layer(h, attention_mask=mask)
            h = h.half()
            for row, i in enumerate(idx.tolist()):
                per_snippet[i] = h[row, : lengths[i]].clone()
            g = h.float()
            for layer in layers[FROZEN_LAYERS:]:
                g = layer(g, attention_mask=mask)
            keep = (mask[:, 0, 0, :] == 0).float()[..., None]
            pooled[idx] = (g * keep).sum(1) / keep.sum(1)
    offsets = torch.zeros(len(ids) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    return Features(torch.cat(per_snippet), offsets, torch.tensor(labels), pooled)


def save_features(feats: Features, path: Path) -> None:
    """Write features atomically (a crash never leaves a half-written cache file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(feats.to_tensors(), path)


class LinearProbe:
    """A logistic-regression head on pooled features, as sklearn fits it.

    Minimises mean cross-entropy + ‖W‖²/(2·C·n) with full-batch L-BFGS (the bias is not
    penalised). Implemented in torch so the demo does not need scikit-learn.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, c: float) -> None:
        self.weight, self.bias, self.c = weight, bias, c

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, c: float) -> LinearProbe:
        """Fit on features `x` [n,d] and labels `y` [n] with inverse strength `c`."""
        w = torch.zeros(2, x.shape[1], requires_grad=True)
        b = torch.zeros(2, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            ce = torch.nn.functional.cross_entropy(x @ w.T + b, y)
            loss = ce + (w * w).sum() / (2 * c * len(y))
            loss.backward()
            return loss

        opt.step(closure)
        return cls(w.detach(), b.detach(), c)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fraction of `x` classified as `y`."""
        return float(((x @ self.weight.T + self.bias).argmax(1) == y).float().mean())


def fit_linear_probe(train: Features, held_out: Features) -> tuple[LinearProbe, dict[str, Any]]:
    """Fit one probe per C on the train pool, keep the best on held-out (never on test)."""
    start = time.perf_counter()
    scores: dict[str, float] = {}
    best: LinearProbe | None = None
    for c in PROBE_CS:
        probe = LinearProbe.fit(train.pooled, train.labels, c)
        scores[str(c)] = acc = probe.accuracy(held_out.pooled, held_out.labels)
        if best is None or acc > scores[str(best.c)]:
            best = probe
    assert best is not None  # PROBE_CS is not empty
    info = {"C": best.c, "held_out_by_C": scores, "seconds": time.perf_counter() - start}
    return best, info
