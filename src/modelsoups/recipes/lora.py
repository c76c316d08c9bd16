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

Weights that do not sum to one (`normalize=False`: task arithmetic, WiSE-FT's α·adapter)
make the soup a task-vector sum W₀ + Σ wᵢ·ΔWᵢ, which is what the LoRA modules give as they
are. A tensor in `modules_to_save` is stored whole (M, not M − M₀), so its share of that
sum is M₀ + Σ wᵢ(Mᵢ − M₀) = (1 − Σwᵢ)·M₀ + Σ wᵢ·Mᵢ: it needs the base model's M₀, read
from `base` (or `merge_into`). Without either, such a soup is refused: averaging the Mᵢ
with weights that do not sum to one would scale the trained head, not add a task vector.

Averaging adapters trained from one base is the model soup of Wortsman et al. 2022
(https://arxiv.org/abs/2203.05482) restricted to the low-rank updates.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapters import check_adapters, open_adapters, soup_config
from ..average import accumulate_dtype, output_dtype
from ..candidate import write_candidate
from ..check import resolve_weights
from ..errors import OutputError, SoupError
from ..io import open_checkpoint
from ..io.adapter import LoraAdapter
from ..io.writer import check_output
from ..lora_plan import AVERAGES, LoraPlan, module_factors, soup_checkpoint
from ..stream import provenance
from ..types import PathLike, Progress, SoupResult

if TYPE_CHECKING:
    import torch

    from ..dtypes import DType

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
    base: PathLike | None = None,
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
        out: a PEFT adapter folder (with `merge_into`: a model folder or `*.safetensors`).
        weights: one per adapter (`None`: uniform), normalised to sum 1 unless told not to.
        rank: compress each module to this rank (truncated SVD); errors in the metadata.
        average: `"exact"` (default) or `"factors"` (naive: average A and B separately).
        merge_into: a base model (folder or file): write W₀ + Σ wᵢsᵢBᵢAᵢ, streamed.
        base: the base model, read only for `modules_to_save` tensors when the weights do
            not sum to one (see the module doc; default: `merge_into`).
        allow_different_base: soup adapters whose `base_model_name_or_path` differ.
        dtype: output float dtype (default: the adapters' or the base's).

    Returns:
        A `SoupResult`; `extra["errors"]`: each module's relative error (rank, factors).

    Example:
        >>> lora_soup(["runs/a", "runs/b"], "soup-adapter")  # doctest: +SKIP
    """
    started, paths, out = time.perf_counter(), [Path(p) for p in inputs], Path(out)
    _check_options(rank, average, out, merge_into)
    check_output(out, paths + [Path(p) for p in (merge_into, base) if p is not None])
    adapters = open_adapters(paths, unsafe_pickle=unsafe_pickle)
    try:
        w = resolve_weights(weights, len(adapters), normalize=normalize,
                            allow_negative=allow_negative)  # fmt: skip
        check_adapters(adapters, allow_different_base=allow_different_base)
        plan = LoraPlan(adapters, w, average, rank, accumulate_dtype(accumulate),
                        output_dtype(dtype), allow_nonfinite)  # fmt: skip
        result = _write(plan, out, base or merge_into, merge_into, recipe, overwrite=overwrite,
                        max_shard_size=max_shard_size, progress=progress)  # fmt: skip
    finally:
        for a in adapters:
            a.close()
    result.recipe, result.ingredients, result.weights = recipe, paths, w
    result.seconds = time.perf_counter() - started
    return _describe(result, plan)


def _write(
    plan: LoraPlan,
    out: Path,
    base: PathLike | None,
    merge_into: PathLike | None,
    recipe: str,
    **options: object,
) -> SoupResult:
    """Open the base if the soup needs it, compute what goes in the header, write."""
    adapters = plan.adapters
    if adapters[0].extras and abs(sum(plan.weights) - 1.0) > 1e-9 and base is not None:
        plan.base = open_checkpoint(base)
    try:
        for key in adapters[0].extras.values():
            plan.saved_tensor_source(key)  # a task-vector sum without its base fails now
        if plan.rank is not None or plan.average == "factors":
            plan.computed = {m: module_factors(plan, m) for m in adapters[0].modules}
        meta = provenance(recipe, [a.weights for a in adapters], plan.weights,
                          lora_average=plan.average, lora_rank=plan.rank,
                          lora_errors=plan.errors)  # fmt: skip
        if merge_into is not None:
            from .lora_merge import write_merged

            return write_merged(plan, Path(merge_into), out, meta, **options)  # type: ignore[arg-type]
        return _write_adapter(plan, out, meta, overwrite=bool(options["overwrite"]))
    finally:
        if plan.base is not None:
            plan.base.close()


def _check_options(rank: int | None, average: str, out: Path, merge_into: object) -> None:
    if average not in AVERAGES:
        raise SoupError(f"lora average must be one of {', '.join(AVERAGES)}, got {average!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise SoupError(f"rank must be a positive integer, got {rank!r}")
    if rank is not None and average == "factors":
        raise SoupError(
            "--rank compresses the exact soup; it does not go with --lora-average factors"
        )
    if merge_into is None and out.suffix == ".safetensors":
        raise OutputError(f"{out}: an adapter soup is a folder; drop the .safetensors suffix")


def _describe(result: SoupResult, plan: LoraPlan) -> SoupResult:
    """`result` with the modules' errors, and warnings or notes on what the options cost."""
    result.extra["errors"] = dict(plan.errors)
    if not plan.errors:
        return result
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
    return result


def _write_adapter(
    plan: LoraPlan, out: Path, meta: dict[str, str], *, overwrite: bool
) -> SoupResult:
    """Write the soup as a PEFT adapter folder: config + one safetensors file."""
    first: LoraAdapter = plan.adapters[0]
    soup = soup_checkpoint(plan)
    soup.adapter_config = soup_config(first.config, {m: plan.out_rank(m) for m in first.modules})
    write_candidate(soup, out, metadata=meta, overwrite=overwrite)
    return SoupResult(out, "", [], [], len(soup.infos), soup.nbytes)
