"""Ingredients straight from an MLflow experiment: each run's checkpoint and its logged score.

A hyperparameter sweep logged to MLflow already has what a greedy soup needs: one run per
fine-tuning, its checkpoint as an artifact (`mlflow.log_artifact("model.safetensors")`,
or a `save_pretrained` folder) and its held-out score as a metric. `fetch_ingredients`
downloads the checkpoints of the experiment's finished runs and returns them with that
metric, which `write_scores` saves in the `--scores` format of `soup greedy` (so the N
ingredient evaluations are not redone).

Optional extra: `pip install 'modelsoups[mlflow]'`. Local tracking folders (`./mlruns`,
`file:///...`) are read with MLflow's file store, which MLflow ≥ 3.7 only opens when
`MLFLOW_ALLOW_FILE_STORE=true`: it is set for the duration of the call when the tracking
URI is such a folder.

Example:
    >>> found = fetch_ingredients("sweep", metric="val_acc", dst="ingredients",
    ...                           tracking_uri="file:./mlruns")  # doctest: +SKIP
    >>> write_scores(found, "ingredients/scores.json")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SoupError
from ..types import PathLike

__all__ = ["MlflowIngredient", "fetch_ingredients", "write_scores"]

INSTALL = "pip install 'modelsoups[mlflow]'"


@dataclass(frozen=True)
class MlflowIngredient:
    """One finished run: its name (file stem of `path`), id, checkpoint and logged score."""

    name: str
    run_id: str
    path: Path
    score: float


def _import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError as e:
        raise SoupError(f"MLflow is not installed ({e}); install it with: {INSTALL}") from None
    return mlflow


@contextlib.contextmanager
def _local_store_allowed(uri: str | None) -> Iterator[None]:
    """MLflow refuses `file:` stores unless told; reading one the user named is fine. Our
    calls send no MLflow telemetry and draw no progress bars (unless the user set these)."""
    local = uri is None or uri.startswith("file:") or "://" not in uri
    keys = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    if local:
        keys["MLFLOW_ALLOW_FILE_STORE"] = "true"
    before = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: v for k, v in keys.items() if before[k] is None})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)


def _names(runs: Sequence[Any]) -> list[str]:
    """Run names made safe as file names; run ids where names are missing or repeat."""
    names = [re.sub(r"[^\w.=-]+", "_", r.info.run_name or "") or r.info.run_id for r in runs]
    if len(set(names)) < len(names):
        names = [r.info.run_id for r in runs]
    return names


def fetch_ingredients(
    experiment: str,
    *,
    metric: str,
    dst: PathLike,
    artifact: str = "model.safetensors",
    tracking_uri: str | None = None,
    filter_string: str | None = None,
    download: bool = True,
) -> list[MlflowIngredient]:
    """Download the checkpoints of an experiment's finished runs, with their `metric`.

    Args:
        experiment: experiment name (or id).
        metric: the held-out metric each run logged (its last value is the score).
        dst: folder for the checkpoints: `dst/<run name>.safetensors` for a file artifact,
            `dst/<run name>/` for a folder artifact (a `save_pretrained` folder).
        artifact: the checkpoint's artifact path inside each run.
        tracking_uri: e.g. `file:./mlruns`, `sqlite:///mlflow.db`, `http://host:5000`.
        filter_string: MLflow search filter, e.g. `params.lr = '1e-4'`.
        download: `False` lists the runs and their future paths without downloading.

    Returns:
        One `MlflowIngredient` per finished run, oldest first. Runs that failed or still run
        are left out; a finished run without the metric or the artifact is an error.
    """
    mlflow = _import_mlflow()
    from mlflow.exceptions import MlflowException

    with _local_store_allowed(tracking_uri):
        try:
            client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is None and experiment.isdigit():
                exp = client.get_experiment(experiment)
            if exp is None:
                known = [e.name for e in client.search_experiments()]
                raise SoupError(f"MLflow: no experiment {experiment!r} (there are: {known})")
            runs = client.search_runs(
                [exp.experiment_id],
                filter_string=filter_string or "",
                order_by=["attributes.start_time ASC"],
                max_results=50_000,
            )
            runs = [r for r in runs if r.info.status == "FINISHED"]
            if not runs:
                raise SoupError(f"MLflow: experiment {experiment!r} has no finished run")
            return [
                _fetch(r, name, metric, artifact, Path(dst), tracking_uri, download)
                for r, name in zip(runs, _names(runs), strict=True)
            ]
        except MlflowException as e:
            raise SoupError(f"MLflow: {str(e).splitlines()[0][:300]}") from None


def _fetch(
    run: Any, name: str, metric: str, artifact: str, dst: Path, uri: str | None, download: bool
) -> MlflowIngredient:
    import mlflow.artifacts

    rid = run.info.run_id
    if metric not in run.data.metrics:
        raise SoupError(
            f"MLflow run {name} ({rid}): no metric {metric!r} (it logged "
            f"{sorted(run.data.metrics)}); pick the held-out metric with --metric"
        )
    score = float(run.data.metrics[metric])
    if not math.isfinite(score):
        raise SoupError(f"MLflow run {name} ({rid}): metric {metric!r} is {score}")
    suffix = Path(artifact).suffix
    target = dst / (name + suffix if suffix else name)
    if download:
        dst.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dst, prefix=".mlflow-") as tmp:
            try:
                got = Path(mlflow.artifacts.download_artifacts(
                    run_id=rid, artifact_path=artifact, dst_path=tmp, tracking_uri=uri
                ))  # fmt: skip
            except (OSError, mlflow.exceptions.MlflowException) as e:
                raise SoupError(
                    f"MLflow run {name} ({rid}): cannot download artifact {artifact!r} "
                    f"({str(e).splitlines()[0][:200]})"
                ) from None
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(got, target)
    return MlflowIngredient(name, rid, target, score)


def write_scores(ingredients: Sequence[MlflowIngredient], path: PathLike) -> Path:
    """Write `{ingredient name: score}` as JSON, the format `soup greedy --scores` reads."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({i.name: i.score for i in ingredients}, indent=2) + "\n")
    return p
