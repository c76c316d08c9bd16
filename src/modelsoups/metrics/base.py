"""What every built-in metric shares: its settings, the `Metric` shape, padded batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..errors import SoupError

if TYPE_CHECKING:
    from torch import nn

    from ..evaluate import Score

__all__ = ["DTYPES", "Batch", "Metric", "Settings", "pad", "tokenizer"]

Batch = dict[str, torch.Tensor]
Progress = Callable[[int, int], None]  # (examples done, total)
# The dtypes a metric's model can run in, by the names the CLI's --dtype also accepts.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """How a metric runs: examples per forward pass, and the token budget of one example."""

    batch_size: int = 8  # examples per forward pass (sorted by length, padded on the right)
    max_length: int = 512  # tokens kept per example (lm-loss/accuracy: the first ones)
    # the model's weights and activations; candidates are cast to it as they are copied in.
    # Log-probabilities and sums are float32/float64 whatever it is.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
                raise SoupError(f"{name} must be an integer from 1 to 2**31-1, got "
                                f"{str(value)[:40]}")  # fmt: skip
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise SoupError(f"metric dtype {str(self.dtype)[:40]!r} is not one of float32 "
                            "(fp32), bfloat16 (bf16), float16 (fp16)")  # fmt: skip

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class Metric(Protocol):
    """A built-in metric: reads its data once, then scores the live model (higher is better)."""

    @property
    def name(self) -> str: ...

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that builds the model."""
        ...

    def prepare(self, data: Path, folder: Path, config: Any, settings: Settings) -> Any:
        """Read and check `data` (tokenized with `folder`'s tokenizer or image processor)."""
        ...

    def run(
        self, model: nn.Module, prepared: Any, settings: Settings, progress: Progress | None
    ) -> Score:
        """The score of `model` (already holding the candidate's weights) on `prepared`."""
        ...


def pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> Batch:
    """Right-padded `input_ids` and the `attention_mask` marking the real tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def tokenizer(folder: Path) -> Any:
    """The folder's tokenizer (`AutoTokenizer`, local files only)."""
    import transformers

    from .model import check_tokenizer

    check_tokenizer(folder)
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SoupError(f"{folder}: cannot load its tokenizer ({first})") from None


def pad_id(tok: Any) -> int:
    """Any id works (padded positions are masked out): the pad token, else EOS, else 0."""
    for value in (tok.pad_token_id, tok.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


def device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device
