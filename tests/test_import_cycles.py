"""The package's modules import each other one way: no cycle, however the import is written.

The graph is read from the source with `ast`, not by importing anything. It counts every
import of a module inside the package: at the top of a module, inside functions (a lazy
import, there to keep `soup --help` from importing torch, is still a dependency, and a
cycle through it breaks as soon as someone moves it to the top) and under
`if TYPE_CHECKING:` (a type is a dependency too: the cycle issue 16 removed ran through
one). Importing `a.b.c` also runs `a.b`'s `__init__`, so it counts as importing both,
except from inside `a.b` itself. Keep layers one way: io -> checks/kernels -> recipes -> cli.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "modelsoups"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Modules of the package that `path` imports, wherever the import statement is."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # a.b.c runs a.b's __init__ too...
            prefix = ".".join(parts[:i])
            ours = name.startswith(prefix + ".") and prefix != target  # already running
            if prefix in modules and not ours:  # ...unless it is our own package
                found.add(prefix)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:  # `from p import x`: module p.x, or p's attribute x
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path `[a, b, ..., a]`, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_lazy_and_type_checking_imports() -> None:
    graph = import_graph()
    # evaluate imports recipes.bn inside ModuleEvaluator.evaluate, lazily
    assert {"modelsoups.recipes", "modelsoups.recipes.bn"} <= graph["modelsoups.evaluate"]
    # modelsoups/__init__ imports the recipes under TYPE_CHECKING only
    assert "modelsoups.recipes.greedy" in graph["modelsoups"]
    # `from . import core` inside cli names the module; io.folder's `from .base import`
    # does not count as importing io, the package it is part of
    assert "modelsoups.cli.core" in graph["modelsoups.cli"]
    assert "modelsoups.io" not in graph["modelsoups.io.folder"]


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"a"}}, ["a", "a"]),
    ],
)
def test_find_cycle_finds_a_cycle_exactly_when_there_is_one(
    graph: dict[str, set[str]], cycle: list[str] | None
) -> None:
    assert find_cycle(graph) == cycle
