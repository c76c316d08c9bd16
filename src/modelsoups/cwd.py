"""The working directory changed for a block: `contextlib.chdir` for Python 3.10 too.

Two places need relative paths to mean "next to that file": a recipe file's inputs
(`cli/run.py`) and an lm-eval task's data files (`metrics/harness.py`). The working
directory is the process's, shared by its threads; like `contextlib.chdir` this does not
lock, so a caller whose threads may change it concurrently holds its own lock around it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["chdir"]


@contextlib.contextmanager
def chdir(folder: Path) -> Iterator[None]:
    """Run the block in `folder`, then go back to the directory it started in (also
    when the block raises)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)
