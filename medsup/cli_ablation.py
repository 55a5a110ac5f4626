"""``medsup ablation``: the deep-supervision ablation (``pipelines/ablation.sh``): `summarize` one task, `overview` all.

Registered in :mod:`medsup.cli` with ``app.add_typer(ablation_app, name="ablation")``. MLflow and
matplotlib are imported inside the command, so ``medsup --help`` stays instant.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from medsup.cli_common import fail

ablation_app = typer.Typer(help="The deep-supervision ablation: per-task reports from its runs, and an overview.",
                           no_args_is_help=True)


@ablation_app.command()
def summarize(
    experiment: Annotated[str, typer.Option(help="MLflow experiment holding the ablation's training runs.")]
    = "medsup-ablation",
    task: Annotated[str, typer.Option("--task", "-t", help="Only runs of this task.")] = "liver",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for ablation.md, ablation.png and "
                                                          "ablation.json.")] = Path("docs"),
    early_exit: Annotated[Path | None, typer.Option(
        help="Folder of `medsup infer --exit-level K` outputs (report.json + evaluation/summary.json).")] = None,
    metric: Annotated[str | None, typer.Option(
        help="Validation metric: val.dice[.CLASS] (per-case mean) or val.dice_global[.CLASS] (pooled voxels); "
             "default per task: val.dice.liver, val.dice_global.tumour for lung.")] = None,
    threshold: Annotated[float | None, typer.Option(
        help="Convergence threshold on the metric (default per task: 0.9 for liver, 0.5 for lung).")] = None,
    reproduce: Annotated[list[str] | None, typer.Option(
        help="Command line that reproduced the runs, shown in the report (repeatable).")] = None,
    records: Annotated[Path | None, typer.Option(
        help="Folder of arm records (`medsup ablation record`): arms whose runs the store does not hold count "
             "too.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers (ablation.json) on stdout.")] = False,
) -> None:
    """Tables (convergence, low data, gradient flow, early exit), a figure and a generated default-scheme
    paragraph from the ablation's MLflow runs (and arm records), written atomically to OUT/ablation.md."""
    from medsup.config import ConfigError, load
    from medsup.evaluation.ablation import CLASS_PREFIX, GRAD_KEY, task_metric
    from medsup.evaluation.ablation import summarize as summarize_runs
    from medsup.evaluation.ablation_records import read_records
    from medsup.evaluation.ablation_report import write_report
    from medsup.tracking import TrackingUnavailable, resolve_tracking_uri
    from medsup.tracking.experiments import RESTORED_FROM, experiment_runs

    if early_exit is not None and not early_exit.is_dir():
        fail(f"--early-exit {early_exit}: no such folder")
    try:
        current = load(task).loss.scheme
        uri = resolve_tracking_uri(tracking_uri, None, Path.cwd())[0]
        key, _ = task_metric(task, metric, threshold)
        recorded, recorded_exits = read_records(records) if records is not None else ([], [])
        try:
            runs = experiment_runs(uri, experiment, history_prefixes=(key, CLASS_PREFIX, GRAD_KEY))
        except ValueError as err:  # no such store or experiment: the records may hold every arm
            if not recorded:
                raise
            typer.secho(f"warning: {err}; the report is made from the {len(recorded)} arm records in {records}",
                        fg=typer.colors.YELLOW, err=True)
            runs = []
        # a run the store holds (itself, or restored from its record) counts from the store
        in_store = {r.run_id for r in runs} | {r.tags[RESTORED_FROM] for r in runs if RESTORED_FROM in r.tags}
        runs += [r for r in recorded if r.run_id not in in_store]
        summary = summarize_runs(runs, experiment, task, metric, threshold, early_exit, current, recorded_exits)
    except (ConfigError, ValueError, TrackingUnavailable) as err:
        fail(str(err))
    args = ["medsup", "ablation", "summarize", "--experiment", experiment, "--task", task, "--out", str(out)]
    args += ["--early-exit", str(early_exit)] if early_exit is not None else []
    args += ["--records", str(records)] if records is not None else []
    args += ["--metric", metric] if metric else []
    args += ["--threshold", str(threshold)] if threshold is not None else []
    commands = [*(reproduce or []), f"MLFLOW_TRACKING_URI={shlex.quote(uri)} {shlex.join(args)}"]
    paths = write_report(summary, out, commands)
    if as_json:
        typer.echo(paths["numbers"].read_text(encoding="utf-8").rstrip())
    else:
        typer.echo("\n".join(summary.conclusion))
        typer.echo(f"wrote {paths['markdown']} and {paths['figure']}")


@ablation_app.command()
def record(
    run_name: Annotated[str, typer.Option("--run-name", help="The arm's MLflow run name (ablation-TASK-SCHEME-"
                                                             "seedS-nN); its latest finished run is recorded.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Records folder; the record is OUT/RUN_NAME.json.")],
    experiment: Annotated[str, typer.Option(help="MLflow experiment holding the run.")] = "medsup-ablation",
    early_exit: Annotated[Path | None, typer.Option(
        help="This arm's `medsup infer --exit-level K` outputs (report.json + evaluation/summary.json), "
             "recorded with it.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db).")] = None,
) -> None:
    """Record one finished arm (its run's params, tags and validation/gradient histories, and its early exits)
    as OUT/RUN_NAME.json, atomically: what `summarize --records OUT` reads when the store is gone."""
    from medsup.evaluation.ablation import exit_sources
    from medsup.evaluation.ablation_records import HISTORY_PREFIXES, write_record
    from medsup.tracking import TrackingUnavailable, resolve_tracking_uri
    from medsup.tracking.experiments import experiment_runs

    if early_exit is not None and not early_exit.is_dir():
        fail(f"--early-exit {early_exit}: no such folder")
    try:
        uri = resolve_tracking_uri(tracking_uri, None, Path.cwd())[0]
        runs = experiment_runs(uri, experiment, history_prefixes=HISTORY_PREFIXES, run_name=run_name)
        finished = [r for r in runs if r.status == "FINISHED"]
        if not finished:
            found = ", ".join(f"{r.run_id} {r.status}" for r in runs) or "none"
            raise ValueError(f"no finished run named {run_name!r} in experiment {experiment!r} at {uri} "
                             f"(runs of that name: {found})")
        sources = exit_sources(early_exit) if early_exit is not None else []
        path = write_record(out, finished[-1], sources, experiment, uri)
    except (ValueError, TrackingUnavailable) as err:
        fail(str(err))
    typer.echo(f"wrote {path} ({len(sources)} early exits)")


@ablation_app.command()
def restore(
    records: Annotated[Path, typer.Option(help="Folder of arm records (`medsup ablation record`).")],
    experiment: Annotated[str, typer.Option(help="MLflow experiment to restore them into (created if missing).")]
    = "medsup-ablation",
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db).")] = None,
) -> None:
    """Recreate the recorded arms' runs (params, tags, validation and gradient curves, status) in the
    experiment, so that it holds every arm again after the store they were trained in is gone. A run the
    store holds already (or restored before) is not made twice. Models and early exits are not runs: the
    records keep the early-exit results for `summarize --records`."""
    from medsup.evaluation.ablation_records import read_records
    from medsup.tracking import TrackingUnavailable, resolve_tracking_uri
    from medsup.tracking.experiments import restore_runs

    if not records.is_dir():
        fail(f"--records {records}: no such folder")
    try:
        uri = resolve_tracking_uri(tracking_uri, None, Path.cwd())[0]
        created, kept = restore_runs(uri, experiment, read_records(records)[0])
    except (ValueError, TrackingUnavailable) as err:
        fail(str(err))
    typer.echo(f"restored {len(created)} runs into experiment {experiment!r} at {uri} "
               f"({len(kept)} held there already)")


@ablation_app.command()
def overview(
    reports: Annotated[list[Path], typer.Argument(
        help="Per-task report folders (docs/ablation/<task>), their ablation.json, or a folder of them.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The overview (Markdown); its figure and numbers go "
                                                          "beside it (.png, .json).")] = Path("docs/ablation.md"),
    reproduce: Annotated[list[str] | None, typer.Option(
        help="Command line that reproduced the reports, shown in the overview (repeatable).")] = None,
) -> None:
    """The ablation across tasks: every task's report side by side, one figure, and a verdict on the default
    loss.scheme computed from them, written atomically to OUT."""
    from medsup.config import ConfigError, load
    from medsup.evaluation.ablation import NUMBERS, load_summary
    from medsup.evaluation.ablation_overview import find_reports, write_overview

    missing = [str(p) for p in reports if not p.exists()]
    if missing:
        fail(f"no such report folder or file: {', '.join(missing)}")
    found = find_reports(reports)
    try:
        current = load(load_summary(found[0] / NUMBERS).task).loss.scheme if found else None
        args = ["medsup", "ablation", "overview", *map(str, reports), "--out", str(out)]
        paths = write_overview(found, out, [*(reproduce or []), shlex.join(args)], current)
    except (ConfigError, ValueError) as err:
        fail(str(err))
    typer.echo(f"wrote {paths['markdown']}, {paths['figure']} and {paths['numbers']}")
