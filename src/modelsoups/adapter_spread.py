"""N LoRA adapters written in one shared rank-R space, as lazy checkpoints (`SpreadAdapter`).

The math is in `adapter_space.py`: adapter i becomes Aᵢ' = [A₁; …; A_N] (stacked on the
rank axis, R = Σ rⱼ) and Bᵢ' = [0 | … | sᵢ·Bᵢ | … | 0], so that Bᵢ'·Aᵢ' = sᵢ·Bᵢ·Aᵢ.

Memory is flat in N. A `SpreadAdapter` holds no tensor: `get(key)` reads the factors it
needs from the adapters' files (`io.adapter_files.ReopenedFiles`: memory-mapped, opened in
whichever process reads) and builds Aᵢ' or Bᵢ' then, one key at a time; its
`modules_to_save` tensors are the file's own (read-only views of the map). What the N
ingredients share (`Layout`: paths, stamps, each adapter's keys, scales and columns) is
metadata, a few hundred bytes per adapter and module. The price is reading: each A key read
gathers N slices of N files; recipes read each key once per candidate.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .adapters import check_adapters
from .dtypes import as_dtype
from .errors import IncompatibleError, InputChangedError, NonFiniteError
from .io.adapter import LoraAdapter, open_adapter
from .io.adapter_files import ReopenedFiles, private_copy
from .io.base import Checkpoint, TensorInfo
from .io.files import Stamps, first_change, stamps
from .io.safetensors_file import SafetensorsFile

if TYPE_CHECKING:
    import torch

__all__ = ["Layout", "SpreadAdapter", "spread_adapters"]


@dataclass
class Layout:
    """Where every key of the shared space comes from (shared by a space's ingredients)."""

    files: ReopenedFiles  # the N adapters' safetensors files, then the base (if any)
    a_keys: list[dict[str, str]]  # per adapter: space key of an A -> its own key
    b_keys: list[dict[str, str]]  # per adapter: space key of a B -> its own key
    scales: list[dict[str, float]]  # per adapter: space key of a B -> sᵢ
    columns: list[dict[str, int]]  # per adapter: space key of a B -> its first column
    base: int | None  # index in `files` of the base model (the zero adapter's M₀)
    saved: dict[str, str]  # space key of a modules_to_save tensor -> base-model name


class SpreadAdapter(Checkpoint):
    """Adapter `index` of a `Layout` in the shared rank-R space (None: the zero adapter,
    B = 0 and the base's `modules_to_save` tensors). Tensors are built on `get`, from the
    files; it pickles into a worker process as metadata and reads the files there.

    It reads like a (read-only) state dict too: `sd[key]`, `keys()`, `items()`, `dict(sd)`.
    """

    portable = True

    def __init__(
        self, label: str, layout: Layout, index: int | None, infos: dict[str, TensorInfo]
    ) -> None:
        super().__init__(Path(label), "adapter space", dict(infos))
        self.layout, self.index = layout, index

    def get(self, name: str) -> torch.Tensor:
        import torch

        s, i = self.layout, self.index
        if name in s.a_keys[0]:
            f32 = torch.float32
            return torch.cat([s.files.read(j, k[name]).to(f32) for j, k in enumerate(s.a_keys)])
        if name in s.b_keys[0]:
            wide = torch.zeros(self.infos[name].shape, dtype=torch.float32)
            if i is not None:
                b = s.files.read(i, s.b_keys[i][name])
                block = wide[:, s.columns[i][name] : s.columns[i][name] + b.shape[1]]
                block.copy_(b)
                block.mul_(s.scales[i][name])  # sᵢ·Bᵢ in float32, as b.float() * sᵢ
            return wide
        if i is None:
            assert s.base is not None
            return s.files.read(s.base, s.saved[name]).to(self.infos[name].dtype.to_torch())
        return s.files.read(i, name)

    def check_unchanged(self) -> None:
        self.layout.files.check_unchanged()

    def close(self) -> None:
        """Unmap the files (shared by the space's ingredients; reopened when next read)."""
        self.layout.files.close()

    # a read-only state dict
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.infos:
            raise KeyError(name)
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return ((k, self.get(k)) for k in self.infos)

    def values(self) -> Iterator[torch.Tensor]:
        return (self.get(k) for k in self.infos)


def spread_adapters(
    inputs: Sequence[Path],
    base: Path | None,
    *,
    allow_different_base: bool,
    unsafe_pickle: bool,
) -> tuple[list[LoraAdapter], list[SpreadAdapter], SpreadAdapter | None]:
    """Open, check and index the adapters (one at a time: see `_read_one`); return them
    (closed: their headers), their spread ingredients and the zero adapter (with `base`)."""
    adapters: list[LoraAdapter] = []
    files: list[Path] = []
    owned: list[Path | None] = [None]  # the private folder of converted .bin adapters
    try:
        stamped = [_read_one(p, unsafe_pickle, adapters, files, owned) for p in inputs]
        check_adapters(adapters, allow_different_base=allow_different_base)
        if base is not None:
            _check_base(adapters[0], base)
            files.append(base)
            stamped.append(stamps(base))
        reopened = ReopenedFiles(files, stamps=stamped, owned=owned[0])
    except BaseException:
        if owned[0] is not None:
            shutil.rmtree(owned[0], ignore_errors=True)
        raise
    layout, infos = _layout(adapters, reopened, base is not None)
    spread = [SpreadAdapter(str(a.path), layout, i, infos[i]) for i, a in enumerate(adapters)]
    zero = None
    if base is not None:
        zero = SpreadAdapter(f"<base {base}>", layout, None, infos[0])
    return adapters, spread, zero


def _read_one(
    path: Path,
    unsafe_pickle: bool,
    adapters: list[LoraAdapter],
    files: list[Path],
    owned: list[Path | None],
) -> Stamps:
    """Open one adapter, check that every tensor is finite, note its safetensors file (a
    private copy of a `.bin`), close it: one adapter's tensors in memory at a time. Returns
    the file's stamp, refusing a file that changed while it was read."""
    from .lora_plan import one_thread

    adapter = open_adapter(path, unsafe_pickle=unsafe_pickle)
    try:
        weights = adapter.weights
        if isinstance(weights, SafetensorsFile):
            file, before = weights.path, stamps(weights.path)
        else:
            file, owned[0] = private_copy(weights, owned[0], str(len(files)))
            before = stamps(file)
        with one_thread():  # small tensors (see lora_plan)
            _check_finite(weights)
    finally:
        adapter.close()
    found = first_change(before, stamps(file))
    if found is not None:
        raise InputChangedError(f"{found[0]}: changed while it was read ({found[1]}); run it again")
    adapters.append(adapter)  # closed: its config, modules and tensor headers remain
    files.append(file)
    return before


def _check_finite(weights: Checkpoint) -> None:
    """A NaN or Inf in any adapter tensor raises, naming the file and the tensor."""
    import torch

    for key in weights.infos:
        t = weights.get(key)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{weights.path}: tensor {key!r} holds NaN or Inf")


def _check_base(first: LoraAdapter, base: Path) -> None:
    """The base must hold each `modules_to_save` tensor of the adapters, same shape."""
    from .io import open_checkpoint

    if not first.extras:
        return
    with open_checkpoint(base) as ckpt:
        for name, key in first.extras.items():
            info, want = ckpt.infos.get(name), first.weights.infos[key]
            if info is None or info.shape != want.shape or info.is_float != want.is_float:
                raise IncompatibleError(
                    f"{base}: has no tensor {name!r} of shape {list(want.shape)} (the "
                    f"adapters' modules_to_save); is it the base model of {first.path}?"
                )


def _layout(
    adapters: Sequence[LoraAdapter], files: ReopenedFiles, has_base: bool
) -> tuple[Layout, list[dict[str, TensorInfo]]]:
    """The shared layout, and each adapter's infos (float32 factors of rank R; its own
    `modules_to_save` tensors as they are)."""
    first, f32 = adapters[0], as_dtype("float32")
    layout = Layout(files, [{} for _ in adapters], [{} for _ in adapters],
                    [{} for _ in adapters], [{} for _ in adapters],
                    len(adapters) if has_base else None,
                    {key: name for name, key in first.extras.items()})  # fmt: skip
    shapes: dict[str, tuple[int, ...]] = {}
    for name, m in first.modules.items():
        column = 0
        for i, a in enumerate(adapters):
            own = a.modules[name]
            layout.a_keys[i][m.a_key], layout.b_keys[i][m.b_key] = own.a_key, own.b_key
            layout.scales[i][m.b_key], layout.columns[i][m.b_key] = a.scale(name), column
            column += own.rank
        shapes[m.a_key] = (column, *m.a_shape[1:])
        shapes[m.b_key] = (m.b_shape[0], column, *m.b_shape[2:])
    infos: list[dict[str, TensorInfo]] = []
    for a in adapters:
        label = a.weights.path
        infos.append({k: TensorInfo(k, shape, f32, label) for k, shape in shapes.items()})
        for key in first.extras.values():
            info = a.weights.infos[key]
            infos[-1][key] = TensorInfo(key, info.shape, info.dtype, label)
    return layout, infos
