"""PyTorch pickle checkpoints (`.pt`, `.pth`, `.bin`), loaded safely and memory-mapped.

`torch.load(weights_only=True)` refuses anything but tensors and plain containers, so a
malicious pickle cannot run code; `unsafe_pickle=True` is the explicit opt-out. Training
checkpoints often nest the weights (`{"epoch": 3, "state_dict": {...}}`): `key` picks the
nested dict, and the only nested dict of tensors is picked when that is unambiguous.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dtypes import DType, as_dtype
from ..errors import CheckpointError, UnsafePickleError
from .base import Checkpoint, TensorInfo, normalise_keys
from .files import Stamp, check_regular

if TYPE_CHECKING:
    import torch

__all__ = ["PickleFile", "load_pickle"]


def load_pickle(path: Path, *, unsafe_pickle: bool = False) -> Any:
    """`torch.load` on CPU with mmap where the format allows it; errors name the file."""
    import torch  # here, not at the top: reading safetensors never imports torch

    check_regular(path)  # torch.load would block on a FIFO, read a device forever
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    for use_mmap in (True, False):
        try:
            # torch warns while loading some tensors (quantized, sparse CSR: "deprecated",
            # "beta"); those tensors are refused with one line, the warnings are noise
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(
                    path, map_location="cpu", mmap=use_mmap, weights_only=not unsafe_pickle
                )
        except pickle.UnpicklingError as e:
            if "Weights only load failed" in str(e) and "Unsupported" in str(e):
                raise UnsafePickleError(
                    f"{path}: refusing to load a pickle that needs code execution "
                    "(weights_only=True rejected it); pass --unsafe-pickle only if you trust "
                    "this file"
                ) from None
            raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_first_line(e)})") from None
        except RuntimeError as e:
            if use_mmap and "mmap" in str(e):  # legacy (non-zip) format: no mmap possible
                continue
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})"
            ) from None
        except Exception as e:  # corrupt input makes the unpickler raise almost anything
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})"
            ) from None
    raise AssertionError("unreachable")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _is_state_dict(obj: Any) -> bool:
    import torch

    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def select_state_dict(obj: Any, path: Path, key: str | None) -> tuple[Mapping[str, Any], str]:
    """Find the weights inside a loaded pickle; returns them and a note on where they were."""
    import torch

    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: contains a {type(obj).__name__}, not a dict of tensors (state dict)"
        )
    if key is not None:
        node: Any = obj
        for part in key.split("/"):
            if not isinstance(node, Mapping) or part not in node:
                options = ", ".join(repr(k) for k in node) if isinstance(node, Mapping) else ""
                raise CheckpointError(f"{path}: no key {key!r} (top-level keys: {options})")
            node = node[part]
        if not isinstance(node, Mapping):
            raise CheckpointError(f"{path}: {key!r} is a {type(node).__name__}, not a dict")
        return node, f"weights taken from key {key!r}"
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, ""
    nested = [k for k, v in obj.items() if _is_state_dict(v)]
    if len(nested) == 1:
        return obj[nested[0]], f"weights taken from nested key {nested[0]!r}"
    if nested:
        raise CheckpointError(
            f"{path}: holds several state dicts ({', '.join(map(repr, nested))}); "
            "pick one with --key"
        )
    bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    raise CheckpointError(
        f"{path}: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor, and no nested "
        "state dict was found; pick the weights with --key"
    )


def check_plain(t: torch.Tensor, name: str, path: Path) -> None:
    """Refuse tensors that are not a dense block of numbers in memory: a soup averages
    elements, which these do not hold (meta), or hold encoded (sparse, quantized)."""
    import torch

    problems = [
        (t.is_nested, "a nested tensor", "save its parts as separate tensors"),
        (t.layout != torch.strided, f"a sparse tensor ({t.layout})", "save it .to_dense()"),
        (t.is_meta, "on the meta device (a shape without data)", "save the real weights"),
        (t.is_quantized, f"quantized ({t.dtype})", "save it .dequantize()d"),
    ]
    for found, what, fix in problems:
        if found:
            raise CheckpointError(
                f"{path}: tensor {name!r} is {what}, which modelsoups cannot soup; {fix}"
            )


def tensor_dtype(t: torch.Tensor, name: str, path: Path) -> DType:
    """The `DType` of a tensor; a dtype safetensors cannot hold (complex...) is an error."""
    try:
        return as_dtype(t.dtype)
    except ValueError:
        raise CheckpointError(
            f"{path}: tensor {name!r} is {t.dtype}, which modelsoups cannot soup"
        ) from None


class PickleFile(Checkpoint):
    """A `torch.save`d state dict (possibly nested in a training checkpoint)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key: str | None = None,
        unsafe_pickle: bool = False,
        obj: Any = None,
    ) -> None:
        import torch

        super().__init__(Path(path), "pytorch pickle")
        self._stamp: Stamp | None = None
        size = None
        if obj is None:
            check_regular(self.path)
            st = os.stat(self.path)
            self._stamp, size = Stamp.of(self.path, st), st.st_size
        loaded = load_pickle(self.path, unsafe_pickle=unsafe_pickle) if obj is None else obj
        sd, note = select_state_dict(loaded, self.path, key)
        for name, value in sd.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} is a {type(value).__name__}, not a tensor"
                )
            check_plain(value, name, self.path)
            # A broadcast view (`expand`) is saved as its small storage: a 2 KB pickle can
            # declare a 16 GB tensor, which the soup would then allocate and write.
            nbytes = value.numel() * value.element_size()
            if size is not None and nbytes > size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} of shape {list(value.shape)} declares "
                    f"{nbytes} bytes in a {size}-byte file (a broadcast view?); save it "
                    "with .contiguous() if it is real"
                )
        names, self.notes = normalise_keys(list(sd), self.path)
        if note:
            self.notes.insert(0, note)
        self._tensors = {name: sd[raw] for name, raw in names.items()}
        for name, t in self._tensors.items():
            self.infos[name] = TensorInfo(name, tuple(t.shape), tensor_dtype(t, name, self.path),
                                          self.path)  # fmt: skip

    def get(self, name: str) -> torch.Tensor:
        # the tensors view the file through a memory map: see SafetensorsFile.array
        self.check_unchanged()
        return self._tensors[name]

    def check_unchanged(self) -> None:
        if self._stamp is not None:
            self._stamp.check()

    def close(self) -> None:
        self._tensors = {}
