"""LoRA adapters in `soup inspect`, `soup uniform` and `soup weighted`.

When every input is a PEFT adapter folder, these commands soup the adapters exactly
(`recipes/lora.py`) instead of averaging files; `options.LoraOptions` apply only then.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SoupError
from .common import progress_bar, report_result, say
from .options import LoraOptions, MeanOptions, WeightOptions, linear_weights


def refuse_lora_options(lora: LoraOptions) -> None:
    """Adapter options on inputs that are not adapters: one line, not a silent no-op."""
    options = lora.given()
    if options:
        flag = "--" + next(iter(options)).replace("_", "-").replace("average", "lora-average")
        raise SoupError(f"{flag} applies to PEFT LoRA adapters; these inputs are not adapters")


def soup_adapters(
    paths: list[Path],
    output: Path,
    recipe: str,
    mean: MeanOptions,
    weighting: WeightOptions | None,
) -> None:
    """`soup uniform/weighted` on adapters: the exact soup (or what the options ask).
    `--key` and `--non-float` have no meaning for adapters and are not passed on."""
    from ..recipes.lora import lora_soup

    weights, normalize, allow_negative = linear_weights(weighting)
    read, write, average = mean.read, mean.write, mean.average
    given = mean.lora.given()
    dtype, max_shard_size = write.output_dtype(), write.shard_bytes()
    with progress_bar(f"{recipe} adapter soup") as bar:
        result = lora_soup(
            paths, output, weights=weights, normalize=normalize, allow_negative=allow_negative,
            dtype=dtype, accumulate=average.accumulate, allow_nonfinite=average.allow_nonfinite,
            max_shard_size=max_shard_size, unsafe_pickle=read.unsafe_pickle,
            overwrite=write.overwrite, recipe=recipe, progress=bar, **given,
        )  # fmt: skip
    report_result(result)
    errors = result.extra.get("errors") or {}
    if errors and given.get("rank") is not None:
        for module, e in errors.items():
            say(f"  {module}: relative error {e:.3g}")


def print_adapters(inputs: list[Path], allow_different_base: bool) -> None:
    """`soup inspect` of adapters: one paragraph each, then the verdict (exit 1 if the set
    cannot be souped)."""
    from ..adapters import inspect_adapters
    from ..errors import IncompatibleError

    summaries, ok, verdict = inspect_adapters(inputs, allow_different_base=allow_different_base)
    for s in summaries:
        print(f"{s.path}: PEFT LoRA adapter, {s.modules} modules, {s.parameters:,} parameters")
        print(f"  base model       {s.base_model or '?'}")
        print(f"  r                {', '.join(map(str, s.ranks))}")
        print(f"  alpha            {', '.join(f'{a:g}' for a in s.alphas)}")
        print(f"  rsLoRA           {'yes' if s.rslora else 'no'}")
        print(f"  target modules   {s.target_modules}")
        print(f"  modules_to_save  {', '.join(s.modules_to_save) or '-'}")
    if not ok:
        raise IncompatibleError(verdict.removeprefix("incompatible: "))
    print(verdict)
