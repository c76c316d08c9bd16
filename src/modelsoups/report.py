"""Read a soup's JSON report and show it: ingredient scores against the soup's.

Every `soup` recipe writes `SOUP.report.json`. `load_report` reads any of them into one
`ReportView` — the ingredients with their held-out scores, the soups (with test scores
where they exist) and a curve where there is one (greedy: the soup's held-out score after
each step, from the history; WiSE-FT / task arithmetic: the score of each swept value) —
which `plot_report` draws with matplotlib (imported lazily) and `report_html` turns into a
self-contained HTML page (table + embedded PNG).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SoupError
from .types import PathLike

__all__ = ["ReportView", "load_report", "plot_report", "report_html"]


@dataclass
class Row:
    name: str
    held_out: float | None = None
    test: float | None = None
    weight: float | None = None


@dataclass
class ReportView:
    """What a report says, in one shape whatever the recipe."""

    path: Path
    recipe: str
    dataset: str
    ingredients: list[Row]
    soups: list[Row]
    curve: list[tuple[float, float]] = field(default_factory=list)
    curve_label: str = ""
    recipe_file: dict[str, Any] | None = None

    @property
    def metric(self) -> str:
        """Column and axis label: `held-out`, or `held-out (val_acc)` for a named metric."""
        return "held-out" if self.dataset == "held_out" else f"held-out ({_label(self.dataset)})"

    @property
    def title(self) -> str:
        return f"{self.recipe} soup — {_label(self.path.name)}"


# What a report may hold and still be shown: its size, the rows printed in the terminal,
# the characters of a label (a label of 10⁵ characters stalls matplotlib for minutes).
MAX_BYTES = 256 << 20
MAX_ROWS = 200
MAX_LABEL = 80
# Scores beyond this are not scores (and no plot can scale them): shown blank, like text.
MAX_SCORE = 1e100


def _num(x: object) -> float | None:
    """`x` as a score, or None for what is not one: text, bools, NaN, ±inf, huge values."""
    if not isinstance(x, int | float) or isinstance(x, bool):
        return None
    try:
        value = float(x)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return value if abs(value) <= MAX_SCORE else None  # NaN fails the test too


def _label(x: object) -> str:
    text = str(x)
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 3] + "..."


def _test(report: dict[str, Any]) -> float | None:
    t = report.get("test")
    return _num(t.get("score")) if isinstance(t, dict) else _num(t)


def _history(report: dict[str, Any], base: Path) -> list[dict[str, Any]]:
    """The greedy history's records; lines that are not JSON objects (a torn last line,
    binary junk) are skipped: the report itself is what is shown."""
    name = report.get("history")
    if not isinstance(name, str):
        return []
    for p in (Path(name), base / name, base / Path(name).name):
        if p.is_file():
            try:
                data = _bytes(p)
            except (OSError, SoupError):  # unreadable or too large: the report alone is shown
                return []
            records = []
            for ln in data.decode("utf-8", errors="replace").splitlines():
                try:
                    r = json.loads(ln)
                except ValueError:
                    continue
                if isinstance(r, dict):
                    records.append(r)
            return records
    return []


def _bytes(p: Path) -> bytes:
    """The bytes of regular file `p` (a FIFO would block, /dev/zero never end), at most
    `MAX_BYTES` of them."""
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO: no wait for a writer
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SoupError(f"{p}: not a regular file")
        if st.st_size > MAX_BYTES:
            raise SoupError(f"{p}: {st.st_size:,} bytes; a report is at most {MAX_BYTES:,}")
        return f.read(MAX_BYTES + 1)


def _read(p: Path) -> dict[str, Any]:
    """The report's JSON object, or a one-line error."""
    try:
        report = json.loads(_bytes(p).decode("utf-8"))
    except OSError as e:
        raise SoupError(f"{p}: cannot read report ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SoupError(f"{p}: not a JSON report (binary content)") from None
    except json.JSONDecodeError as e:
        raise SoupError(f"{p}: not a JSON report (line {e.lineno}: {e.msg})") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise SoupError(f"{p}: not a JSON report ({str(e)[:80]})") from None
    except RecursionError:
        raise SoupError(f"{p}: not a soup report (nested too deeply)") from None
    if not isinstance(report, dict) or not isinstance(report.get("recipe"), str):
        raise SoupError(f"{p}: not a soup report (no 'recipe' name)")
    for name in ("ingredients", "weights", "sweep"):
        if not isinstance(report.get(name) or [], list):
            kind = type(report[name]).__name__
            raise SoupError(f"{p}: not a soup report ({name!r} is a {kind}, not a list)")
    return report


def _row(ing: object, dataset: str, weight: float | None) -> Row:
    if isinstance(ing, dict):
        name = str(ing.get("name", ing.get("path")))[:200]
        return Row(name, _num(ing.get(dataset)), weight=_num(ing.get("weight", weight)))
    return Row(Path(str(ing)[:200]).name, weight=weight)


def load_report(path: PathLike) -> ReportView:
    """Read `SOUP.report.json` (any recipe's) into a `ReportView`."""
    p = Path(path)
    report = _read(p)
    recipe, dataset = _label(report["recipe"]), report.get("dataset", "held_out")
    dataset = dataset if isinstance(dataset, str) else "held_out"
    weights = report.get("weights") or []
    rows = [_row(ing, dataset, _num(weights[i]) if i < len(weights) else None)
            for i, ing in enumerate(report.get("ingredients") or [])]  # fmt: skip
    given = report.get("recipe_file")
    view = ReportView(
        p, recipe, dataset, rows, [], recipe_file=given if isinstance(given, dict) else None
    )
    view.soups.append(Row(f"{recipe} soup", _num(report.get("held_out")), _test(report)))
    if recipe == "greedy":
        steps = [r for r in _history(report, p.parent) if r.get("kind") == "greedy"]
        best = [(_num(r.get("soup_size")), _num(r.get(dataset))) for r in steps
                if r.get("accepted") is True]  # fmt: skip
        view.curve = [(x, y) for x, y in best if x is not None and y is not None]
        view.curve_label = "greedy soup after each accepted ingredient"
    sweep = [r for r in report.get("sweep") or [] if isinstance(r, dict)]
    what = next((k for k in ("alpha", "scale") if _num(report.get(k)) is not None), None)
    if sweep and what:
        value = _num(report[what])
        points = [(_num(r.get(what)), _num(r.get(dataset))) for r in sweep]
        view.curve = [(x, y) for x, y in points if x is not None and y is not None]
        view.curve_label = f"{view.metric} by {what}"
        view.soups[0].name += f" ({what} = {value:g})"
        if view.soups[0].held_out is None:
            view.soups[0].held_out = next((s for a, s in view.curve if a == value), None)
    return view


def _columns(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [x for x, _ in points], [y for _, y in points]


def plot_report(view: ReportView, out: PathLike | None = None) -> bytes:
    """Draw ingredient scores (dots) against soup scores (lines); returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        scored = sorted(
            ((r.held_out, r.weight) for r in view.ingredients if r.held_out is not None),
            key=lambda t: -t[0],
        )
        if view.curve and view.recipe != "greedy":
            ax.plot(*_columns(view.curve), "o-", color="tab:blue", label=view.curve_label)
            ax.set_xlabel(view.curve_label.rsplit(" ", 1)[-1])
        else:
            points = [(float(i + 1), s) for i, (s, _) in enumerate(scored)]
            xs, ys = _columns(points)
            ax.scatter(xs, ys, color="tab:gray", zorder=3, label="ingredients (best first)")
            chosen = [p for p, (_, w) in zip(points, scored, strict=True) if w]
            if chosen and len(chosen) < len(scored):
                cx, cy = _columns(chosen)
                ax.scatter(cx, cy, facecolors="none", edgecolors="tab:green", s=140, zorder=4,
                           label="in the soup")  # fmt: skip
            if view.curve:
                ax.plot(*_columns(view.curve), "s--", color="tab:orange", label=view.curve_label)
            ax.set_xlabel("ingredient rank by held-out score")
        for soup, color in zip(view.soups, ("tab:red", "tab:purple"), strict=False):
            if soup.held_out is not None:
                ax.axhline(soup.held_out, color=color, label=f"{soup.name}: {soup.held_out:.4g}")
            if soup.test is not None:
                ax.axhline(
                    soup.test, color=color, ls=":", label=f"{soup.name}, test: {soup.test:.4g}"
                )
        ax.set_ylabel(view.metric)
        ax.set_title(view.title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    png = buf.getvalue()
    if out is not None:
        Path(out).write_bytes(png)
    return png


def table_rows(view: ReportView) -> list[tuple[str, str, str, str]]:
    """(name, held-out, test, weight) as text, ingredients first, then the soups."""

    def fmt(x: float | None) -> str:
        return "" if x is None else f"{x:.6g}"

    rows = [(r.name, fmt(r.held_out), fmt(r.test), fmt(r.weight)) for r in view.ingredients]
    return rows + [(s.name, fmt(s.held_out), fmt(s.test), "") for s in view.soups]


def report_html(view: ReportView, png: bytes | None = None) -> str:
    """A self-contained page: the table, the plot (embedded PNG) and the recipe used."""
    png = plot_report(view) if png is None else png
    head = ("", view.metric, "test", "weight")
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = []
    n = len(view.ingredients)
    for i, row in enumerate(table_rows(view)):
        cls = ' class="soup"' if i >= n else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    recipe = ""
    if view.recipe_file:
        text = json.dumps(view.recipe_file, indent=2)
        recipe = f"<h2>Recipe</h2><pre>{html.escape(text)}</pre>"
    image = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(view.title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .8em;text-align:right}}
td:first-child{{text-align:left}}tr.soup{{font-weight:bold;background:#f4f4f4}}</style>
</head><body><h1>{html.escape(view.title)}</h1>
<table><tr>{cells}</tr>{"".join(body)}</table>
<p><img alt="ingredient and soup scores" src="data:image/png;base64,{image}"></p>
{recipe}</body></html>
"""
