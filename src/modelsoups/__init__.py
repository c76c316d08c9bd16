"""modelsoups: average fine-tuned checkpoints into one better model.

Implements the recipes of *Model Soups* (Wortsman et al. 2022, arXiv:2203.05482) over
safetensors files, Hugging Face folders and PyTorch pickles, streaming one tensor at a time.

Names are imported lazily so that `soup --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "SoupError": "errors",
    "CheckpointError": "errors",
    "UnsafePickleError": "errors",
    "IncompatibleError": "errors",
    "NonFiniteError": "errors",
    "OutputError": "errors",
    "EvaluationError": "errors",
    "SoupResult": "types",
    "StateDict": "types",
    "Checkpoint": "io",
    "MemoryCheckpoint": "io",
    "open_checkpoint": "io",
    "expand_inputs": "io",
    "average_checkpoints": "stream",
    "uniform": "recipes.uniform",
    "weighted": "recipes.uniform",
    "uniform_state_dict": "average",
    "weighted_state_dict": "average",
    "weighted_sum": "average",
    "load_soup": "average",
    "inspect_checkpoints": "inspect",
    "Evaluator": "evaluate",
    "CommandEvaluator": "evaluate",
    "FunctionEvaluator": "evaluate",
    "ModuleEvaluator": "evaluate",
    "Score": "evaluate",
    "load_scores": "scores",
    "score_candidate": "evaluate",
    "MetricEvaluator": "metrics",
    "LocalExecutor": "executor",
    "RayExecutor": "executor_ray",
    "Recipe": "recipe_file",
    "load_recipe": "recipe_file",
    "load_report": "report",
    "fetch_ingredients": "integrations.mlflow",
    "greedy_soup": "recipes.greedy",
    "learned_soup": "recipes.learned",
    "ensemble_logits": "recipes.ensemble",
    "greedy_ensemble": "recipes.ensemble",
    "predict": "recipes.ensemble",
    "wise_ft": "recipes.wise_ft",
    "wise_ft_sweep": "recipes.wise_ft",
    "model_stock": "recipes.stock",
    "task_arithmetic": "recipes.task_arithmetic",
    "task_arithmetic_sweep": "recipes.task_arithmetic",
    "recalibrate_bn": "recipes.bn",
    "similarity_report": "similarity",
    "lora_soup": "recipes.lora",
    "inspect_adapters": "adapters",
    "AdapterSpace": "adapter_space",
    "save_adapter": "adapter_space",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .adapter_space import AdapterSpace as AdapterSpace
    from .adapter_space import save_adapter as save_adapter
    from .adapters import inspect_adapters as inspect_adapters
    from .average import load_soup as load_soup
    from .average import uniform_state_dict as uniform_state_dict
    from .average import weighted_state_dict as weighted_state_dict
    from .average import weighted_sum as weighted_sum
    from .errors import CheckpointError as CheckpointError
    from .errors import EvaluationError as EvaluationError
    from .errors import IncompatibleError as IncompatibleError
    from .errors import NonFiniteError as NonFiniteError
    from .errors import OutputError as OutputError
    from .errors import SoupError as SoupError
    from .errors import UnsafePickleError as UnsafePickleError
    from .evaluate import CommandEvaluator as CommandEvaluator
    from .evaluate import Evaluator as Evaluator
    from .evaluate import FunctionEvaluator as FunctionEvaluator
    from .evaluate import ModuleEvaluator as ModuleEvaluator
    from .evaluate import Score as Score
    from .evaluate import score_candidate as score_candidate
    from .executor import LocalExecutor as LocalExecutor
    from .executor_ray import RayExecutor as RayExecutor
    from .inspect import inspect_checkpoints as inspect_checkpoints
    from .integrations.mlflow import fetch_ingredients as fetch_ingredients
    from .io import Checkpoint as Checkpoint
    from .io import MemoryCheckpoint as MemoryCheckpoint
    from .io import expand_inputs as expand_inputs
    from .io import open_checkpoint as open_checkpoint
    from .metrics import MetricEvaluator as MetricEvaluator
    from .recipe_file import Recipe as Recipe
    from .recipe_file import load_recipe as load_recipe
    from .recipes.bn import recalibrate_bn as recalibrate_bn
    from .recipes.ensemble import ensemble_logits as ensemble_logits
    from .recipes.ensemble import greedy_ensemble as greedy_ensemble
    from .recipes.ensemble import predict as predict
    from .recipes.greedy import greedy_soup as greedy_soup
    from .recipes.learned import learned_soup as learned_soup
    from .recipes.lora import lora_soup as lora_soup
    from .recipes.stock import model_stock as model_stock
    from .recipes.task_arithmetic import task_arithmetic as task_arithmetic
    from .recipes.task_arithmetic import task_arithmetic_sweep as task_arithmetic_sweep
    from .recipes.uniform import uniform as uniform
    from .recipes.uniform import weighted as weighted
    from .recipes.wise_ft import wise_ft as wise_ft
    from .recipes.wise_ft import wise_ft_sweep as wise_ft_sweep
    from .report import load_report as load_report
    from .scores import load_scores as load_scores
    from .similarity import similarity_report as similarity_report
    from .stream import average_checkpoints as average_checkpoints
    from .types import SoupResult as SoupResult
    from .types import StateDict as StateDict


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelsoups' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
