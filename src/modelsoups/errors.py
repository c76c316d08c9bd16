"""Errors raised by modelsoups.

The library raises these and never prints or exits; the `soup` CLI turns any of them into one
line on stderr and a non-zero exit code. Every message names the file (and tensor, where
there is one) and, when there is an obvious fix, says it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "EvaluationError",
    "IncompatibleError",
    "InputChangedError",
    "NonFiniteError",
    "OutputError",
    "SoupError",
    "UnsafePickleError",
]


class SoupError(Exception):
    """Base class of every error modelsoups raises on purpose."""


class CheckpointError(SoupError):
    """A checkpoint cannot be read: missing, truncated, corrupt or not a checkpoint."""


class UnsafePickleError(CheckpointError):
    """A pickle needs arbitrary code execution to load and `unsafe_pickle` was not given."""


class InputChangedError(CheckpointError):
    """An input changed (was truncated, extended or rewritten) while the soup read it."""


class IncompatibleError(SoupError):
    """The ingredients do not fit together: keys, shapes or integer buffers differ."""


class NonFiniteError(SoupError):
    """A weight is NaN or infinite (pass `allow_nonfinite=True` to average it anyway)."""


class OutputError(SoupError):
    """The output cannot be written: exists, equals an input, folder missing, disk full."""


class EvaluationError(SoupError):
    """An evaluator crashed, timed out, or returned something that is not a finite score."""
