"""Exact soups of LoRA adapters (PEFT folders), as an adapter or merged into the base.

A LoRA module adds ΔW = s·B·A to the base weight W₀ (B: d × r, A: r × k, s = α/r, or α/√r
with `use_rslora`). The soup of N adapters with weights wᵢ (uniform: wᵢ = 1/N) is

    W = W₀ + Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ

which is exactly one LoRA of rank Σrᵢ: A = [A₁; …; A_N] stacked on the rank axis,
B = [w₁s₁B₁ | … | w_N s_N B_N], scale 1 (α = rank, no rsLoRA). Nothing is lost, whatever
the ranks and alphas of the ingredients (`lowrank.concat_factors`). Whole tensors in
`modules_to_save` are averaged with the usual streaming kernel (`average.soup_tensor`).

Options depart from the exact soup only when asked: `rank=K` keeps the best rank-K
approximation of each module's B·A (truncated SVD; the relative Frobenius error of each
module goes into the output's metadata), `average="factors"` averages A and B separately
(what a plain average of the files gives; its error is measured and warned about), and
`merge_into=BASE` writes the full model W₀ + Σ wᵢsᵢBᵢAᵢ instead of an adapter
(`recipes/lora_merge.py`).

Averaging adapters trained from one base is the model soup of Wortsman et al. 2022
(https://arxiv.org/abs/2203.05482) restricted to the low-rank updates.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import check_adapters, open_adapters, soup_config
from ..average import accumulate_dtype, output_dtype, soup_tensor
from ..check import resolve_weights
from ..dtypes import DType, to_numpy
from ..errors import OutputError, SoupError
from ..io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..io.writer import Entry, OutputPlan, ShardedWriter, atomic_path, check_output
from ..lora_plan import AVERAGES, LoraPlan, module_factors
from ..stream import provenance
from ..types import PathLike, Progress, SoupResult

if TYPE_CHECKING:
    import torch

__all__ = ["lora_soup"]


def lora_soup(
    inputs: Sequence[PathLike],
    out: PathLike,
    *,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    allow_negative: bool = False,
    rank: int | None = None,
    average: str = "exact",
    merge_into: PathLike | None = None,
    allow_different_base: bool = False,
    dtype: str | DType | torch.dtype | None = None,
    accumulate: str = "float32",
    allow_nonfinite: bool = False,
    max_shard_size: int | None = None,
    unsafe_pickle: bool = False,
    overwrite: bool = False,
    recipe: str = "weighted",
    progress: Progress | None = None,
) -> SoupResult:
    """Soup PEFT LoRA adapters exactly: an adapter folder of rank Σrᵢ, or a merged model.

    Args:
        inputs: PEFT adapter folders (or their `adapter_model.*` files) of one base model.
        out: the output folder (a PEFT adapter; with `merge_into`, a model folder, or a
            `*.safetensors` file).
        weights: one per adapter (`None`: uniform), normalised to sum 1 unless told not to.
        rank: compress each module to this rank (truncated SVD); errors in the metadata.
        average: `"exact"` (default) or `"factors"` (naive: average A and B separately).
        merge_into: a base model (folder or file): write W₀ + Σ wᵢsᵢBᵢAᵢ, streamed.
        allow_different_base: soup adapters whose `base_model_name_or_path` differ.
        dtype: output float dtype (default: the adapters' or the base's).

    Returns:
        A `SoupResult`; `extra["errors"]` holds each module's relative error when `rank`
        or `average="factors"` was used.

    Example:
        >>> lora_soup(["runs/a", "runs/b"], "soup-adapter")  # doctest: +SKIP
    """
    started = time.perf_counter()
    paths, out = [Path(p) for p in inputs], Path(out)
    _check_options(rank, average)
    check_output(out, paths + ([Path(merge_into)] if merge_into else []))
    if merge_into is None and out.suffix == ".safetensors":
        raise OutputError(f"{out}: an adapter soup is a folder; drop the .safetensors suffix")
    adapters = open_adapters(paths, unsafe_pickle=unsafe_pickle)
    try:
        w = resolve_weights(weights, len(adapters), normalize=normalize,
                            allow_negative=allow_negative)  # fmt: skip
        check_adapters(adapters, allow_different_base=allow_different_base)
        plan = LoraPlan(adapters, w, average, rank, accumulate_dtype(accumulate),
                        output_dtype(dtype), allow_nonfinite)  # fmt: skip
        if rank is not None or average == "factors":
            plan.computed = {m: module_factors(plan, m) for m in adapters[0].modules}
        meta = provenance(recipe, [a.weights for a in adapters], w, lora_average=average,
                          lora_rank=rank, lora_errors=plan.errors)  # fmt: skip
        if merge_into is not None:
            from .lora_merge import write_merged

            result = write_merged(plan, Path(merge_into), out, meta, overwrite=overwrite,
                                  max_shard_size=max_shard_size, progress=progress)  # fmt: skip
        else:
            result = _write_adapter(plan, out, meta, overwrite=overwrite)
    finally:
        for a in adapters:
            a.close()
    result.recipe, result.ingredients, result.weights = recipe, paths, w
    result.seconds = time.perf_counter() - started
    result.extra["errors"] = dict(plan.errors)
    _describe(result, plan)
    return result


def _check_options(rank: int | None, average: str) -> None:
    if average not in AVERAGES:
        raise SoupError(f"lora average must be one of {', '.join(AVERAGES)}, got {average!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise SoupError(f"rank must be a positive integer, got {rank!r}")
    if rank is not None and average == "factors":
        raise SoupError(
            "--rank compresses the exact soup; it does not go with --lora-average factors"
        )


def _describe(result: SoupResult, plan: LoraPlan) -> None:
    """Warnings and notes on what the options cost."""
    if not plan.errors:
        return
    worst = max(plan.errors, key=lambda m: plan.errors[m])
    if plan.average == "factors":
        result.warnings.append(
            f"--lora-average factors is not the soup: mean(B)·mean(A) differs from mean(B·A) "
            f"by {plan.errors[worst]:.3g} (relative Frobenius error, module {worst!r}); "
            "the default (exact) has no error"
        )
    else:
        result.notes.append(
            f"rank {plan.rank}: relative Frobenius error up to {plan.errors[worst]:.3g} "
            f"(module {worst!r}; every module's error is in the output metadata)"
        )


def _cast(x: torch.Tensor, dtype: DType) -> Any:
    return to_numpy(x.to(dtype.to_torch()).contiguous())


def _write_adapter(
    plan: LoraPlan,
    out: Path,
    meta: dict[str, str],
    *,
    overwrite: bool,
) -> SoupResult:
    """Write the soup as a PEFT adapter folder: config + one safetensors file."""
    first, dtype = plan.adapters[0], plan.dtype
    ranks = {m: plan.out_rank(m) for m in first.modules}
    entries: list[Entry] = []
    for name, m in first.modules.items():
        a_dtype = dtype or first.weights.infos[m.a_key].dtype
        entries.append(Entry(m.a_key, a_dtype, (ranks[name], *m.a_shape[1:])))
        b_dtype = dtype or first.weights.infos[m.b_key].dtype
        entries.append(Entry(m.b_key, b_dtype, (m.b_shape[0], ranks[name], *m.b_shape[2:])))
    for key in first.extras.values():
        info = first.weights.infos[key]
        entries.append(Entry(key, dtype if dtype and info.is_float else info.dtype, info.shape))
    srcs, dtypes = [a.weights for a in plan.adapters], {e.name: e.dtype for e in entries}
    with atomic_path(out, folder=True, overwrite=overwrite) as tmp:
        file = tmp / ADAPTER_WEIGHTS[0]
        writer = ShardedWriter(file, OutputPlan(file, entries, meta, folder=False))
        try:
            for name, m in first.modules.items():
                A, B = module_factors(plan, name)
                writer.write(m.a_key, _cast(A, dtypes[m.a_key]))
                writer.write(m.b_key, _cast(B, dtypes[m.b_key]))
            for key in first.extras.values():
                mean = soup_tensor(key, srcs, plan.weights, accumulate=plan.accumulate,
                                   dtype=dtype, allow_nonfinite=plan.allow_nonfinite)  # fmt: skip
                writer.write(key, mean)
            writer.close()
        finally:
            writer.abort()
        config = soup_config(first.config, ranks)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    total = sum(e.nbytes for e in entries)
    return SoupResult(out, "", [], [], len(entries), total)
