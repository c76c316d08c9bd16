"""The soup step: every recipe comes from the project's public API, none is re-implemented.

Given the fine-tuned ingredients (weights files of `Top`, their held-out scores and logits
on every split), this builds the paper's comparison: uniform soup, greedy soup, learned
soup, and WiSE-FT between the shared LP init and the best individual (by held-out); plus
the output ensemble and greedy ensemble from the cached logits. Selection only ever sees
held-out data; test and shift are scored afterwards.

The soup phase is one map of jobs over the workers (`soup_job`): greedy soup (sequential
held-out evaluations) and learned soup (gradient steps), each built and scored in one
job, start first; the uniform soup and WiSE-FT, plain averages built at once in the
calling process, are scored one split per job (`ScoreTask`) on whichever worker is free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import modelsoups

from .atomic import save_json, save_tensors
from .model import Features
from .scoring import EVAL_SPLITS, Scorer

__all__ = [
    "RECIPES",
    "ScoreTask",
    "SoupTask",
    "build_soup",
    "cached_soup",
    "ensembles",
    "finish_soup",
    "score_soup",
    "soup_job",
    "soup_key",
]

FORMAT = 2  # bump when a recipe's settings or outputs change meaning (2: logits per split)
RECIPES = ("greedy_soup", "learned_soup", "uniform_soup", "wise_ft")  # slowest first
SELECTED = ("greedy_soup", "learned_soup")  # built on held-out in a worker; others: instant
WISE_FT_ALPHA = 0.5  # the WiSE-FT paper's default mixing; fixed, so it costs no selection
LEARNED_EPOCHS = 1  # over held-out (40 steps of 64); costs ~3 forward passes over it
LEARNED_BATCH = 64


@dataclass(frozen=True)
class SoupTask:
    """Build one soup from saved ingredients and score it (picklable, for the executor)."""

    recipe: str
    names: tuple[str, ...]
    weights: tuple[str, ...]  # safetensors file per ingredient
    held_out: tuple[float, ...]  # ingredient scores on held-out, already measured
    init_path: str  # the shared start (LP init), for WiSE-FT
    feature_dir: str
    config: dict[str, Any]
    out_dir: str


def _greedy(task: SoupTask, sds: list[dict[str, torch.Tensor]], scorer: Scorer) -> dict[str, Any]:
    """Paper Recipe 1 through `modelsoups.greedy_soup`, on held-out accuracy only."""
    result = modelsoups.greedy_soup(
        sds,
        scorer.held_out,
        names=list(task.names),
        scores=dict(zip(task.names, task.held_out, strict=True)),  # known: not re-scored
        accept="ge",
    )
    keys = ("model_name", "held_out", "accepted", "soup_size")
    history = [{k: r[k] for k in keys if k in r} for r in result.history if r["kind"] == "greedy"]
    return {
        "state_dict": result.state_dict(),
        "weights": dict(zip(result.names, result.weights, strict=True)),
        "held_out": result.score,  # known from selection: held-out is not scored again
        "history": history,
    }


def _learned(task: SoupTask, sds: list[dict[str, torch.Tensor]], scorer: Scorer) -> dict[str, Any]:
    """Learned soup through `modelsoups.learned_soup`: one coefficient per ingredient."""
    held = scorer.feats["held_out"]
    order = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))
    batches = [(held.batch(idx), held.labels[idx]) for idx in torch.split(order, LEARNED_BATCH)]

    def loss(model: Any, batch: Any) -> torch.Tensor:
        (states, lengths), labels = batch
        return torch.nn.functional.cross_entropy(model(states, lengths), labels)

    result = modelsoups.learned_soup(sds, scorer.top, loss, batches, epochs=LEARNED_EPOCHS, lr=0.05)
    coefs = [float(c) for c in result.coefficients]
    return {
        "state_dict": result.state_dict,
        "weights": dict(zip(task.names, coefs, strict=True)),
        "losses": result.losses,
    }


def _uniform(task: SoupTask, sds: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Paper §3: the plain mean of all ingredients, through `modelsoups.uniform_state_dict`."""
    return {
        "state_dict": modelsoups.uniform_state_dict(sds),
        "weights": {n: 1.0 / len(sds) for n in task.names},
    }


def _wise_ft(task: SoupTask, sds: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """WiSE-FT between the LP init and the best individual (by held-out), α = 0.5."""
    best = max(range(len(sds)), key=lambda i: task.held_out[i])  # first of the best on ties
    sd = modelsoups.wise_ft(load_file(task.init_path), sds[best], alpha=WISE_FT_ALPHA)
    return {"state_dict": sd, "weights": {"lp_init": 1 - WISE_FT_ALPHA,
                                          task.names[best]: WISE_FT_ALPHA}}  # fmt: skip


def build_soup(task: SoupTask) -> dict[str, Any]:
    """Build `task.recipe`'s soup and save its weights.

    Returns:
        recipe, soup weights file, per-ingredient mixing weights, held-out score when
        selection already measured it, recipe details (history, losses), and `splits`: the
        splits still to score.
    """
    sds = [load_file(w) for w in task.weights]
    if task.recipe in SELECTED:  # these two see held-out, and only it
        held = Features.load(Path(task.feature_dir) / "held_out.safetensors")
        scorer = Scorer(task.config, {"held_out": held})
        info = (_greedy if task.recipe == "greedy_soup" else _learned)(task, sds, scorer)
    elif task.recipe == "uniform_soup":
        info = _uniform(task, sds)
    elif task.recipe == "wise_ft":
        info = _wise_ft(task, sds)
    else:
        raise ValueError(f"unknown recipe {task.recipe!r}; expected one of {RECIPES}")
    sd = {k: v.detach().contiguous() for k, v in info.pop("state_dict").items()}
    out = Path(task.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{task.recipe}-{soup_key(task)}.safetensors"
    save_tensors(sd, weights)
    splits = EVAL_SPLITS[1:] if "held_out" in info else EVAL_SPLITS
    return {"recipe": task.recipe, "file": str(weights), "splits": list(splits), **info}


@dataclass(frozen=True)
class ScoreTask:
    """Score one saved soup on one split (picklable, for the executor)."""

    weights: str
    split: str
    feature_dir: str
    config: dict[str, Any]

    def logits_path(self) -> Path:
        """Where `score_soup` writes the logits: beside the weights, named by split."""
        return Path(self.weights).with_suffix(f".{self.split}.logits.safetensors")


def score_soup(task: ScoreTask) -> str:
    """Logits of a saved soup on one split, saved beside it; returns their file."""
    feats = Features.load(Path(task.feature_dir) / f"{task.split}.safetensors")
    scorer = Scorer(task.config, {task.split: feats})
    logits = scorer.logits(load_file(task.weights), task.split).contiguous()
    save_tensors({"logits": logits}, task.logits_path())
    return str(task.logits_path())


def finish_soup(built: dict[str, Any], logits: dict[str, str]) -> dict[str, Any]:
    """Record a soup whose build and scoring are done: its `.json` is written last, so its
    presence in the cache means the soup is complete."""
    result = {k: v for k, v in built.items() if k != "splits"} | {"logits": logits}
    save_json(result, Path(built["file"]).with_suffix(".json"))
    return result


def soup_job(job: SoupTask | ScoreTask) -> dict[str, Any]:
    """Worker: one job of the soup phase, either a whole selected soup (greedy or learned:
    build on held-out, then score) or one split of a soup built without selection.

    Returns:
        the finished soup's record, or `{"weights", "split", "logits"}` for a split.
    """
    torch.set_num_threads(1)
    if isinstance(job, ScoreTask):
        return {"weights": job.weights, "split": job.split, "logits": score_soup(job)}
    built = build_soup(job)
    splits = [ScoreTask(built["file"], s, job.feature_dir, job.config) for s in built["splits"]]
    return finish_soup(built, {t.split: score_soup(t) for t in splits})


def soup_key(task: SoupTask) -> str:
    """Cache key of a soup: recipe, its settings, and the ingredients' (content-keyed) files."""
    settings = [task.recipe, FORMAT, WISE_FT_ALPHA, LEARNED_EPOCHS, LEARNED_BATCH, task.init_path]
    payload = json.dumps([settings, [Path(w).name for w in task.weights]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_soup(task: SoupTask) -> dict[str, Any] | None:
    """A soup built and scored by an earlier run, if the cache has it."""
    path = Path(task.out_dir) / f"{task.recipe}-{soup_key(task)}.json"
    return dict(json.loads(path.read_text())) if path.is_file() else None


def ensembles(
    logits: list[dict[str, torch.Tensor]], held_out_labels: torch.Tensor
) -> dict[str, dict[str, Any]]:
    """Output ensemble of all ingredients and greedy ensemble (chosen on held-out logits)."""
    from modelsoups.recipes.ensemble import accuracy

    full = {s: modelsoups.ensemble_logits([x[s] for x in logits]) for s in EVAL_SPLITS}
    greedy = modelsoups.greedy_ensemble([x["held_out"] for x in logits], accuracy(held_out_labels))
    chosen = {s: modelsoups.ensemble_logits([logits[i][s] for i in greedy.selected])
              for s in EVAL_SPLITS}  # fmt: skip
    return {
        "ensemble": {"logits": full, "size": len(logits)},
        "greedy_ensemble": {"logits": chosen, "size": len(set(greedy.selected))},
    }
