"""`soup run recipe.yaml`: a soup described in a file, run as the equivalent `soup` command.

The recipe is validated (`recipe_file.Recipe`), turned into the argument list of `soup
<method>` — one recipe field per command option, checked both ways by the tests — and run
in the recipe's folder. The report (`SOUP.report.json`, or the recipe's `report`) then gets
a `recipe_file` entry: the recipe as written, its path and SHA-256, and the command line.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..cwd import chdir
from ..errors import SoupError
from .common import say

if TYPE_CHECKING:
    from ..recipe_file import Recipe

# command parameter -> recipe field, where the two names differ
_RENAMES = {"eval_timeout": "evaluator", "eval_command": "evaluator", "test_eval": "evaluator"}
_POSITIONAL = {"inputs", "finetuned", "zeroshot"}


def command_params(method: str) -> list[Any]:
    """The click parameters of `soup <method>` (typer's private copy of click's
    `Parameter`, hence Any)."""
    from .root import command

    return list(command().commands[method].params)


def _value(recipe: Recipe, name: str) -> object:
    splits = recipe.splits
    if name == "eval_command":
        return recipe.eval_command(splits.held_out if splits else "held_out")
    if name == "test_eval":
        return recipe.eval_command(splits.test if splits else None)
    if name == "eval_timeout":
        return recipe.evaluator.timeout if recipe.evaluator else None
    if name == "dataset" and recipe.dataset is None:
        return splits.held_out if splits else None
    # an option newer than the schema keeps its default (tests/test_recipe_file.py notices)
    return getattr(recipe, name, None)


def recipe_argv(recipe: Recipe, inputs: list[str]) -> list[str]:
    """`soup <method> ...` arguments equivalent to `recipe`, with these ingredient paths."""
    if recipe.method == "wise-ft":
        if len(inputs) != 1:
            raise SoupError(f"wise-ft: give exactly one fine-tuned ingredient, got {len(inputs)}")
        argv = [recipe.method, str(recipe.base), inputs[0]]
    else:
        argv = [recipe.method, *inputs]
    for param in command_params(recipe.method):
        if param.name in _POSITIONAL or param.param_type_name != "option":
            continue
        value = _value(recipe, str(param.name))
        opts: list[str] = list(param.opts)
        secondary = list(getattr(param, "secondary_opts", []))
        if value is None or (value is False and not secondary):
            continue
        if isinstance(value, bool):
            argv.append(opts[0] if value else secondary[0])
        elif isinstance(value, list):
            argv += [opts[0], ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        else:
            argv += [opts[0], str(value)]
    return argv


def _report_path(recipe: Recipe) -> Path:
    if recipe.report is not None:
        return Path(recipe.report)
    out = Path(recipe.output)
    return out.with_name(out.name.removesuffix(".safetensors") + ".report.json")


def _store_recipe(
    recipe: Recipe,
    inputs: list[str],
    source: dict[str, Any],
    argv: list[str],
) -> Path:
    """Add the recipe to the command's report (or write one for commands that have none)."""
    from ..version import __version__

    path = _report_path(recipe)
    if path.is_file() and "report" in {p.name for p in command_params(recipe.method)}:
        report = json.loads(path.read_text())
    else:  # uniform / weighted write no report of their own
        n = len(inputs)
        weights = recipe.weights or [1.0 / n] * n
        if recipe.normalize and recipe.weights:
            weights = [w / sum(weights) for w in weights]
        report = {"recipe": recipe.method, "output": recipe.output, "ingredients": inputs,
                  "weights": weights, "modelsoups_version": __version__}  # fmt: skip
    report["recipe_file"] = {
        **source,
        "recipe": recipe.summary(),
        "command": shlex.join(["soup", *argv]),
    }
    from ..io.writer import write_json

    write_json(path, report)
    return path


def _check_report(recipe: Recipe, inputs: list[str], recipe_path: Path) -> None:
    """The report the recipe is stored in is checked like every written path: never an
    ingredient, the base, the recipe file itself, or the output."""
    from ..io.writer import check_output

    out = Path(recipe.output)
    base = getattr(recipe, "base", None)
    given = [*map(Path, inputs), recipe_path, *([Path(str(base))] if base else [])]
    check_output(out, given, sidecars=[_report_path(recipe)])


def run_recipe(path: Path, *, dry_run: bool = False) -> list[str]:
    """Validate the recipe at `path`, run it, store it in the report; returns the argv."""
    from ..recipe_file import load_recipe
    from .root import command

    recipe, source = load_recipe(path)
    with chdir(path.resolve().parent):  # the recipe's relative paths mean what they say
        inputs = recipe.inputs(Path.cwd())
        if recipe.mlflow is not None:
            inputs += _from_mlflow(recipe, dry_run)
        argv = recipe_argv(recipe, inputs)
        if dry_run:
            return argv
        _check_report(recipe, inputs, path.resolve())
        command().main(args=argv, prog_name="soup", standalone_mode=False)
        report = _store_recipe(recipe, inputs, source, argv)
    say(f"recipe {path} → {recipe.output}; report {report}")
    return argv


def _from_mlflow(recipe: Recipe, dry_run: bool) -> list[str]:
    """Download the experiment's checkpoints next to the output; scores feed greedy's sort."""
    from ..integrations.mlflow import fetch_ingredients, write_scores

    spec = recipe.mlflow
    assert spec is not None
    out = Path(recipe.output)
    folder = out.with_name(out.name.removesuffix(".safetensors") + ".ingredients")
    found = fetch_ingredients(
        spec.experiment,
        metric=spec.metric,
        artifact=spec.artifact,
        tracking_uri=spec.tracking_uri,
        filter_string=spec.filter,
        dst=folder,
        download=not dry_run,
    )
    if recipe.method == "greedy" and recipe.scores is None:
        scores = folder / "scores.json"
        if not dry_run:
            write_scores(found, scores)
        recipe.scores = str(scores)
    return [str(i.path) for i in found]


def run(
    recipe: Annotated[
        Path | None, typer.Argument(help="Recipe file (YAML or JSON).", dir_okay=False)
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the equivalent command; run nothing.")
    ] = False,
    schema: Annotated[
        bool, typer.Option("--schema", help="Print the recipe's JSON schema and exit.")
    ] = False,
) -> None:
    """Run a soup recipe file: method, ingredients, evaluator, output... (see README)."""
    if schema:
        from ..recipe_file import recipe_json_schema

        print(recipe_json_schema())
        return
    if recipe is None:
        raise SoupError("give a recipe file: soup run recipe.yaml (fields: soup run --schema)")
    argv = run_recipe(recipe, dry_run=dry_run)
    if dry_run:
        print(shlex.join(["soup", *argv]))


def register(app: typer.Typer) -> None:
    app.command()(run)
