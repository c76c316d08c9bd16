"""src/ stays readable: no module over 400 lines, and no function over 60 lines unless it
says why at its top.

A function is counted from its first decorator to its last line, with the signature and
the docstring (the way a reader meets it). The reason is the comment block right above
it, starting `# Over 60 lines: ...`. Read with `ast`; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "modelsoups"
LIMIT = 60
MODULE_LIMIT = 400
REASON = "# Over 60 lines:"


def long_functions(root: Path) -> list[tuple[Path, int, str, int]]:
    """(file, first line, name, lines) of each function over LIMIT lines under `root`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                top = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = (node.end_lineno or node.lineno) - top + 1
                if length > LIMIT:
                    found.append((path, top, node.name, length))
    return found


def test_no_function_is_over_60_lines_without_a_reason_at_its_top() -> None:
    missing = []
    for path, top, name, length in long_functions(ROOT):
        lines, i, comment = path.read_text().splitlines(), top - 2, []
        while i >= 0 and lines[i].lstrip().startswith("#"):  # the comment block right above
            comment.insert(0, lines[i].lstrip())
            i -= 1
        if not (comment and comment[0].startswith(REASON)):
            missing.append(f"{path.relative_to(ROOT)}:{top} {name} ({length} lines)")
    assert not missing, "split these or write '# Over 60 lines: why' above them: " + ", ".join(
        missing
    )


def test_the_counter_counts_decorators_signature_and_body(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT - 2))
    (tmp_path / "m.py").write_text(f"@decorator\ndef f():\n{body}\n\ndef g():\n{body}\n")
    assert [(name, n) for _, _, name, n in long_functions(tmp_path)] == []
    (tmp_path / "m.py").write_text(f"@decorator\ndef f(\n    a,\n):\n{body}\n")
    assert [(name, n) for _, _, name, n in long_functions(tmp_path)] == [("f", LIMIT + 2)]


def test_no_module_is_over_400_lines() -> None:
    sizes = {p: len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    over = sorted(f"{p.relative_to(ROOT)} ({n})" for p, n in sizes.items() if n > MODULE_LIMIT)
    assert not over, "split these modules: " + ", ".join(over)
