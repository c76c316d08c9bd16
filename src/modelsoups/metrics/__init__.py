"""Built-in metrics: score candidates in process with a transformers model built once.

`MetricEvaluator("lm-loss", "val.jsonl")` is an `Evaluator` (higher is better) for every
recipe; `soup eval` and `--metric` use it from the command line. The metrics and their
exact definitions are in `lm.py` (lm-loss, lm-choice) and `classify.py` (accuracy,
image-accuracy); the live model and how candidates are copied into it in `model.py`.
"""

from .base import Settings as Settings
from .data import DataError as DataError
from .evaluator import METRICS as METRICS
from .evaluator import MetricEvaluator as MetricEvaluator
from .evaluator import get_metric as get_metric

__all__ = ["METRICS", "DataError", "MetricEvaluator", "Settings", "get_metric"]
