"""Recipes as files: a soup described in YAML (or JSON), validated before anything runs.

    # recipe.yaml — `soup run recipe.yaml`
    method: greedy
    glob: "runs/*.safetensors"         # and/or `ingredients: [a.safetensors, ...]`
    output: soup.safetensors
    evaluator:
      command: "python eval.py --ckpt {ckpt} --split {split}"
      timeout: 600
    splits: {held_out: val, test: test}
    workers: 2

Every option of the soup commands (`soup uniform|weighted|greedy|wise-ft|stock|
task-arithmetic`) is a field of the same name (`max_shard_size`, `unsafe_pickle`, ...);
the few that differ: `ingredients`/`glob`/`mlflow` are the inputs, `base` is the pretrained
model (`--base`, and wise-ft's zero-shot end), `evaluator.command` with `splits.held_out`
is `--eval` and with `splits.test` is `--test-eval`; `metric: lm-loss` with `data: val.jsonl`
(and `device`, `batch_size`, `max_length`, `model`, `metric_dtype`, `test_metric`,
`test_data`) scores in process instead, as `--metric` does. Relative paths are relative
to the recipe file, and commands run in its folder. A field that is wrong, unknown or not an
option of the method is a one-line `SoupError` naming the field.
"""

from __future__ import annotations

import difflib
import glob as globlib
import hashlib
import json
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import SoupError
from .types import PathLike

__all__ = ["METHOD_FIELDS", "EvaluatorSpec", "MlflowSource", "Recipe", "load_recipe"]

Method = Literal["uniform", "weighted", "greedy", "wise-ft", "stock", "task-arithmetic"]

_COMMON = {"key", "unsafe_pickle", "dtype", "overwrite", "quiet", "report"}
_WRITE = {"max_shard_size"}
_SCORED = {"evaluator", "splits", "dataset", "history", "resume"}
_PARALLEL = {"workers", "ray", "ray_address"}
_METRIC = {"metric", "data", "device", "batch_size", "max_length", "model", "metric_dtype"}
_LORA = {"merge_into", "rank", "lora_average", "allow_different_base"}
# The fields each method accepts, besides method/ingredients/glob/mlflow/output.
METHOD_FIELDS: dict[str, set[str]] = {
    "uniform": _COMMON | _WRITE | _LORA | {"accumulate", "non_float", "allow_nonfinite"},
    "weighted": _COMMON
    | _WRITE
    | _LORA
    | {"accumulate", "non_float", "allow_nonfinite", "weights", "normalize", "allow_negative"},
    "greedy": _COMMON
    | _WRITE
    | _SCORED
    | _PARALLEL
    | _METRIC
    | {"scores", "accept", "tolerance", "memory", "workdir", "allow_nonfinite"}
    | {"test_metric", "test_data", "merge_into", "allow_different_base"},
    "wise-ft": _COMMON
    | _WRITE
    | _SCORED
    | _PARALLEL
    | _METRIC
    | {"base", "alpha", "alphas", "merge_into", "allow_different_base"},
    "stock": _COMMON | _WRITE | (_SCORED - {"resume"}) | _METRIC | {"base", "accumulate"},
    "task-arithmetic": _COMMON
    | _WRITE
    | _SCORED
    | _PARALLEL
    | _METRIC
    | {"base", "scale", "scales", "merge_into", "allow_different_base"},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EvaluatorSpec(_Strict):
    """A shell command scoring `{ckpt}` on `{split}`; its last stdout line is the score."""

    command: str = Field(description="e.g. 'python eval.py --ckpt {ckpt} --split {split}'")
    timeout: float | None = Field(None, gt=0, description="seconds before the command is killed")

    @model_validator(mode="after")
    def _has_ckpt(self) -> EvaluatorSpec:
        if "{ckpt}" not in self.command:
            raise ValueError("command must contain {ckpt}, where the candidate's path goes")
        return self


_SPLIT = r"^[A-Za-z0-9_.:,@%+=/-]+$"  # the characters that mean the same in any quoting


class Splits(_Strict):
    """Names of the data splits, substituted for `{split}` in the evaluator command."""

    # Substituted into a shell command: plain characters only, so no name runs code.
    held_out: str = Field("held_out", pattern=_SPLIT, description="selects: greedy steps, sweeps")
    test: str | None = Field(None, pattern=_SPLIT, description="reported only, never chosen on")


class MlflowSource(_Strict):
    """Ingredients from an MLflow experiment: each run's checkpoint artifact and a metric."""

    experiment: str
    metric: str = Field(description="logged held-out metric, used as the ingredient's score")
    artifact: str = Field("model.safetensors", description="artifact path of the checkpoint")
    tracking_uri: str | None = None
    filter: str | None = Field(None, description="MLflow search filter, e.g. params.lr = '1e-4'")


class Recipe(_Strict):
    """One soup, as `soup <method>` would make it from the same options."""

    method: Method
    output: str
    ingredients: list[str] = Field(default_factory=list)
    glob: str | list[str] | None = None
    mlflow: MlflowSource | None = None
    base: str | None = None
    weights: list[float] | None = None
    normalize: bool = True
    allow_negative: bool = False
    alpha: float | None = None
    alphas: str | list[float] | None = None
    scale: float | None = None
    scales: str | list[float] | None = None
    evaluator: EvaluatorSpec | None = None
    metric: str | None = Field(None, description="built-in metric instead of an evaluator")
    data: str | None = Field(None, description="held-out data of the metric")
    device: str | None = Field(None, description="auto (default), cpu, cuda or cuda:N")
    batch_size: int | None = Field(None, ge=1, description="default 8")
    max_length: int | None = Field(None, ge=1, description="default 512")
    model: str | None = Field(None, description="folder with config and tokenizer")
    metric_dtype: str | None = Field(None, description="fp32 (default), bf16 or fp16")
    merge_into: str | None = Field(None, description="LoRA adapters: base model to merge into")
    rank: int | None = Field(None, ge=1, description="LoRA adapters: compress to this rank")
    lora_average: Literal["exact", "factors"] = "exact"
    allow_different_base: bool = False
    test_metric: str | None = Field(None, description="built-in metric of the final soup")
    test_data: str | None = None
    splits: Splits | None = None
    scores: str | None = None
    accept: Literal["ge", "gt"] = "ge"
    tolerance: float = Field(0.0, ge=0)
    dataset: str | None = None
    history: str | None = None
    report: str | None = None
    resume: bool = False
    workers: int = Field(1, ge=1)
    ray: bool = False
    ray_address: str | None = None
    key: str | None = None
    unsafe_pickle: bool = False
    dtype: Literal["fp32", "fp16", "bf16", "fp64", "float32", "float16", "bfloat16",
                   "float64"] | None = None  # fmt: skip
    accumulate: Literal["float32", "float64"] = "float32"
    non_float: Literal["error", "first"] = "error"
    allow_nonfinite: bool = False
    memory: str = Field("2GiB", description="greedy: RAM for a running sum, e.g. 2GiB; 0: stream")
    workdir: str | None = Field(None, description="greedy: folder for the candidate files")
    max_shard_size: str | None = None
    overwrite: bool = False
    quiet: bool = False

    @model_validator(mode="after")
    def _fits_method(self) -> Recipe:
        allowed = METHOD_FIELDS[self.method]
        for name in sorted(self.model_fields_set - allowed - _ALWAYS):
            raise ValueError(f"{name}: not an option of method {self.method!r}")
        if not (self.ingredients or self.glob or self.mlflow):
            raise ValueError("give the ingredients: `ingredients`, `glob` or `mlflow`")
        if self.method in ("stock", "task-arithmetic", "wise-ft") and self.base is None:
            raise ValueError(f"base: method {self.method!r} needs the pretrained model")
        if self.method == "weighted" and self.weights is None:
            raise ValueError("weights: method 'weighted' needs one weight per ingredient")
        if self.splits and self.splits.test and self.method != "greedy":
            raise ValueError(f"splits.test: method {self.method!r} has no test evaluation")
        if (
            self.splits
            and self.splits.test
            and self.evaluator
            and "{split}" not in self.evaluator.command
        ):
            raise ValueError("evaluator.command: put {split} where the split name goes, or the "
                             "test score would be the held-out score")  # fmt: skip
        if self.metric is not None and self.evaluator is not None:
            raise ValueError("metric: give a metric or an evaluator command, not both")
        if self.method == "greedy" and self.evaluator is None and self.metric is None:
            raise ValueError("evaluator: method 'greedy' needs an evaluator command or a metric")
        return self

    def inputs(self, root: Path) -> list[str]:
        """The ingredient paths: listed ones, then each glob's matches (sorted)."""
        paths = list(self.ingredients)
        patterns = [self.glob] if isinstance(self.glob, str) else self.glob or []
        for pattern in patterns:
            matches = sorted(globlib.glob(str(root / pattern)))
            if not matches:
                raise SoupError(f"glob: {pattern!r} matches no file under {root}")
            paths += [str(Path(m).relative_to(root)) for m in matches]
        return paths

    def eval_command(self, split: str | None) -> str | None:
        """The evaluator command for one split (`{split}` substituted)."""
        if self.evaluator is None or split is None:
            return None
        return self.evaluator.command.replace("{split}", split)

    def summary(self) -> dict[str, Any]:
        """The recipe as given (defaults left out), as stored in the report."""
        return self.model_dump(mode="json", exclude_unset=True)


_ALWAYS = {"method", "output", "ingredients", "glob", "mlflow"}


def _field_error(path: Path, e: ValidationError) -> SoupError:
    """The first validation error as one line: `recipe.yaml: weights.1: <what is wrong>`."""
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        fields = Recipe.model_fields if len(first["loc"]) == 1 else {}
        close = difflib.get_close_matches(str(first["loc"][-1]), list(fields), n=1)
        msg = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")
    elif first["type"] == "missing":
        msg = "required field is missing"
    elif first.get("input") is not None and first["type"] != "value_error":
        msg += f" (got {first['input']!r:.80})"
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    where = f"{loc}: " if loc else ""
    return SoupError(f"{path}: {where}{msg}{more}")


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of fields; anything larger is a mistake
MAX_NODES = 100_000  # values once aliases are expanded (a 448-byte file can make 10⁷)


def _expanded_nodes(raw: bytes) -> int:
    """How many values the YAML document holds with every alias expanded, from its events
    (nothing is built: an alias bomb is counted, not expanded)."""
    import yaml

    anchors: dict[str, int] = {}
    stack: list[tuple[str | None, int]] = [(None, 0)]
    for e in yaml.parse(raw, yaml.SafeLoader):
        if isinstance(e, yaml.AliasEvent):
            anchor, n = stack.pop()
            stack.append((anchor, n + anchors.get(str(e.anchor), 1)))
        elif isinstance(e, yaml.ScalarEvent):
            anchor, n = stack.pop()
            stack.append((anchor, n + 1))
            if e.anchor is not None:
                anchors[e.anchor] = 1
        elif isinstance(e, yaml.CollectionStartEvent):
            stack.append((e.anchor, 1))
        elif isinstance(e, yaml.CollectionEndEvent):
            anchor, n = stack.pop()
            if anchor is not None:
                anchors[anchor] = n
            parent, total = stack.pop()
            stack.append((parent, total + n))
        if stack[0][1] > MAX_NODES or (len(stack) > 1 and stack[-1][1] > MAX_NODES):
            return max(stack[0][1], stack[-1][1])
    return sum(n for _, n in stack)


def load_recipe(path: PathLike) -> tuple[Recipe, dict[str, Any]]:
    """Read and validate a recipe file (YAML, or JSON which is YAML too).

    Returns the recipe and provenance (`path`, `sha256`) for the report.

    Example:
        >>> recipe, source = load_recipe("recipe.yaml")  # doctest: +SKIP
        >>> recipe.method
        'greedy'
    """
    import yaml

    p = Path(path)
    try:
        if not stat.S_ISREG(p.stat().st_mode):  # a FIFO would block, a device never end
            raise SoupError(f"{p}: not a regular file; a recipe is a YAML file")
        raw = p.read_bytes()
    except OSError as e:
        raise SoupError(f"{p}: cannot read recipe ({e.strerror})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise SoupError(f"{p}: {len(raw)} bytes; a recipe file is at most {MAX_RECIPE_BYTES}")
    try:
        nodes = _expanded_nodes(raw)
        if nodes > MAX_NODES:  # counted from the events, before anything is built
            raise SoupError(f"{p}: YAML aliases (*name) expand to {nodes:.3g} values; a recipe "
                            f"may hold at most {MAX_NODES}")  # fmt: skip
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SoupError(f"{p}: {line}not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise SoupError(f"{p}: a recipe is a mapping of fields (method: ..., output: ...)")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise _field_error(p, e) from None
    return recipe, {"path": str(p), "sha256": hashlib.sha256(raw).hexdigest()}


def recipe_json_schema() -> str:
    """The JSON schema of a recipe file (for editors and `soup run --schema`)."""
    return json.dumps(Recipe.model_json_schema(), indent=2)
