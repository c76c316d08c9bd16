"""`lm-eval:TASK[,TASK…]`: tasks of EleutherAI's lm-evaluation-harness, on the live model.

The live causal LM (built once, each candidate's tensors copied in) is wrapped in
lm-eval's `HFLM` (`pretrained=` the model object, nothing reloaded) and the tasks run
through `lm_eval.evaluator.evaluate`, as `lm_eval.simple_evaluate` runs them (0-shot unless
the YAML sets `num_fewshot`, few-shot seed 1234 for every candidate), minus the stderr
bootstrap. `--batch-size` and `--max-length` are HFLM's `batch_size` and `max_length`.

Tasks are local and offline: `data` is a task YAML file or a folder of them (lm-eval's
`include_path`, searched for `*.yaml`; the built-in task catalogue is not read). Their
data must be local files, e.g. `dataset_path: json` with `dataset_kwargs: {data_files:
{test: rows.jsonl}}`; relative data paths are relative to that folder. Loading runs
with the Hugging Face Hub offline, so a task that needs a download fails at once, in one
line naming it.

score   = the first task's main metric: the first metric of its `metric_list` (for a
          multiple-choice task usually `acc`), under its first filter (`none` for most),
          negated when lm-eval marks it lower-is-better (perplexities), so that higher is
          better as everywhere in modelsoups.
metrics = every number lm-eval reports, as `TASK/METRIC` (`TASK/METRIC/FILTER` when the
          filter is not `none`), with lm-eval's signs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cwd import chdir
from ..errors import SoupError
from ..evaluate import Score
from .base import Progress, Settings, tokenizer
from .data import DataError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["PREFIX", "Harness", "parse"]

PREFIX = "lm-eval:"
FEWSHOT_SEED = 1234  # lm_eval.simple_evaluate's default fewshot_random_seed
_CWD_LOCK = threading.Lock()  # loading runs in the tasks' folder (relative data paths)


def parse(name: str) -> Harness:
    """`lm-eval:TASK[,TASK…]` -> the metric; an empty or malformed task list is refused."""
    tasks = tuple(t.strip() for t in name[len(PREFIX) :].split(","))
    if not all(tasks) or len(set(tasks)) != len(tasks):
        raise SoupError(f"metric {name!r}: write lm-eval:TASK or lm-eval:TASK1,TASK2 (task "
                        "names of local lm-eval YAML files, each once)")  # fmt: skip
    return Harness(tasks)


@dataclass(frozen=True)
class Harness:
    """lm-evaluation-harness tasks as a built-in metric (see the module docstring)."""

    tasks: tuple[str, ...]
    auto_class: str = "AutoModelForCausalLM"
    name: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", PREFIX + ",".join(self.tasks))

    def prepare(self, data: Path, folder: Path, config: Any, settings: Settings) -> Any:  # noqa: ARG002 (Metric protocol)
        """Load the tasks and their documents from local files (offline), and the tokenizer."""
        manager = _task_manager(data)
        root = data if data.is_dir() else data.parent
        loaded: dict[str, dict[str, Any]] = {"tasks": {}, "groups": {}, "group_map": {}}
        for task in self.tasks:
            if data.is_dir() and task not in manager.all_subtasks:
                known = ", ".join(manager.all_subtasks[:10]) or "none"
                raise SoupError(
                    f"lm-eval task {task!r} is not in {data} (tasks there: {known}); soup runs "
                    "local task YAMLs only, offline (the built-in catalogue downloads its data)"
                )
            one = _load(manager, task if data.is_dir() else str(data), task, root)
            if task not in one["tasks"]:
                raise SoupError(f"lm-eval task {task!r} is not in {data} (it defines "
                                f"{', '.join(one['tasks']) or 'no task'})")  # fmt: skip
            for part in loaded:
                loaded[part].update(one.get(part, {}))
        for task_obj in loaded["tasks"].values():
            if task_obj.get_config("num_fewshot") is None:
                task_obj.set_config(key="num_fewshot", value=0)
        return loaded, tokenizer(folder)

    def run(
        self, model: nn.Module, prepared: Any, settings: Settings, progress: Progress | None
    ) -> Score:
        from lm_eval.evaluator import evaluate

        loaded, tok = prepared
        if progress is not None:
            progress(0, len(self.tasks))
        for task_obj in loaded["tasks"].values():
            task_obj.set_fewshot_seed(seed=FEWSHOT_SEED)  # same few-shot examples every time
        lm = _live_lm(model, tok, settings)
        try:
            with _no_bars():
                out = evaluate(lm=lm, task_dict=loaded, bootstrap_iters=0, log_samples=False)
        except Exception as e:  # a task's own code (templates, !function filters) may raise
            first = str(e).splitlines()[0] if str(e) else ""
            raise SoupError(f"metric {self.name}: lm-eval failed: {type(e).__name__}: "
                            f"{first}"[:400]) from e  # fmt: skip
        if progress is not None:
            progress(len(self.tasks), len(self.tasks))
        return self.score(out, loaded)

    def score(self, out: Any, loaded: dict[str, Any]) -> Score:
        """The first task's main metric (sign: higher is better) and every reported number."""
        results: dict[str, dict[str, Any]] = out["results"]
        first = self.tasks[0]
        task_obj = loaded["tasks"][first]
        main = next(iter(task_obj.higher_is_better()))
        key = next((k for k in results[first] if k.split(",")[0] == main), None)
        if key is None or not isinstance(results[first][key], int | float):
            raise SoupError(f"lm-eval task {first!r}: no {main!r} in its results "
                            f"({sorted(results[first])[:6]})")  # fmt: skip
        value = float(results[first][key])
        score = value if task_obj.higher_is_better()[main] else -value
        metrics = {}
        for task in self.tasks:
            for k, v in results[task].items():  # "acc,none": 0.5 (also "alias", "sample_len")
                metric, comma, filt = k.partition(",")
                if not comma or "_stderr" in metric or not isinstance(v, int | float):
                    continue
                metrics["/".join([task, metric] + ([filt] if filt not in ("none", "") else []))] = (
                    float(v)
                )
        if not math.isfinite(score):
            raise SoupError(f"lm-eval task {first!r}: {key} is {value}, not a finite score")
        return Score(score, metrics)


def _task_manager(data: Path) -> Any:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SoupError("metric lm-eval:TASK needs lm-evaluation-harness: pip install "
                        "'modelsoups[lm-eval]'") from None  # fmt: skip
    if not data.exists():
        raise DataError(f"{data}: lm-eval task file or folder not found")
    if data.is_file() and data.suffix != ".yaml":
        raise DataError(f"{data}: lm-eval tasks are .yaml files (give one, or a folder)")
    with _offline():  # a folder is indexed (its *.yaml, recursively); a file is loaded by path
        include = str(data) if data.is_dir() else None
        return TaskManager(include_path=include, include_defaults=False)


def _load(manager: Any, spec: str, task: str, root: Path) -> dict[str, Any]:
    """Task `spec` (a name, or a YAML path), loaded with its documents in `root` (relative
    data paths) and offline."""
    try:
        with _offline(), _CWD_LOCK, chdir(root), _no_bars():
            loaded: dict[str, Any] = manager.load([spec])
            return loaded
    except ConnectionError as e:  # datasets' OfflineModeIsEnabled, a Hub lookup refused
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SoupError(
            f"lm-eval task {task!r}: its data needs a download ({first}); soup scores offline: "
            "point the task YAML at local files (dataset_path: json, dataset_kwargs.data_files)"
        ) from None
    except Exception as e:  # YAML errors, missing files, a task's own !function code
        first = str(e).splitlines()[0] if str(e) else ""
        raise SoupError(f"lm-eval task {task!r}: cannot load it ({type(e).__name__}: "
                        f"{first})"[:400]) from None  # fmt: skip


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The Hub and datasets in offline mode: a dataset that is not local fails at once
    (instead of ~25 s of retries without a network) and nothing is downloaded."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _no_bars() -> Iterator[None]:
    """lm-eval's per-document and datasets' loading progress bars off (soup has its own)."""
    import datasets
    import lm_eval.api.task
    from tqdm import tqdm

    was, bar = datasets.is_progress_bar_enabled(), lm_eval.api.task.tqdm
    datasets.disable_progress_bars()
    lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        lm_eval.api.task.tqdm = bar
        if was:
            datasets.enable_progress_bars()


def _live_lm(model: nn.Module, tok: Any, settings: Settings) -> Any:
    """lm-eval's HFLM around the live model (its own progress bars off: soup has one)."""
    from lm_eval.models.huggingface import HFLM

    class LiveLM(HFLM):
        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:  # noqa: ARG002
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:  # noqa: ARG002
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:  # noqa: ARG002
            return super().generate_until(requests, disable_tqdm=True)

    return LiveLM(pretrained=model, tokenizer=tok, batch_size=settings.batch_size,
                  max_length=settings.max_length)  # fmt: skip
