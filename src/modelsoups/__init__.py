"""modelsoups: average fine-tuned checkpoints into one better model.

Implements the recipes of *Model Soups* (Wortsman et al. 2022, arXiv:2203.05482) over
safetensors files, Hugging Face folders and PyTorch pickles, streaming one tensor at a time.

Names are imported lazily so that `soup --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

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
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
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
    from .inspect import inspect_checkpoints as inspect_checkpoints
    from .io import Checkpoint as Checkpoint
    from .io import expand_inputs as expand_inputs
    from .io import open_checkpoint as open_checkpoint
    from .recipes.uniform import uniform as uniform
    from .recipes.uniform import weighted as weighted
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
