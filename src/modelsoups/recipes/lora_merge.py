"""`lora_soup(..., merge_into=BASE)`: the full model W₀ + Σ wᵢ·sᵢ·Bᵢ·Aᵢ, streamed.

The base is read one tensor at a time, in its own order. A weight that a LoRA module
adapts (`<module>.weight`) gets the soup's update B·A (transposed for embeddings and for
`fan_in_fan_out` layers such as GPT-2's Conv1D, which store W as k × d); a tensor in
`modules_to_save` is replaced by the adapters' average of it; every other tensor is
copied. Memory holds the largest adapted weight a few times (W₀ widened, ΔW, the result),
never the model. Config and tokenizer files are copied from a base folder, so the output
loads with `AutoModel*.from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..average import soup_tensor
from ..dtypes import DType, to_numpy
from ..errors import IncompatibleError, SoupError
from ..io import HFFolder, open_checkpoint
from ..io.adapter import PREFIX
from ..io.folder import copy_model_files
from ..io.writer import Entry, OutputPlan, ShardedWriter, atomic_path
from ..lora_plan import module_factors
from ..types import Progress, SoupResult

if TYPE_CHECKING:
    import numpy as np

    from ..candidate import LazyCheckpoint
    from ..io.base import Checkpoint
    from ..lora_plan import LoraPlan

__all__ = ["merged_candidate", "write_merged"]


def _targets(plan: LoraPlan, base: Checkpoint) -> dict[str, str]:
    """Base-model key -> LoRA module it receives, checked against the base's shapes."""
    first = plan.adapters[0]
    targets: dict[str, str] = {}
    for name, m in first.modules.items():
        key = f"{name}.weight"
        if key not in base.infos:
            raise IncompatibleError(
                f"{base.path}: has no tensor {key!r}, which the adapters modify; is this the "
                f"base model of {first.path} ({first.base_model})?"
            )
        if len(m.a_shape) != 2:
            raise SoupError(
                f"{first.path}: module {name!r} is a convolution LoRA; --merge-into handles "
                "linear and embedding layers (write the adapter soup instead)"
            )
        d, k = m.b_shape[0], m.a_shape[1]
        want = (k, d) if (m.embedding or first.fan_in_fan_out) else (d, k)
        if base.infos[key].shape != want:
            raise IncompatibleError(
                f"{base.path}: tensor {key!r} has shape {list(base.infos[key].shape)} but the "
                f"adapters' update of it is {list(want)}"
            )
        targets[key] = name
    for key, raw in first.extras.items():
        shape = first.weights.infos[raw].shape
        if key not in base.infos or base.infos[key].shape != shape:
            raise IncompatibleError(
                f"{base.path}: has no tensor {key!r} of shape {list(shape)} to replace with the "
                f"adapters' {raw!r} (modules_to_save)"
            )
    return targets


def _merged(
    plan: LoraPlan, base: Checkpoint, key: str, module: str, acc: DType, out: DType
) -> np.ndarray:
    """W₀ + B·A for one adapted weight, accumulated in `acc`, rounded to `out`."""

    A, B = module_factors(plan, module)
    t = acc.to_torch()
    delta = B.to(t) @ A.to(t)
    if plan.adapters[0].modules[module].embedding or plan.adapters[0].fan_in_fan_out:
        delta = delta.T
    merged = base.get(key).to(t) + delta  # a new tensor: the base is never written to
    return to_numpy(merged.to(out.to_torch()).contiguous())


def write_merged(
    plan: LoraPlan,
    base_path: Path,
    out: Path,
    meta: dict[str, str],
    *,
    overwrite: bool,
    max_shard_size: int | None,
    progress: Progress | None,
) -> SoupResult:
    """Stream the merged model into `out` (a folder, or a `*.safetensors` file)."""
    accumulate, dtype = plan.accumulate, plan.dtype
    base = open_checkpoint(base_path)
    try:
        targets = _targets(plan, base)
        entries = [
            Entry(n, dtype if (dtype is not None and i.is_float) else i.dtype, i.shape)
            for n, i in base.infos.items()
        ]
        folder = out.suffix != ".safetensors"
        extras = plan.adapters[0].extras
        done, total = 0, base.nbytes
        with atomic_path(out, folder=folder, overwrite=overwrite) as tmp:
            writer = ShardedWriter(tmp, OutputPlan(out, entries, meta, folder, max_shard_size))
            try:
                for e in entries:
                    if e.name in targets:
                        data = _merged(plan, base, e.name, targets[e.name], accumulate, e.dtype)
                    elif e.name in extras:  # modules_to_save: the adapters' mean
                        data = plan.saved_tensor(PREFIX + e.name, e.dtype)
                    elif e.dtype == base.infos[e.name].dtype:  # untouched by the adapters
                        data = base.array(e.name)
                    else:
                        data = soup_tensor(e.name, [base], [1.0], accumulate=accumulate,
                                           dtype=e.dtype, allow_nonfinite=True)  # fmt: skip
                    writer.write(e.name, data)
                    done += base.infos[e.name].nbytes
                    if progress is not None:
                        progress(done, total)
                writer.close()
            finally:
                writer.abort()
            from_folder = folder and isinstance(base, HFFolder)
            copied = copy_model_files(base.path, tmp) if from_folder else []
    finally:
        base.close()
    result = SoupResult(out, "", [], [], len(entries), sum(e.nbytes for e in entries))
    result.notes.append(f"merged into {base_path} ({len(targets)} weights updated)")
    if copied:
        result.notes.append(f"copied {len(copied)} model files from {base_path}")
    return result


def merged_candidate(candidate: Checkpoint, base_path: Path) -> LazyCheckpoint:
    """An adapter candidate (`candidate.as_adapter`: PEFT keys and an `adapter_config`)
    merged into the base, computed tensor by tensor when read: W₀ + s·B·A for each adapted
    weight, its `modules_to_save` tensors, the base's other tensors as they are, and the
    base's config and tokenizer files (a base folder). `close()` closes the base."""
    from ..candidate import LazyCheckpoint, adapter_config
    from ..dtypes import to_torch
    from ..io.adapter import adapter_of
    from ..lora_plan import LoraPlan

    config = adapter_config(candidate)
    if config is None:
        raise SoupError(f"{candidate.path}: not an adapter candidate; nothing to merge")
    adapter = adapter_of(candidate, config)
    plan, base = LoraPlan([adapter], [1.0]), open_checkpoint(base_path)
    try:
        targets = _targets(plan, base)
    except BaseException:
        base.close()
        raise

    def compute_array(key: str) -> np.ndarray:
        dtype = base.infos[key].dtype
        if key in targets:
            return _merged(plan, base, key, targets[key], plan.accumulate, dtype)
        if key in adapter.extras:  # modules_to_save: the candidate's own
            return plan.saved_tensor(adapter.extras[key], dtype)
        return base.array(key)

    return LazyCheckpoint(
        f"<{candidate.path} merged into {base_path}>", base.infos,
        lambda key: to_torch(compute_array(key), base.infos[key].dtype),
        compute_array=compute_array, on_close=base.close,
        model_files_from=base.path if isinstance(base, HFFolder) else None,
    )  # fmt: skip
