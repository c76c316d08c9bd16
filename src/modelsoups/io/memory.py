"""An in-memory state dict (or a module's) read through the same `Checkpoint` interface as
files, so that every recipe and check handles both alike."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SoupError
from .base import Checkpoint, TensorInfo
from .pickle_file import tensor_dtype

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..types import StateDict

__all__ = ["MemoryCheckpoint"]


class MemoryCheckpoint(Checkpoint):
    """A state dict (or an `nn.Module`'s) as a checkpoint; `get` returns its own tensors
    (no copies), so treat them as read-only.

    Args:
        state_dict: name -> tensor, or a module whose `state_dict()` is read once.
        label: how errors name it (its `path`), e.g. `"<state dict 2>"`.

    Example:
        >>> ckpt = MemoryCheckpoint({"w": torch.ones(2)})  # doctest: +SKIP
        >>> ckpt.infos["w"].shape
        (2,)
    """

    def __init__(self, state_dict: StateDict | nn.Module, label: str = "<state dict 0>") -> None:
        import torch

        super().__init__(Path(label), "memory")
        sd = state_dict if isinstance(state_dict, dict) else dict(state_dict.state_dict())
        self._sd = sd
        for k, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise SoupError(f"{self.path}: {k!r} is a {type(t).__name__}, not a tensor")
            self.infos[k] = TensorInfo(k, tuple(t.shape), tensor_dtype(t, k, self.path),
                                       self.path)  # fmt: skip

    def get(self, name: str) -> torch.Tensor:
        return self._sd[name]
