"""`python -m modelsoups` is the `soup` command."""

from .cli import run

run()
