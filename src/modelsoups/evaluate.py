"""Evaluators: how a candidate soup is scored on held-out data (higher is better).

A *candidate* is a `Checkpoint`: an ingredient file, an in-memory state dict, or a soup that
is computed tensor by tensor when read (`LazyCheckpoint`, in `candidate.py`), so that scoring
a greedy candidate costs one pass over the weights and never a materialised copy. Three
evaluators:

- `ModuleEvaluator(model_factory, metric)`: loads the candidate into ONE module, built once
  by `model_factory()` and reused for every candidate, then returns `metric(module)`.
- `FunctionEvaluator(fn)`: `fn(state_dict)`; any plain callable passed as an evaluator.
- `CommandEvaluator("python eval.py --ckpt {ckpt}", timeout=...)`: writes the candidate to a
  temporary checkpoint and runs the command; its last stdout line is a number or a JSON
  object with a `"score"`.

Each returns a `Score(score, metrics)`. A crash, a timeout, unreadable output or a NaN raises
`EvaluationError` naming the candidate. Ingredient scores logged during a sweep can be read
with `load_scores` (`scores.py`) instead of being recomputed. Your own evaluator is any
object with `evaluate(candidate, *, name) -> Score`: read tensors one at a time with
`candidate.get(key)` (keys in `candidate.infos`) or all at once with `materialize(candidate)`.
A greedy candidate's tensors live in buffers that the next candidate reuses: they are only
valid during `evaluate` (the evaluators here copy or write them before returning); copy
whatever you keep.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from .candidate import load_candidate, materialize, write_candidate
from .errors import EvaluationError, SoupError
from .ingredients import LocalSource, open_ingredients
from .io import MemoryCheckpoint, open_checkpoint
from .io.base import Checkpoint

if TYPE_CHECKING:
    from torch import nn

    from .types import StateDict

__all__ = [
    "CommandEvaluator",
    "Evaluator",
    "FunctionEvaluator",
    "ModuleEvaluator",
    "Score",
    "acceptance",
    "as_evaluator",
    "parse_score_line",
    "score_candidate",
    "score_ingredients",
    "to_score",
]

# Seconds (~31.7 years) from which a timeout means none (Python's waits overflow at ~9e9).
NO_LIMIT = 1e9


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
    if math.isnan(tolerance):
        raise SoupError("tolerance must be a number (got nan); 0 accepts no drop at all")
    if accept == "ge":
        return lambda new, best: new >= best - tolerance
    if accept == "gt":
        return lambda new, best: new > best - tolerance
    raise SoupError(f"accept must be 'ge' (paper) or 'gt' (official code), got {accept!r}")


@runtime_checkable
class Evaluator(Protocol):
    """Scores a candidate on held-out data: `evaluate(candidate, name=...) -> Score`."""

    def evaluate(self, candidate: Checkpoint, *, name: str) -> Score: ...


class FunctionEvaluator:
    """`fn(state_dict) -> float | dict` as an evaluator (the candidate is materialised; its
    tensors may be reused by the next candidate, so `fn` must copy any it keeps)."""

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
        device: where the module lives (e.g. "cuda"); candidates are copied onto it tensor
            by tensor. `metric` moves its batches there itself.

    Example:
        >>> ev = ModuleEvaluator(TinyNet, lambda m: accuracy(m, val_loader))  # doctest: +SKIP
    """

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        metric: Callable[[nn.Module], object],
        *,
        bn_loader: Any = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.model_factory, self.metric, self.bn_loader = model_factory, metric, bn_loader
        self.device = torch.device(device) if device is not None else None
        self._module: nn.Module | None = None

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            module = self.model_factory()
            self._module = module.to(self.device) if self.device is not None else module
        return self._module

    def evaluate(self, candidate: Checkpoint, *, name: str) -> Score:
        def run() -> object:
            module = load_candidate(self.module, candidate)
            if self.bn_loader is not None:
                from .recipes.bn import recalibrate_bn

                recalibrate_bn(module, self.bn_loader, device=self.device)
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
    (ckpt,) = open_ingredients([candidate])
    try:
        return as_evaluator(evaluator).evaluate(ckpt, name=name)
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
    """Score independent ingredients `(name, path or state dict)` through an executor
    (`ingredients.ingredient_sources` makes the pairs)."""
    from .executor import get_executor

    fn = functools.partial(_score_source, evaluator, {"key": key, "unsafe_pickle": unsafe_pickle})
    return get_executor(executor).map(fn, list(items))


def _score_source(
    evaluator: Evaluator, options: dict[str, Any], item: tuple[str, object]
) -> Score | EvaluationError:
    """Open one ingredient (a path or a state dict) and score it; errors are returned, so
    that the scores of the other ingredients are still logged."""
    name, source = item
    if isinstance(source, Checkpoint):  # a portable one (see ingredient_sources)
        ckpt = source
    elif isinstance(source, LocalSource):  # read through, in this process
        ckpt = source.open()
    elif isinstance(source, dict):
        ckpt = MemoryCheckpoint(source)
    else:
        ckpt = open_checkpoint(source, **options)  # type: ignore[arg-type]
    try:
        return evaluator.evaluate(ckpt, name=name)
    except EvaluationError as e:
        return e
    finally:
        if ckpt is not source:  # the caller's own checkpoint stays open
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

    `{ckpt}` is never the user's file: in-memory candidates are written to a temporary
    checkpoint under `workdir` (default: the system temp folder), ingredients are copied
    there (read-only; a reflink where the filesystem has them), and the command gets that
    path, spelled with shell-safe characters only whichever way `{ckpt}` is quoted (see
    `sandbox.py`). An input changed while the command ran stops the run. The command also
    gets `SOUP_CKPT` and `SOUP_CANDIDATE` in its environment. `timeout` is in seconds
    (None, inf or anything from `NO_LIMIT` up: no limit); the whole process group is
    killed when it expires.
    """

    command: str
    timeout: float | None = None
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if "{ckpt}" not in self.command:
            raise SoupError(f"eval command {self.command[:200]!r} must contain {{ckpt}}")
        if self.timeout is not None:
            t = float(self.timeout)
            if math.isnan(t) or t <= 0:
                raise SoupError(f"eval timeout must be a positive number of seconds, got {t}")
            self.timeout = None if t >= NO_LIMIT else t

    def evaluate(self, candidate: Checkpoint, *, name: str) -> Score:
        from .io.files import stamps
        from .sandbox import check_unchanged, private_copy

        with tempfile.TemporaryDirectory(prefix=".soup-candidate-", dir=self.workdir) as d:
            if candidate.format == "memory":  # a folder if config files or an adapter's go with it
                source = getattr(candidate, "model_files_from", None)
                folder = source or getattr(candidate, "adapter_config", None)
                path = Path(d) / ("candidate" if folder else "candidate.safetensors")
                write_candidate(candidate, path, model_files_from=source, scratch=True)
                return self.run(path, name)
            before = stamps(candidate.path)
            try:
                return self.run(private_copy(candidate, Path(d)), name)
            finally:
                check_unchanged(candidate.path, before, name)

    def run(self, path: Path, name: str) -> Score:
        """Run the command on the checkpoint at `path` (through a shell-safe name)."""
        from .executor import child_groups
        from .sandbox import shell_safe

        with shell_safe(path) as safe:
            cmd = self.command.replace("{ckpt}", str(safe))
            env = {**os.environ, "SOUP_CKPT": str(safe), "SOUP_CANDIDATE": name}
            proc = subprocess.Popen(
                cmd,
                shell=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # so that a timeout kills the command's children too
            )
            child_groups.add(proc.pid)  # a stopped worker kills it (executor.py)
            try:
                out, err = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                raise EvaluationError(
                    f"candidate {name!r}: eval command timed out after {self.timeout} s: "
                    f"{cmd[:200]}"
                ) from None
            except BaseException:
                _kill(proc)
                raise
            finally:
                child_groups.discard(proc.pid)
        if proc.returncode != 0:
            lines = _text(err).strip().splitlines() or ["(no stderr)"]
            raise EvaluationError(
                f"candidate {name!r}: eval command exited with code {proc.returncode}: "
                f"{lines[-1][:200]}"
            )
        return parse_score_line(_text(out), name)


def _text(data: bytes) -> str:
    """An eval command's output as text; bytes that are not UTF-8 become U+FFFD."""
    return data.decode("utf-8", errors="replace")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
