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

    from ..report import load_report, plot_report, report_html, table_rows

    if output is not None:
        if output.suffix.lower() not in (".png", ".html", ".htm"):
            raise OutputError(f"{output}: write the report as .png or .html")
        if output.exists() and not overwrite:
            raise OutputError(f"{output}: already exists; choose another name or --overwrite")
    view = load_report(path)
    table = Table("", view.metric, "test", "weight", title=view.title)
    rows = table_rows(view)
    for i, row in enumerate(rows):
        table.add_row(*row, style="bold" if i >= len(view.ingredients) else None)
    console = Console()
    console.print(table)
    if view.recipe_file:
        console.print(f"recipe: {view.recipe_file.get('path')}", markup=False)
    if all(r.held_out is None for r in [*view.ingredients, *view.soups]) and not view.curve:
        console.print("no scores in this report: the soup was made without --eval", markup=False)
    if output is None:
        return
    if output.suffix.lower() == ".png":
        plot_report(view, output)
    else:
        output.write_text(report_html(view))
    console.print(f"wrote {output}", markup=False)


def register(app: typer.Typer) -> None:
    app.command()(report)
