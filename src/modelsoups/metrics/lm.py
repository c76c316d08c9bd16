"""Causal language-model metrics: `lm-loss` (token NLL) and `lm-choice` (multiple choice).

lm-loss:   score = −(Σ over lines of the token NLL at positions 1…L−1) / (tokens predicted)
           where each line (JSONL `text`, tokenized with the default special tokens, or
           `input_ids`) is cut to `max_length` tokens; metrics: loss, perplexity = exp(loss).
lm-choice: for each JSONL `{"prompt", "choices", "answer"}`, each choice's log-likelihood
           is the sum of log p(token) over the tokens of tokenize(prompt + choice) after
           the prompt's own tokens (after their common prefix, if a token straddles the
           boundary); score = acc = how often the answer has the highest; metrics also
           acc_norm, the same with the log-likelihood divided by the choice's characters
           (lm-evaluation-harness's `acc` and `acc_norm`). Ties go to the first choice.

Lines are sorted by length and padded on the right: a causal model's real tokens never
see the padding after them, and padded positions are masked out of every sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..evaluate import Score
from .base import Batch, Progress, Settings, device_of, pad, pad_id, tokenizer
from .data import DataError, field, lengths_order, read_records

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LMChoice", "LMLoss"]


def token_logprobs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1…width−1, shape (batch, width−1), float32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class LMLoss:
    name: str = "lm-loss"
    auto_class: str = "AutoModelForCausalLM"

    def prepare(self, data: Path, folder: Path, config: Any, settings: Settings) -> Any:
        tok, lines = None, []
        for line, rec in read_records(data):
            if "input_ids" in rec and "text" not in rec:
                ids = field(data, line, rec, "input_ids", list)
                if not all(isinstance(i, int) and 0 <= i < config.vocab_size for i in ids):
                    raise DataError(f"{data} line {line}: 'input_ids' must be token ids in "
                                    f"0..{config.vocab_size - 1}")  # fmt: skip
            else:
                text = field(data, line, rec, "text", str)
                tok = tok or tokenizer(folder)
                ids = tok(text, truncation=True, max_length=settings.max_length)["input_ids"]
            lines.append(ids[: settings.max_length])
        if sum(max(len(s) - 1, 0) for s in lines) == 0:
            raise DataError(f"{data}: no line has two tokens or more; nothing to predict")
        return lines, 0 if tok is None else pad_id(tok)

    def batches(self, prepared: Any, settings: Settings, device: torch.device) -> list[Batch]:
        lines, pid = prepared
        order = lengths_order([len(s) for s in lines], settings.batch_size)
        return [pad([lines[i] for i in idx], pid, device) for idx in order]

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        """Mean token NLL of a batch (what the learned soup minimises)."""
        logp = token_logprobs(model, batch)
        mask = batch["attention_mask"][:, 1:].to(logp.dtype)
        return -(logp * mask).sum() / mask.sum().clamp(min=1)

    def run(
        self, model: nn.Module, prepared: Any, settings: Settings, progress: Progress | None
    ) -> Score:
        total, count, done = 0.0, 0, 0
        batches = self.batches(prepared, settings, device_of(model))
        for batch in batches:
            logp = token_logprobs(model, batch)
            mask = batch["attention_mask"][:, 1:].bool()
            total -= float(logp[mask].double().sum())
            count += int(mask.sum())
            done += len(batch["input_ids"])
            if progress is not None:
                progress(done, len(prepared[0]))
        loss = total / count
        return Score(-loss, {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                             "tokens": float(count)})  # fmt: skip


@dataclass(frozen=True)
class LMChoice:
    name: str = "lm-choice"
    auto_class: str = "AutoModelForCausalLM"

    def prepare(self, data: Path, folder: Path, config: Any, settings: Settings) -> Any:  # noqa: ARG002 (Metric protocol)
        tok = tokenizer(folder)
        items: list[tuple[int, list[int]]] = []  # (answer, characters of each choice)
        requests: list[tuple[int, list[int], int]] = []  # (item, ids, first choice token)
        for line, rec in read_records(data):
            prompt = field(data, line, rec, "prompt", str)
            choices = field(data, line, rec, "choices", list)
            answer = field(data, line, rec, "answer", int)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise DataError(f"{data} line {line}: 'choices' must be non-empty strings")
            if not 0 <= answer < len(choices):
                raise DataError(f"{data} line {line}: answer {answer} is out of range "
                                f"(0..{len(choices) - 1})")  # fmt: skip
            ctx = tok(prompt)["input_ids"]
            for choice in choices:
                full = tok(prompt + choice)["input_ids"]
                start = _common_prefix(ctx, full)
                cut = max(len(full) - settings.max_length, 0)  # keep the end: the choice
                start = max(start - cut, 1)
                if start >= len(full) - cut:
                    raise DataError(f"{data} line {line}: choice {choice!r} adds no token "
                                    "after the prompt (or the prompt has no token)")  # fmt: skip
                requests.append((len(items), full[cut:], start))
            items.append((answer, [len(c) for c in choices]))
        return items, requests, pad_id(tok)

    def run(
        self, model: nn.Module, prepared: Any, settings: Settings, progress: Progress | None
    ) -> Score:
        items, requests, pid = prepared
        loglik = [0.0] * len(requests)
        order = lengths_order([len(r[1]) for r in requests], settings.batch_size)
        done = 0
        for idx in order:
            batch = pad([requests[i][1] for i in idx], pid, device_of(model))
            logp = token_logprobs(model, batch).double()
            for row, i in enumerate(idx):
                _, ids, start = requests[i]
                loglik[i] = float(logp[row, start - 1 : len(ids) - 1].sum())
            done += len(idx)
            if progress is not None:
                progress(done, len(requests))
        acc = acc_norm = 0
        pos = 0
        for answer, chars in items:
            ll = loglik[pos : pos + len(chars)]
            pos += len(chars)
            acc += _argmax(ll) == answer
            acc_norm += _argmax([x / n for x, n in zip(ll, chars, strict=True)]) == answer
        n = len(items)
        return Score(acc / n, {"acc": acc / n, "acc_norm": acc_norm / n})


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))
