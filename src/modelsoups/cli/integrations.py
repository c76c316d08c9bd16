"""`soup mlflow`: ingredients and their logged held-out scores from an MLflow experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import say


def mlflow(
    experiment: Annotated[str, typer.Argument(help="Experiment name (or id).")],
    metric: Annotated[str, typer.Option(help="The held-out metric each run logged.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for checkpoints, scores and list.")
    ],
    artifact: Annotated[
        str, typer.Option(help="Checkpoint artifact path in each run (file or folder).")
    ] = "model.safetensors",
    tracking_uri: Annotated[
        str | None, typer.Option(help="file:./mlruns, sqlite:///mlflow.db, http://host:5000")
    ] = None,
    filter: Annotated[
        str | None, typer.Option("--filter", help="MLflow search filter: params.lr = '1e-4'")
    ] = None,
) -> None:
    """Download an MLflow experiment's checkpoints; write scores.json and ingredients.txt.

    Then: soup greedy OUT/ingredients.txt --scores OUT/scores.json --eval ... -o soup.safetensors
    """
    from ..integrations.mlflow import fetch_ingredients, write_scores

    found = fetch_ingredients(
        experiment,
        metric=metric,
        dst=output,
        artifact=artifact,
        tracking_uri=tracking_uri,
        filter_string=filter,
    )
    scores = write_scores(found, output / "scores.json")
    listing = output / "ingredients.txt"
    listing.write_text("".join(f"{i.path.relative_to(output)}\n" for i in found))
    for i in found:
        say(f"{i.name}\t{metric} = {i.score:.6g}\t{i.path}")
    say(f"wrote {len(found)} ingredients, {scores} and {listing}")


def register(app: typer.Typer) -> None:
    app.command()(mlflow)
