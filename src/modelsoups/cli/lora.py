"""LoRA adapters in `soup inspect`, `soup uniform` and `soup weighted`.

When every input is a PEFT adapter folder, these commands soup the adapters exactly
(`recipes/lora.py`) instead of averaging files; the options below apply only then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import SoupError
from .common import parse_size, progress_bar, report_result, say

MergeInto = Annotated[
    Path | None,
    typer.Option(help="LoRA adapters: write the full model BASE + soup (a base folder/file)."),
]
Rank = Annotated[
    int | None,
    typer.Option(help="LoRA adapters: compress each module to this rank (truncated SVD)."),
]
LoraAverage = Annotated[
    str,
    typer.Option(help="LoRA adapters: 'exact' (rank Σrᵢ) or 'factors' (naive mean of A, B)."),
]
AllowDifferentBase = Annotated[
    bool,
    typer.Option("--allow-different-base", help="LoRA adapters: allow differing base names."),
]


def lora_options(
    merge_into: Path | None, rank: int | None, lora_average: str, allow_different_base: bool
) -> dict[str, Any]:
    """The adapter options as `lora_soup` keywords (empty when none was given)."""
    given = {
        "merge_into": merge_into,
        "rank": rank,
        "average": None if lora_average == "exact" else lora_average,
        "allow_different_base": allow_different_base or None,
    }
    return {k: v for k, v in given.items() if v is not None}


def refuse_lora_options(options: dict[str, Any]) -> None:
    """Adapter options on inputs that are not adapters: one line, not a silent no-op."""
    if options:
        flag = "--" + next(iter(options)).replace("_", "-").replace("average", "lora-average")
        raise SoupError(f"{flag} applies to PEFT LoRA adapters; these inputs are not adapters")


def soup_adapters(
    paths: list[Path],
    output: Path,
    weights: list[float] | None,
    recipe: str,
    lora: dict[str, Any],
    options: dict[str, Any],
) -> None:
    """`soup uniform/weighted` on adapters: the exact soup (or what the options ask)."""
    from ..recipes.lora import lora_soup

    for name in ("key", "non_float"):  # file-soup options with no meaning for adapters
        options.pop(name, None)
    options["max_shard_size"] = parse_size(options["max_shard_size"])
    with progress_bar(f"{recipe} adapter soup") as bar:
        result = lora_soup(
            paths, output, weights=weights, recipe=recipe, progress=bar, **lora, **options
        )
    report_result(result)
    errors = result.extra.get("errors") or {}
    if errors and lora.get("rank") is not None:
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
