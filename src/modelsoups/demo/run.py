"""`soup demo`, top to bottom: prepare once, then per seed fine-tune, soup, score, report.

prepare (data, cached frozen features, linear probe = the shared start)
for each seed:
    fine-tune N ingredients from the start        (executor: worker processes / Ray)
    soups from the ingredients                    (modelsoups' public API, held-out only)
    score soups on held-out / test / shift        (executor)
report.json, figure.png, HF model folders, a table
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from rich.console import Console
from safetensors.torch import load_file

from ..errors import SoupError
from .budget import (
    DEFAULT_BUDGET,
    MIN_INGREDIENTS,
    OVERHEAD,
    Costs,
    another_round_fits,
    ingredients_that_fit,
    unit_seconds,
)
from .figure import write_figure
from .prepare import Prepared, default_cache_dir, prepare
from .report import build_report, export_soups, print_table, write_report
from .scoring import accuracy
from .soups import (
    LEARNED_EPOCHS,
    RECIPES,
    SELECTED,
    ScoreTask,
    SoupTask,
    build_soup,
    cached_soup,
    ensembles,
    finish_soup,
    soup_job,
    soup_key,
)

if TYPE_CHECKING:
    from ..executor import LocalExecutor
    from ..executor_ray import RayExecutor
from .train import IngredientTask, cached_result, fine_tune, sample_hypers, task_key

__all__ = ["DemoConfig", "run_demo"]

T = TypeVar("T")
R = TypeVar("R")
Log = Callable[[str], None]


@dataclass
class Ingredient:
    """One fine-tuned ingredient: its weights file, hyperparameters, logits, held-out score."""

    name: str
    path: str
    hyper: dict[str, Any]
    logits: dict[str, torch.Tensor]
    held_out: float


@dataclass
class DemoConfig:
    """Options of `soup demo`, one to one."""

    out: Path = Path("soup-demo")
    ingredients: int = 8
    seeds: list[int] = field(default_factory=lambda: [0])
    quick: bool = False  # same code path on less data: 4 ingredients, 1 epoch (tests)
    fresh: bool = False  # ignore (and overwrite) the cache
    cache_dir: Path | None = None
    time_budget: float | None = None  # seconds for the run (None: 300 per seed; 0: no limit)
    workers: int = 2
    ray: bool = False
    export: bool = True  # write the soups as HF model folders


def warm_up(_: int) -> None:
    """Import what the workers' jobs need, so the first real job does not pay for it."""
    from . import soups, train  # noqa: F401


def _executor(cfg: DemoConfig) -> LocalExecutor | RayExecutor:
    """The project's executor, one for the whole run (a `with` block keeps its workers):
    `--workers` local processes, or Ray with `--ray`.

    Ray: a local Ray runtime with `--workers` CPUs (or the cluster in `RAY_ADDRESS`); the
    workers read the cache folder by path, so on a cluster it must be on a shared disk.
    """
    if cfg.ray:
        from ..executor_ray import RayExecutor

        return RayExecutor(num_cpus=cfg.workers)
    from ..executor import LocalExecutor

    return LocalExecutor(cfg.workers)


def _map_with_progress(
    ex: Any, fn: Callable[[T], R], items: Sequence[T], outputs: Sequence[Path], label: str
) -> list[R]:
    """`ex.map(fn, items)` in a thread while a progress bar counts finished items.

    Workers report nothing back until the end, so progress is read from the files they
    write (`outputs`, one per item, counted once newer than the start) — this works the
    same for local processes and Ray.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.time()

    def done() -> int:
        return sum(p.is_file() and p.stat().st_mtime >= t0 for p in outputs)

    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = ex.map(fn, items)
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    cols = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
    )
    with Progress(*cols, TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(label, total=len(items))
        thread.start()
        while thread.is_alive():
            bar.update(task, completed=min(done(), len(items)))
            thread.join(0.5)
    if "error" in result:
        raise result["error"]
    return list(result["value"])


def _train(
    ex: Any, prep: Prepared, cfg: DemoConfig, seed: int, n: int, deadline: float | None, log: Log
) -> list[Ingredient]:
    """Fine-tune (or read from the cache) up to `n` ingredients for one seed, a round of
    `--workers` at a time; with a `deadline` (perf_counter seconds by which the soups must
    be done), stop after a round when another round and the soups would not fit."""
    cache = (cfg.cache_dir or default_cache_dir()) / "ingredients"
    hypers = sample_hypers(n, seed, epochs=1 if cfg.quick else 2)
    tasks = [
        IngredientTask(
            i,
            h,
            str(prep.feature_dir),
            str(prep.init_path),
            prep.config,
            str(cache),
            fresh=cfg.fresh,
        )
        for i, h in enumerate(hypers)
    ]
    results: dict[int, dict[str, Any]] = {}
    for t in tasks:
        if (r := cached_result(t)) is not None:
            results[t.index] = r
    todo = [t for t in tasks if t.index not in results]
    costs, last_round = _costs(cfg, prep), 0.0
    for first in range(0, len(todo), costs.workers):  # a round: one ingredient per worker
        chunk = todo[first : first + costs.workers]
        after = len(results) + len(chunk)
        left = None if deadline is None else deadline - time.perf_counter()
        if (left is not None and last_round and len(results) >= MIN_INGREDIENTS
                and not another_round_fits(costs, after, last_round, left)):  # fmt: skip
            log(f"seed {seed}: stopping at {len(results)} of {n} ingredients: another round "
                "and the soups would not fit the time budget")  # fmt: skip
            break
        expected = [cache / f"{task_key(t)}.json" for t in chunk]
        label = f"seed {seed}: fine-tuning ingredients {len(results) + 1}-{after} of {n}"
        start = time.perf_counter()
        for r in _map_with_progress(ex, fine_tune, chunk, expected, label):
            results[int(r["index"])] = r
        last_round = time.perf_counter() - start
    out = []
    for r in (results[i] for i in sorted(results)):
        logits = load_file(str(r["logits"]))
        hyper: dict[str, Any] = dict(r["hyper"])
        out.append(
            Ingredient(
                name=f"ingredient_{r['index']}",
                path=str(r["weights"]),
                hyper={**hyper, "train_seconds": r["train_seconds"], "cached": r["cached"]},
                logits=logits,
                held_out=accuracy(logits["held_out"], prep.feats["held_out"].labels),
            )
        )
    return out


def _soups(
    ex: Any, prep: Prepared, cfg: DemoConfig, ings: list[Ingredient], out: Path
) -> dict[str, Any]:
    """Build and score every soup in worker processes (or read them from the cache)."""
    tasks = [
        SoupTask(recipe, tuple(i.name for i in ings), tuple(i.path for i in ings),
                 tuple(i.held_out for i in ings), str(prep.init_path), str(prep.feature_dir),
                 prep.config, str(out))
        for recipe in RECIPES
    ]  # fmt: skip
    results = {}
    if not cfg.fresh:
        results = {t.recipe: r for t in tasks if (r := cached_soup(t)) is not None}
    todo = [t for t in tasks if t.recipe not in results]
    selected = [t for t in todo if t.recipe in SELECTED]
    jobs: list[SoupTask | ScoreTask] = list(selected)
    outputs = [out / f"{t.recipe}-{soup_key(t)}.json" for t in selected]
    built = [build_soup(t) for t in todo if t.recipe not in SELECTED]  # averages: instant
    for b in built:
        splits = [ScoreTask(b["file"], s, str(prep.feature_dir), prep.config) for s in b["splits"]]
        jobs += splits
        outputs += [t.logits_path() for t in splits]
    done = _map_with_progress(ex, soup_job, jobs, outputs, "soups")
    results |= {r["recipe"]: r for r in done if "recipe" in r}
    for b in built:
        mine = {r["split"]: r["logits"] for r in done if r.get("weights") == b["file"]}
        results[b["recipe"]] = finish_soup(b, mine)
    for r in results.values():
        r["logits"] = {s: load_file(p)["logits"] for s, p in r["logits"].items()}
    return results


def _costs(cfg: DemoConfig, prep: Prepared) -> Costs:
    sizes = {s: len(f) for s, f in prep.feats.items()}
    return Costs(sizes, 1 if cfg.quick else 2, LEARNED_EPOCHS, max(1, cfg.workers))


def _plan(
    cfg: DemoConfig, prep: Prepared, elapsed: float, seeds_left: int
) -> tuple[int, dict[str, float]]:
    """Ingredients this seed plans to train (`--ingredients`, or fewer if the budget says
    so), and the plan's numbers: `seconds` the seed may take, `unit_ms` the priced forward
    pass over one snippet (both absent without a budget)."""
    n = _wanted(cfg)
    budget = _budget(cfg)
    if budget is None:
        return n, {}
    seconds = (budget - elapsed) / seeds_left - OVERHEAD
    unit = unit_seconds(prep.config, prep.init, prep.feats["held_out"])
    k = ingredients_that_fit(n, _costs(cfg, prep), unit, seconds)
    return k, {"seconds": seconds, "unit_ms": 1000 * unit}


def _wanted(cfg: DemoConfig) -> int:
    """Ingredients per seed before the budget: `--ingredients`, at most 4 with `--quick`."""
    return min(cfg.ingredients, 4) if cfg.quick else cfg.ingredients


def _budget(cfg: DemoConfig) -> float | None:
    """Seconds for the whole run: `time_budget` (0: no limit), by default 300 per seed."""
    if cfg.time_budget is None:
        return DEFAULT_BUDGET * len(cfg.seeds)
    return cfg.time_budget or None


def run_seed(
    ex: Any, prep: Prepared, cfg: DemoConfig, seed: int, log: Log, elapsed: float, seeds_left: int
) -> dict[str, Any]:
    """Fine-tune, soup and score for one seed; returns what the report needs of it."""
    start = time.perf_counter()
    n, plan = _plan(cfg, prep, elapsed, seeds_left)
    trimmed = f" (of {_wanted(cfg)}: the time budget)" if n < _wanted(cfg) else ""
    log(f"seed {seed}: {n} ingredients{trimmed}")
    deadline = start + plan["seconds"] if plan else None
    cache = cfg.cache_dir or default_cache_dir()
    timings = {f"plan_{k}": v for k, v in plan.items()}
    start = time.perf_counter()
    ingredients = _train(ex, prep, cfg, seed, n, deadline, log)
    timings["fine_tune"] = time.perf_counter() - start
    start = time.perf_counter()
    soups = _soups(ex, prep, cfg, ingredients, cache / "soups")
    timings["soups"] = time.perf_counter() - start
    ens = ensembles([i.logits for i in ingredients], prep.feats["held_out"].labels)
    return {"seed": seed, "ingredients": ingredients, "soups": soups, "ensembles": ens,
            "timings": timings}  # fmt: skip


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished workers."""
    import resource

    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the whole demo and write report.json, figure.png and the soups into `cfg.out`.

    Returns:
        The report (what `report.json` holds).
    """
    console = console or Console()
    t0 = time.perf_counter()
    if cfg.ingredients < 2:
        raise SoupError(f"--ingredients must be at least 2 for a soup, got {cfg.ingredients}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    with _executor(cfg) as ex:
        # Workers start (and import torch) while this process loads the data and the model.
        warm = threading.Thread(target=ex.map, args=(warm_up, range(cfg.workers)), daemon=True)
        warm.start()
        prep = prepare(
            quick=cfg.quick,
            cache_dir=cfg.cache_dir or default_cache_dir(),
            fresh=cfg.fresh,
            log=lambda m: console.log(m),
        )
        warm.join()
        runs = []
        for k, seed in enumerate(cfg.seeds):
            elapsed, left = time.perf_counter() - t0, len(cfg.seeds) - k
            runs.append(run_seed(ex, prep, cfg, seed, console.log, elapsed, left))
    config = {**asdict(cfg), "time_budget": _budget(cfg)}  # the budget in force, in seconds
    report = build_report(prep, runs, config, time.perf_counter() - t0)
    start = time.perf_counter()
    if cfg.export:
        export_soups(runs, report, cfg.out, console)
    write_figure(report, cfg.out / "figure.png")
    report["timings"]["export_and_figure"] = time.perf_counter() - start
    report["timings"]["total"] = time.perf_counter() - t0
    report["timings"]["cpu_seconds"] = _cpu_seconds()  # wall time is inflated on a busy machine
    write_report(report, cfg.out / "report.json")
    print_table(report, console)
    t = report["timings"]
    console.print(
        f"wrote {cfg.out / 'report.json'}, {cfg.out / 'figure.png'} and the soups' model "
        f"folders; {t['total']:.0f} s wall, {t['cpu_seconds']:.0f} s CPU",
        markup=False,
    )
    return report
