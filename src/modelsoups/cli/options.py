"""Every option of the soup commands, declared once, and the bundles commands pass on.

An option is an `Annotated` alias: its type, flag names and help live here and nowhere
else. Options that travel together are fields of a frozen dataclass (`ReadOptions`,
`WriteOptions`, `EvalOptions`, ...), each field an alias with its default. A command names
a bundle as one parameter, and `expand_bundles` (expand.py) shows typer the bundle's
fields as the command's options, then hands the command the bundle built from them:

    @expand_bundles
    def stock(finetuned: Inputs, output: Output, base: Base, *, read: ReadOptions, ...):
        ...  # read.key, read.unsafe_pickle: typed, checked by mypy

So `soup stock --help` lists `--key` and `--unsafe-pickle` as before, and the recipe file's
fields are checked against the same parameters (tests/test_recipe_file.py). Values are
parsed where they are used (parse.py), so errors stay one line from the library's checks,
in the order the commands meet them. The decorator and the parsers are importable from
here too, next to the options a command imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .expand import expand_bundles as expand_bundles
from .parse import parse_dtype as parse_dtype
from .parse import parse_floats as parse_floats
from .parse import parse_memory as parse_memory
from .parse import parse_size as parse_size

if TYPE_CHECKING:
    from ..dtypes import DType
    from ..executor import LocalExecutor
    from ..executor_ray import RayExecutor

# -- inputs and output ----------------------------------------------------------------------
Inputs = Annotated[
    list[str],
    typer.Argument(help="Checkpoints: files, HF folders, globs, or .txt files listing paths."),
]
Zeroshot = Annotated[str, typer.Argument(help="Zero-shot / pretrained checkpoint (α=0).")]
Finetuned = Annotated[str, typer.Argument(help="Fine-tuned checkpoint (α=1).")]
Base = Annotated[str, typer.Option(help="The pretrained checkpoint θ₀.")]
CompareBase = Annotated[
    str | None, typer.Option("--base", help="Pretrained checkpoint: also compare deltas from it.")
]
Output = Annotated[Path, typer.Option("--output", "-o", help="*.safetensors file or a folder.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summaries.")]

# -- reading and writing checkpoints -----------------------------------------------------
Key = Annotated[
    str | None, typer.Option(help="Pickles: nested key holding the weights, e.g. state_dict.")
]
UnsafePickle = Annotated[
    bool, typer.Option("--unsafe-pickle", help="Allow pickles that run code. Trusted files only!")
]
Dtype = Annotated[
    str | None, typer.Option(help="Output dtype of float tensors: fp32, fp16, bf16, fp64.")
]
MaxShardSize = Annotated[
    str | None, typer.Option(help="Write an HF sharded folder, shards up to this size (5GB).")
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Accumulate = Annotated[str, typer.Option(help="Accumulator dtype: float32 or float64.")]
NonFloat = Annotated[
    str, typer.Option(help="Integer buffers that differ: 'error' or take the 'first' input's.")
]
AllowNonfinite = Annotated[
    bool, typer.Option("--allow-nonfinite", help="Average NaN/Inf weights instead of failing.")
]

# -- weights of a linear soup --------------------------------------------------------------
Weights = Annotated[str, typer.Option(help="One weight per input: 0.5,0.3,0.2")]
Normalize = Annotated[bool, typer.Option(help="Scale weights to sum to one.")]
AllowNegative = Annotated[bool, typer.Option("--allow-negative", help="Allow negative weights.")]
Alpha = Annotated[float, typer.Option(help="θ = (1-α)·zero-shot + α·fine-tuned.")]
Alphas = Annotated[str | None, typer.Option(help="Sweep, e.g. 0:1:0.1 or 0.3,0.5 (needs --eval).")]
Scale = Annotated[float, typer.Option(help="θ = θ₀ + scale·Σ(θᵢ − θ₀).")]
Scales = Annotated[str | None, typer.Option(help="Sweep, e.g. 0:1:0.1 (needs --eval).")]

# -- LoRA adapters (uniform, weighted, inspect) -------------------------------------------
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

# -- scoring: an eval command or a built-in metric -----------------------------------------
Eval = Annotated[
    str | None,
    typer.Option("--eval", help='Held-out eval command, e.g. "python eval.py --ckpt {ckpt}".'),
]
EvalTimeout = Annotated[float | None, typer.Option(help="Seconds before an eval is killed.")]
Metric = Annotated[
    str | None,
    typer.Option(
        "--metric", help="Built-in metric (lm-loss, lm-choice, accuracy, image-accuracy)."
    ),
]
Data = Annotated[Path | None, typer.Option(help="Held-out data: JSONL/CSV file or ImageFolder.")]
EvalMetric = Annotated[
    str, typer.Option("--metric", help="lm-loss, lm-choice, accuracy or image-accuracy.")
]
EvalData = Annotated[Path, typer.Option(help="Held-out data: JSONL/CSV file or ImageFolder.")]
Device = Annotated[str, typer.Option(help="Where the metric runs: auto, cpu, cuda, cuda:N.")]
BatchSize = Annotated[int, typer.Option(help="Examples per forward pass of the metric.")]
MaxLength = Annotated[int, typer.Option(help="Tokens kept per example of the metric.")]
MetricDtype = Annotated[
    str | None, typer.Option(help="What the metric's model runs in: fp32 (default), bf16, fp16.")
]
ModelDir = Annotated[
    Path | None,
    typer.Option("--model", help="Folder with config.json and tokenizer (default: 1st input)."),
]
TestEval = Annotated[
    str | None, typer.Option(help="Test eval command: scores the final soup, never selects.")
]
TestMetric = Annotated[str | None, typer.Option(help="Built-in metric for the final soup only.")]
TestData = Annotated[Path | None, typer.Option(help="Test data of --test-metric.")]
Json = Annotated[bool, typer.Option("--json", help="Print only a JSON list.")]

# -- running the evaluations and recording them --------------------------------------------
Workers = Annotated[int, typer.Option(help="Parallel evaluations of independent candidates.")]
Ray = Annotated[
    bool, typer.Option("--ray", help="Evaluate on a local Ray runtime (the ray extra).")
]
RayAddress = Annotated[
    str | None,
    typer.Option(help="Evaluate on this Ray cluster; checkpoints go by path (shared disk)."),
]
Dataset = Annotated[str, typer.Option(help="Name of the held-out metric in the history.")]
History = Annotated[Path | None, typer.Option(help="History JSONL (default: SOUP.history.jsonl).")]
Report = Annotated[Path | None, typer.Option(help="JSON report (default: SOUP.report.json).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from an existing history.")]

# -- greedy ------------------------------------------------------------------------------------
Scores = Annotated[
    Path | None, typer.Option(help="CSV/JSON of held-out scores: skips N evaluations.")
]
Accept = Annotated[str, typer.Option(help="'ge' keeps ties (paper), 'gt' (code).")]
Tolerance = Annotated[float, typer.Option(help="Accept drops up to this much.")]
Memory = Annotated[
    str,
    typer.Option(help="RAM for the running sum (12 bytes/param); larger models stream, 0: always."),
]
Workdir = Annotated[
    Path | None,
    typer.Option(
        help="Folder for the candidate files the eval command reads (default: beside -o)."
    ),
]

# -- learned -----------------------------------------------------------------------------------
LearnMetric = Annotated[str, typer.Option("--metric", help="lm-loss, accuracy or image-accuracy.")]
LearnData = Annotated[Path, typer.Option(help="Held-out data the coefficients are learned on.")]
ByLayer = Annotated[
    bool, typer.Option("--by-layer", help="One coefficient per ingredient per tensor.")
]
Epochs = Annotated[int, typer.Option(help="Passes over the data (0: uniform soup).")]
Lr = Annotated[float, typer.Option(help="AdamW learning rate (paper: 0.05).")]
Coefficients = Annotated[
    Path | None, typer.Option(help="Coefficients JSON (default: SOUP.coefficients.json).")
]


# -- bundles: what a command passes on -----------------------------------------------------
@dataclass(frozen=True)
class ReadOptions:
    """How the inputs are read (pickles)."""

    key: Key = None
    unsafe_pickle: UnsafePickle = False


@dataclass(frozen=True)
class WriteOptions:
    """How the soup is written (the output path itself is the command's `-o`)."""

    dtype: Dtype = None
    max_shard_size: MaxShardSize = None
    overwrite: Overwrite = False

    def output_dtype(self) -> DType | None:
        return parse_dtype(self.dtype)

    def shard_bytes(self) -> int | None:
        return parse_size(self.max_shard_size)


@dataclass(frozen=True)
class AverageOptions:
    """How `soup uniform` and `soup weighted` accumulate."""

    accumulate: Accumulate = "float32"
    non_float: NonFloat = "error"
    allow_nonfinite: AllowNonfinite = False


@dataclass(frozen=True)
class LoraOptions:
    """The options that apply when every input is a PEFT LoRA adapter folder."""

    merge_into: MergeInto = None
    rank: Rank = None
    lora_average: LoraAverage = "exact"
    allow_different_base: AllowDifferentBase = False

    def given(self) -> dict[str, Any]:
        """The options given, as `lora_soup` keywords (empty when none was)."""
        given = {
            "merge_into": self.merge_into,
            "rank": self.rank,
            "average": None if self.lora_average == "exact" else self.lora_average,
            "allow_different_base": self.allow_different_base or None,
        }
        return {k: v for k, v in given.items() if v is not None}


@dataclass(frozen=True)
class WeightOptions:
    """The weights of `soup weighted`, one per input, and how they are taken."""

    weights: Weights
    normalize: Normalize = True
    allow_negative: AllowNegative = False


def linear_weights(weighting: WeightOptions | None) -> tuple[list[float] | None, bool, bool]:
    """(weights, normalize, allow_negative) of a weighted soup; (None, True, False), the
    uniform soup, without `weighting`."""
    if weighting is None:
        return None, True, False
    weights = parse_floats(weighting.weights, "weights")
    return weights, weighting.normalize, weighting.allow_negative


@dataclass(frozen=True)
class MeanOptions:
    """What `soup uniform` and `soup weighted` pass on, besides the weights."""

    read: ReadOptions = field(default_factory=ReadOptions)
    write: WriteOptions = field(default_factory=WriteOptions)
    average: AverageOptions = field(default_factory=AverageOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)


@dataclass(frozen=True)
class MetricRun:
    """How a built-in metric runs its model (`--device` ... `--model`)."""

    device: Device = "auto"
    batch_size: BatchSize = 8
    max_length: MaxLength = 512
    model: ModelDir = None
    metric_dtype: MetricDtype = None


@dataclass(frozen=True)
class EvalOptions:
    """What scores candidates on held-out data: an eval command or a built-in metric."""

    eval_command: Eval = None
    eval_timeout: EvalTimeout = None
    metric: Metric = None
    data: Data = None
    run: MetricRun = field(default_factory=MetricRun)

    @property
    def given(self) -> bool:
        """Whether anything scores (an eval command or a metric)."""
        return self.eval_command is not None or self.metric is not None


@dataclass(frozen=True)
class TestOptions:
    """What scores the final soup on test data (greedy): reported, never used to choose."""

    test_eval: TestEval = None
    test_metric: TestMetric = None
    test_data: TestData = None


@dataclass(frozen=True)
class ParallelOptions:
    """Where independent evaluations run: local workers or Ray."""

    workers: Workers = 1
    ray: Ray = False
    ray_address: RayAddress = None

    def executor(self) -> LocalExecutor | RayExecutor:
        from ..executor_ray import make_executor

        return make_executor(self.workers, ray=self.ray, ray_address=self.ray_address)


@dataclass(frozen=True)
class RecordOptions:
    """Where the scores and the report go, and the name of the held-out metric in them."""

    dataset: Dataset = "held_out"
    history: History = None
    report: Report = None


@dataclass(frozen=True)
class SearchOptions:
    """A search over candidates (greedy, sweeps): how each is scored, where, and the log."""

    scoring: EvalOptions = field(default_factory=EvalOptions)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)
    records: RecordOptions = field(default_factory=RecordOptions)
    resume: Resume = False


@dataclass(frozen=True)
class AdapterOutput:
    """Where a soup of LoRA adapters goes (greedy, wise-ft, task-arithmetic): an adapter
    folder, or with `--merge-into BASE` the merged model."""

    merge_into: MergeInto = None
    allow_different_base: AllowDifferentBase = False


@dataclass(frozen=True)
class SweepOptions:
    """What `soup wise-ft` and `soup task-arithmetic` pass on, besides the mixing value."""

    search: SearchOptions = field(default_factory=SearchOptions)
    read: ReadOptions = field(default_factory=ReadOptions)
    write: WriteOptions = field(default_factory=WriteOptions)
    adapters: AdapterOutput = field(default_factory=AdapterOutput)


@dataclass(frozen=True)
class SelectionOptions:
    """How greedy accepts ingredients, and where its running sum and candidates live."""

    scores: Scores = None
    accept: Accept = "ge"
    tolerance: Tolerance = 0.0
    memory: Memory = "2GiB"
    workdir: Workdir = None
    allow_nonfinite: AllowNonfinite = False
