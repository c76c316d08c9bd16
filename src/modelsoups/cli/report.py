"""`soup report REPORT.json`: the soup's scores as a table, and as a plot (PNG or HTML)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import OutputError


def report(
    path: Annotated[Path, typer.Argument(help="A SOUP.report.json written by any recipe.")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="report.png (the plot) or report.html (all)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the output.")] = False,
) -> None:
    """Show a soup's report: ingredient scores vs the soup's, as a table and a plot."""
    from rich.console import Console
    from rich.table import Table

    from ..io.writer import atomic_path, check_output
    from ..report import MAX_ROWS, load_report, plot_report, report_html, table_rows

    if output is not None:
        if output.suffix.lower() not in (".png", ".html", ".htm"):
            raise OutputError(f"{output}: write the report as .png or .html")
        if output.exists() and not overwrite:
            raise OutputError(f"{output}: already exists; choose another name or --overwrite")
        check_output(output, [path])
    view = load_report(path)
    table = Table("", view.metric, "test", "weight", title=view.title)
    rows, n = table_rows(view), len(view.ingredients)
    if n > MAX_ROWS:  # a table of 10⁴ rows takes rich minutes; the HTML page has them all
        more = f"... {n - MAX_ROWS + 1:,} more ingredients (all in -o report.html)"
        rows = [*rows[: MAX_ROWS - 1], (more, "", "", ""), *rows[n:]]
        n = MAX_ROWS
    for i, row in enumerate(rows):
        table.add_row(*row, style="bold" if i >= n else None)
    console = Console()
    console.print(table)
    if view.recipe_file:
        console.print(f"recipe: {view.recipe_file.get('path')}", markup=False)
    if all(r.held_out is None for r in [*view.ingredients, *view.soups]) and not view.curve:
        console.print("no scores in this report: the soup was made without --eval", markup=False)
    if output is None:
        return
    data = plot_report(view) if output.suffix.lower() == ".png" else report_html(view).encode()
    with atomic_path(output, folder=False, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    console.print(f"wrote {output}", markup=False)


def register(app: typer.Typer) -> None:
    app.command()(report)
