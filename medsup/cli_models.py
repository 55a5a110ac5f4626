"""``medsup models``: the MLflow model registry from the command line (list, promote, pull).

Registered in :mod:`medsup.cli` with ``app.add_typer(models_app, name="models")``. MLflow is imported inside
the commands (through :mod:`medsup.tracking.registry`), so ``medsup --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medsup.cli_common import emit, fail

models_app = typer.Typer(help="The MLflow model registry: list, promote and pull medsup models.",
                         no_args_is_help=True)

UriOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def _uri(cli_uri: str | None) -> str:
    from medsup.tracking import resolve_tracking_uri

    try:
        return resolve_tracking_uri(cli_uri, None, Path.cwd())[0]
    except ValueError as err:
        fail(str(err))


@models_app.command("list")
def list_cmd(
    task: Annotated[str | None, typer.Option("--task", "-t", help="Only medsup-<task> (default: all).")] = None,
    as_json: JsonOpt = False,
    tracking_uri: UriOpt = None,
) -> None:
    """List registered model versions: aliases, validation Dice, source run."""
    from medsup.tracking import TrackingUnavailable
    from medsup.tracking.registry import list_models

    uri = _uri(tracking_uri)
    try:
        rows = list_models(uri, task)
    except (ValueError, TrackingUnavailable) as err:
        fail(str(err))
    if as_json:
        emit(rows)
        return
    if not rows:
        typer.echo(f"no registered medsup models{f' for task {task}' if task else ''} at {uri}")
        return
    for r in rows:
        dice = "-" if r["val_dice"] is None else f"{r['val_dice']:.4f}"
        aliases = ",".join(f"@{a}" for a in r["aliases"]) or "-"
        typer.echo(f"{r['name']:<20} v{r['version']:<4} {aliases:<24} dice {dice:<7} run {r['run_id']}  "
                   f"{r['created']}  {r['status']}")


@models_app.command()
def promote(
    task: Annotated[str, typer.Option("--task", "-t", help="Task: the model is medsup-<task>.")],
    version: Annotated[int | None, typer.Option("--version", help="The version that gets the alias.")] = None,
    from_alias: Annotated[str | None, typer.Option(
        "--from-alias", help="Instead of --version: the version this alias points at (e.g. candidate).")] = None,
    best: Annotated[bool, typer.Option(
        "--best", help="Instead of --version: the version with the highest --metric.")] = False,
    metric: Annotated[str, typer.Option(help="With --best: a version tag or source-run metric, higher is "
                                             "better.")] = "val_dice",
    experiment: Annotated[str | None, typer.Option(
        help="With --best: only versions trained in this MLflow experiment.")] = None,
    alias: Annotated[str, typer.Option(help="Alias to move onto the version.")] = "champion",
    tracking_uri: UriOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Point an alias (default champion) at a version; it leaves any other version."""
    from medsup.tracking import TrackingUnavailable
    from medsup.tracking.registry import best_version, model_name, resolve_version
    from medsup.tracking.registry import promote as promote_version

    if sum((version is not None, from_alias is not None, best)) != 1:
        fail("give exactly one of --version N, --from-alias ALIAS and --best")
    if (metric != "val_dice" or experiment is not None) and not best:
        fail("--metric and --experiment go with --best")
    uri = _uri(tracking_uri)
    value = None
    try:
        if best:
            version, value = best_version(uri, task, metric, experiment)
        elif version is None:
            assert from_alias is not None
            version = resolve_version(uri, task, from_alias)
        promote_version(uri, task, version, alias)
    except (ValueError, TrackingUnavailable) as err:
        fail(str(err))
    if as_json:
        emit({"name": model_name(task), "alias": alias, "version": version, "metric": metric if best else None,
               "value": value})
        return
    typer.echo(f"{model_name(task)}@{alias} -> version {version}"
               + (f" (best {metric} {value:.4f})" if value is not None else ""))


@models_app.command()
def pull(
    model_uri: Annotated[str, typer.Argument(help="models:/medsup-<task>@<alias>, models:/medsup-<task>/<N> "
                                                  "or runs:/<run_id>/model.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the bundle (missing or empty).")],
    tracking_uri: UriOpt = None,
) -> None:
    """Export a registered model's bundle to a folder (usable by `medsup infer --model DIR`)."""
    from medsup.tracking import TrackingUnavailable
    from medsup.tracking.resolve import pull as pull_bundle

    uri = _uri(tracking_uri)
    try:
        folder = pull_bundle(uri, model_uri, out)
    except (ValueError, TrackingUnavailable) as err:
        fail(str(err))
    typer.echo(f"pulled {model_uri} into {folder}")
