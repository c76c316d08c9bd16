"""Evaluators: how a candidate soup is scored on held-out data (higher is better).

A *candidate* is a `Checkpoint`: an ingredient file, an in-memory state dict, or a soup that
is computed tensor by tensor when read (`LazyCheckpoint`), so that scoring a greedy candidate
costs one pass over the weights and never a materialised copy. Three evaluators:

- `ModuleEvaluator(model_factory, metric)`: loads the candidate into ONE module, built once
  by `model_factory()` and reused for every candidate, then returns `metric(module)`.
- `FunctionEvaluator(fn)`: `fn(state_dict)`; any plain callable passed as an evaluator.
- `CommandEvaluator("python eval.py --ckpt {ckpt}", timeout=...)`: writes the candidate to a
  temporary checkpoint and runs the command; its last stdout line is a number or a JSON
  object with a `"score"`.

Each returns a `Score(score, metrics)`. A crash, a timeout, unreadable output or a NaN raises
`EvaluationError` naming the candidate. Ingredient scores logged during a sweep can be read
with `load_scores` instead of being recomputed. Your own evaluator is any object with
`evaluate(candidate, *, name) -> Score`: read tensors one at a time with `candidate.get(key)`
(keys in `candidate.infos`) or all at once with `materialize(candidate)`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

import torch

from .errors import EvaluationError, IncompatibleError, SoupError
from .io.base import Checkpoint, TensorInfo
from .io.writer import Entry, OutputPlan, ShardedWriter, atomic_path

if TYPE_CHECKING:
    from torch import nn

    from .types import StateDict

__all__ = [
    "CommandEvaluator",
    "Evaluator",
    "FunctionEvaluator",
    "History",
    "Ingredient",
    "LazyCheckpoint",
    "ModuleEvaluator",
    "Score",
    "acceptance",
    "as_evaluator",
    "close_all",
    "ingredient_names",
    "ingredient_sources",
    "load_candidate",
    "load_scores",
    "materialize",
    "open_ingredients",
    "parse_score_line",
    "score_candidate",
    "score_ingredients",
    "to_score",
    "write_candidate",
]


@dataclass(frozen=True)
class Score:
    """A held-out score (higher is better) and any extra metrics the evaluator reported."""

    score: float
    metrics: dict[str, float] = field(default_factory=dict)


def to_score(value: object, name: str) -> Score:
    """Turn what an evaluator returned (number, 0-d tensor, `{"score": ...}`) into a `Score`."""
    metrics: dict[str, float] = {}
    if isinstance(value, Score):
        score, metrics = value.score, dict(value.metrics)
    elif isinstance(value, Mapping):
        if "score" not in value:
            raise EvaluationError(
                f"candidate {name!r}: evaluator returned a dict without a 'score' key "
                f"(keys: {sorted(value)[:5]})"
            )
        score = _number(value["score"], name)
        metrics = {
            str(k): float(v)
            for k, v in value.items()
            if k != "score" and isinstance(v, int | float) and not isinstance(v, bool)
        }
    else:
        score = _number(value, name)
    if not math.isfinite(score):
        raise EvaluationError(f"candidate {name!r}: evaluator returned {score}, not a finite score")
    return Score(score, metrics)


def _number(value: object, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise EvaluationError(
        f"candidate {name!r}: evaluator returned {type(value).__name__} {value!r:.60}; "
        "return a number or a dict with a 'score'"
    )


def acceptance(accept: str, tolerance: float = 0.0) -> Callable[[float, float], bool]:
    """`better(new, best)`: "ge" accepts ties (the paper's ≥), "gt" needs a strict gain (the
    official code's >); `tolerance` accepts candidates up to that much below the best."""
    if accept == "ge":
        return lambda new, best: new >= best - tolerance
    if accept == "gt":
        return lambda new, best: new > best - tolerance
    raise SoupError(f"accept must be 'ge' (paper) or 'gt' (official code), got {accept!r}")


@runtime_checkable
class Evaluator(Protocol):
    """Scores a candidate on held-out data: `evaluate(candidate, name=...) -> Score`."""

    def evaluate(self, candidate: Checkpoint, *, name: str) -> Score: ...


class LazyCheckpoint(Checkpoint):
    """A checkpoint whose tensors are computed on `get` (a candidate soup, never stored).

    `model_files_from` names an HF folder whose config/tokenizer files go with the candidate
    when it is written out, so that a folder-based eval command can load it.
    """

    def __init__(
        self,
        label: str,
        infos: Mapping[str, TensorInfo],
        compute: Callable[[str], torch.Tensor],
        *,
        model_files_from: Path | None = None,
    ) -> None:
        super().__init__(Path(label), "memory", dict(infos))
        self._compute, self.model_files_from = compute, model_files_from
        self.extra: dict[str, Any] = {}  # what a recipe learns while computing (e.g. ratios)

    def get(self, name: str) -> torch.Tensor:
        return self._compute(name)


def materialize(candidate: Checkpoint) -> StateDict:
    """Every tensor of `candidate` in its declared dtype, as a plain state dict."""
    return {k: candidate.get(k).to(i.dtype) for k, i in candidate.infos.items()}


def write_candidate(
    candidate: Checkpoint,
    out: Path,
    *,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    model_files_from: Path | None = None,
) -> None:
    """Stream `candidate` into `out` (a `.safetensors` file, else an HF folder), atomically."""
    from .io.folder import copy_model_files

    folder = out.suffix != ".safetensors"
    entries = [Entry(n, i.dtype, i.shape) for n, i in candidate.infos.items()]
    plan = OutputPlan(out, entries, {"format": "pt", **(metadata or {})}, folder)
    with atomic_path(out, folder=folder, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, plan)
        try:
            for name in candidate.infos:
                writer.write(name, candidate.get(name))
            writer.close()
        finally:
            writer.abort()
        if folder and model_files_from is not None:
            copy_model_files(model_files_from, tmp)


def load_candidate(module: nn.Module, candidate: Checkpoint) -> nn.Module:
    """Copy `candidate` into `module`'s existing tensors in place (one tensor at a time)."""
    target = module.state_dict()
    missing = [k for k in target if k not in candidate.infos]
    unexpected = [k for k in candidate.infos if k not in target]
    if missing or unexpected:
        raise IncompatibleError(
            f"{candidate.path}: does not fit the model from model_factory "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(candidate.get(k))
    return module


class FunctionEvaluator:
    """`fn(state_dict) -> float | dict` as an evaluator (the candidate is materialised)."""

    def __init__(self, fn: Callable[[StateDict], object]) -> None:
        self.fn = fn

    def evaluate(self, candidate: Checkpoint, *, name: str) -> Score:
        return _guarded(name, lambda: self.fn(materialize(candidate)))


class ModuleEvaluator:
    """Load each candidate into one reused module and score it with `metric(module)`.

    Args:
        model_factory: builds the architecture once (picklable, e.g. a module-level function,
            when used with more than one worker).
        metric: `metric(module) -> float | {"score": ..., ...}` on HELD-OUT data. It runs
            under `torch.no_grad()` with the module in eval mode.
        bn_loader: if given, BatchNorm statistics are recalibrated on it before scoring
            (averaged running stats are stale, see `recalibrate_bn`).

    Example:
        >>> ev = ModuleEvaluator(TinyNet, lambda m: accuracy(m, val_loader))  # doctest: +SKIP
    """

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        metric: Callable[[nn.Module], object],
        *,
        bn_loader: Any = None,
    ) -> None:
        self.model_factory, self.metric, self.bn_loader = model_factory, metric, bn_loader
        self._module: nn.Module | None = None

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            self._module = self.model_factory()
        return self._module

    def evaluate(self, candidate: Checkpoint, *, name: str) -> Score:
        def run() -> object:
            module = load_candidate(self.module, candidate)
            if self.bn_loader is not None:
                from .recipes.bn import recalibrate_bn

                recalibrate_bn(module, self.bn_loader)
            module.eval()
            with torch.no_grad():
                return self.metric(module)

        return _guarded(name, run)

    def __getstate__(self) -> dict[str, Any]:  # workers build their own module
        return {**self.__dict__, "_module": None}


def _guarded(name: str, run: Callable[[], object]) -> Score:
    try:
        value = run()
    except SoupError:
        raise
    except Exception as e:
        raise EvaluationError(
            f"candidate {name!r}: evaluator raised {type(e).__name__}: {e}"
        ) from e
    return to_score(value, name)


def score_candidate(
    evaluator: Evaluator | Callable[[StateDict], object],
    candidate: Checkpoint | StateDict | nn.Module | str | os.PathLike[str],
    *,
    name: str = "candidate",
) -> Score:
    """Score one candidate — a checkpoint, state dict, module or checkpoint path — once.

    Example:
        >>> score_candidate(ModuleEvaluator(TinyNet, val_acc), soup_sd).score  # doctest: +SKIP
    """
    if isinstance(candidate, Checkpoint):
        return as_evaluator(evaluator).evaluate(candidate, name=name)
    _, (ckpt,) = open_ingredients([candidate], [name])
    try:
        return as_evaluator(evaluator).evaluate(ckpt, name=name)
    finally:
        ckpt.close()


def as_evaluator(x: Evaluator | Callable[[StateDict], object]) -> Evaluator:
    """An `Evaluator` as is; a plain callable `fn(state_dict)` wrapped in `FunctionEvaluator`."""
    if isinstance(x, Evaluator):
        return x
    if callable(x):
        return FunctionEvaluator(x)
    raise SoupError(f"evaluator must be an Evaluator or a callable, got {type(x).__name__}")


def parse_score_line(stdout: str, name: str) -> Score:
    """The last non-empty stdout line: a number, or a JSON object with a `score` field."""
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise EvaluationError(f"candidate {name!r}: eval command printed nothing on stdout")
    last = lines[-1]
    try:
        value: object = float(last)
    except ValueError:
        try:
            value = json.loads(last)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise EvaluationError(
                f"candidate {name!r}: cannot read a score from the eval command's last "
                f"line {last[:80]!r}; print a number or a JSON object with a 'score'"
            ) from None
    return to_score(value, name)


@dataclass
class CommandEvaluator:
    """Run a shell command on each candidate, e.g. `python eval.py --ckpt {ckpt}`.

    In-memory candidates are written to a temporary checkpoint under `workdir` (default: the
    system temp folder) and removed afterwards. The command also gets `SOUP_CKPT` and
    `SOUP_CANDIDATE` in its environment. `timeout` is in seconds; the whole process group
    is killed when it expires.
    """

    command: str
    timeout: float | None = None
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if "{ckpt}" not in self.command:
            raise SoupError(f"eval command {self.command!r} must contain {{ckpt}}")

    def evaluate(self, candidate: Checkpoint, *, name: str) -> Score:
        if candidate.format != "memory":
            return self.run(candidate.path, name)
        source = getattr(candidate, "model_files_from", None)
        with tempfile.TemporaryDirectory(prefix=".soup-candidate-", dir=self.workdir) as d:
            path = Path(d) / ("candidate" if source else "candidate.safetensors")
            write_candidate(candidate, path, model_files_from=source)
            return self.run(path, name)

    def run(self, path: Path, name: str) -> Score:
        cmd = self.command.replace("{ckpt}", shlex.quote(str(path)))
        env = {**os.environ, "SOUP_CKPT": str(path), "SOUP_CANDIDATE": name}
        proc = subprocess.Popen(
            cmd,
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # so that a timeout kills the command's children too
        )
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise EvaluationError(
                f"candidate {name!r}: eval command timed out after {self.timeout} s: {cmd}"
            ) from None
        except BaseException:
            _kill(proc)
            raise
        if proc.returncode != 0:
            tail = (err.strip().splitlines() or ["(no stderr)"])[-1][:200]
            raise EvaluationError(
                f"candidate {name!r}: eval command exited with code {proc.returncode}: {tail}"
            )
        return parse_score_line(out, name)


def _kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


_NAME_COLUMNS = ("model_name", "name", "ingredient", "checkpoint", "path", "model")


def load_scores(path: str | os.PathLike[str], names: Sequence[str]) -> dict[str, float]:
    """Held-out scores of `names` from a CSV or JSON file logged during the sweep.

    JSON: `{name: score}`, `{name: {"score": ...}}` or a list of `{"model_name", "score"}`.
    CSV: a name column (`model_name`, `name`, `ingredient`, `checkpoint`, `path` or the first)
    and a `score` column (or the second, if there are two). A logged path matches the
    ingredient of that stem. Every ingredient must have a score and every score an
    ingredient, else `SoupError`.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SoupError(f"{p}: cannot read scores ({e.strerror})") from None
    try:
        raw = _read_json_scores(text) if p.suffix == ".json" else _read_csv_scores(text)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise SoupError(f"{p}: cannot read scores: {e}") from None
    scores = {_match(str(k), names): to_score(v, str(k)).score for k, v in raw.items()}
    unknown = [k for k in scores if k not in names]
    missing = [n for n in names if n not in scores]
    if missing:
        raise SoupError(f"{p}: no score for ingredient(s) {missing[:3]}; scores name {unknown[:3]}")
    if unknown:
        raise SoupError(f"{p}: score(s) for unknown ingredient(s) {unknown[:3]}; not in {names}")
    return scores


def _match(key: str, names: Sequence[str]) -> str:
    """A logged name as one of `names`: itself, or its file stem or file name (a path)."""
    p = Path(key)
    return next((k for k in (key, p.stem, p.name) if k in names), key)


def _read_json_scores(text: str) -> dict[str, object]:
    data = json.loads(text)
    if isinstance(data, list):
        return {str(r[next(c for c in _NAME_COLUMNS if c in r)]): r for r in data}
    if not isinstance(data, dict):
        raise ValueError("expected an object or a list of objects")
    return data


def _read_csv_scores(text: str) -> dict[str, object]:
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise ValueError("no rows")
    cols = list(rows[0])
    name_col = next((c for c in _NAME_COLUMNS if c in cols), cols[0])
    score_col = "score" if "score" in cols else cols[1] if len(cols) == 2 else None
    if score_col is None:
        raise ValueError(f"no 'score' column among {cols}")
    return {r[name_col]: float(r[score_col]) for r in rows}


class History:
    """An append-only JSON-lines log, one record per evaluation, fsynced line by line.

    Re-opened with `resume=True`, it returns the records of an interrupted run (a torn last
    line from a crash is dropped) so that nothing already scored is evaluated again.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, resume: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []
        if self.path is None or not self.path.exists():
            return
        if not resume:
            raise SoupError(
                f"{self.path}: history exists; pass --resume to continue it, or remove it"
            )
        good: list[str] = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a line torn by a crash: it and anything after it is redone
            if isinstance(record, dict):
                self.records.append(record)
                good.append(line)
        self.path.write_text("".join(f"{ln}\n" for ln in good))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _score_source(
    evaluator: Evaluator, options: dict[str, Any], item: tuple[str, object]
) -> Score | EvaluationError:
    """Open one ingredient (a path or a state dict) and score it; errors are returned, so
    that the scores of the other ingredients are still logged."""
    from .average import _Memory
    from .io import open_checkpoint

    name, source = item
    is_dict = isinstance(source, dict)
    ckpt = _Memory(0, source) if is_dict else open_checkpoint(source, **options)  # type: ignore[arg-type]
    try:
        return evaluator.evaluate(ckpt, name=name)
    except EvaluationError as e:
        return e
    finally:
        ckpt.close()


def score_ingredients(
    evaluator: Evaluator,
    items: Sequence[tuple[str, object]],
    *,
    executor: Any = None,
    key: str | None = None,
    unsafe_pickle: bool = False,
) -> list[Score | EvaluationError]:
    """Score independent ingredients `(name, path or state dict)` through an executor."""
    import functools

    from .executor import get_executor

    fn = functools.partial(_score_source, evaluator, {"key": key, "unsafe_pickle": unsafe_pickle})
    return get_executor(executor).map(fn, list(items))


Ingredient: TypeAlias = "StateDict | nn.Module | str | os.PathLike[str]"


def ingredient_names(ingredients: Sequence[Ingredient]) -> list[str]:
    """File stems (folder names for folders; full paths if those clash), or `ingredient_i`."""
    names = []
    for i, x in enumerate(ingredients):
        if isinstance(x, str | os.PathLike):
            p = Path(x)
            names.append(p.stem if p.suffix in (".safetensors", ".pt", ".pth", ".bin") else p.name)
        else:
            names.append(f"ingredient_{i}")
    if len(set(names)) < len(names):  # run1/model.safetensors, run2/model.safetensors...
        names = [str(x) if isinstance(x, str | os.PathLike) else n
                 for x, n in zip(ingredients, names, strict=True)]  # fmt: skip
    return names


def open_ingredients(
    ingredients: Sequence[Ingredient],
    names: Sequence[str] | None = None,
    *,
    key: str | None = None,
    unsafe_pickle: bool = False,
) -> tuple[list[str], list[Checkpoint]]:
    """Names and lazily opened checkpoints of paths, state dicts or modules."""
    from .average import _Memory
    from .io import open_checkpoint

    if not ingredients:
        raise SoupError("no ingredients: give at least one checkpoint")
    out_names = list(names) if names is not None else ingredient_names(ingredients)
    if len(out_names) != len(ingredients) or len(set(out_names)) != len(out_names):
        raise SoupError(f"give one distinct name per ingredient, got {out_names}")
    ckpts: list[Checkpoint] = []
    try:
        for i, x in enumerate(ingredients):
            if isinstance(x, str | os.PathLike):
                ckpts.append(open_checkpoint(x, key=key, unsafe_pickle=unsafe_pickle))
            else:
                ckpts.append(_Memory(i, x if isinstance(x, dict) else dict(x.state_dict())))
    except BaseException:
        close_all(ckpts)
        raise
    return out_names, ckpts


def ingredient_sources(
    ingredients: Sequence[Ingredient], names: Sequence[str]
) -> list[tuple[str, object]]:
    """`(name, path or state dict)` pairs, small enough to send to a worker process."""
    return [
        (n, x if isinstance(x, str | os.PathLike | dict) else dict(x.state_dict()))
        for n, x in zip(names, ingredients, strict=True)
    ]


def close_all(ckpts: Sequence[Checkpoint]) -> None:
    for c in ckpts:
        c.close()
