"""`soup demo`: the paper's experiment, offline, on a real pretrained model and real data.

Only option parsing lives here; torch and transformers are imported when the command runs,
so `soup --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import SoupError
from ..executor import MAX_WORKERS

__all__ = ["demo", "parse_seeds", "register"]

MAX_SEEDS = 1000  # each seed is a whole hyperparameter search


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-4' → a list of distinct seeds, in order."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if part[0] != "-" else (part, part)
                if int(hi) - int(lo) >= MAX_SEEDS:  # was: a list of 10¹² seeds, built
                    raise SoupError(f"--seeds: at most {MAX_SEEDS} seeds, got {part[:40]!r}")
                seeds.extend(range(int(lo), int(hi) + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise SoupError(f"--seeds: expected integers like 0,1,2 or 0-4, got {text!r}") from None
    if not seeds:
        raise SoupError(f"--seeds: no seed in {text!r}; e.g. --seeds 0,1,2,3,4")
    return list(dict.fromkeys(seeds))


def demo(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for report.json, figure.png, soups.")
    ] = Path("soup-demo"),
    ingredients: Annotated[
        int, typer.Option("--ingredients", help="Fine-tuned ingredients per seed.")
    ] = 8,
    seeds: Annotated[
        str, typer.Option("--seeds", help="Seeds of the hyperparameter search, e.g. 0,1,2,3,4.")
    ] = "0",
    quick: Annotated[
        bool, typer.Option("--quick", help="Same code path on little data (~30 s).")
    ] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore and rebuild the cache.")] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Cache folder (default: ~/.cache/modelsoups/demo)."),
    ] = None,
    time_budget: Annotated[
        float | None,
        typer.Option(
            "--time-budget",
            help="Seconds for the whole run (default: 300 per seed; 0: no limit); when the "
            "machine is too slow for --ingredients, fewer are trained (at least 4).",
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", help="Worker processes for fine-tuning and scoring.")
    ] = 2,
    ray: Annotated[bool, typer.Option("--ray", help="Run the jobs on Ray instead.")] = False,
) -> None:
    """Fine-tune all-MiniLM-L6-v2 on movie reviews into N ingredients, soup them, and
    compare soups with the best individual model on held-out, test and shifted data."""
    if not 2 <= ingredients <= MAX_SEEDS:
        raise SoupError(f"--ingredients must be from 2 to {MAX_SEEDS}, got {str(ingredients)[:40]}")
    if not 1 <= workers <= MAX_WORKERS:
        raise SoupError(f"--workers must be from 1 to {MAX_WORKERS}, got {str(workers)[:40]}")
    from ..demo.run import DemoConfig, run_demo

    config = DemoConfig(
        out=out,
        ingredients=ingredients,
        seeds=parse_seeds(seeds),
        quick=quick,
        fresh=fresh,
        cache_dir=cache_dir,
        time_budget=time_budget,
        workers=workers,
        ray=ray,
    )
    run_demo(config)


def register(app: typer.Typer) -> None:
    """Add the `demo` subcommand to the `soup` app."""
    app.command()(demo)
