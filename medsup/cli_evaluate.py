"""``medsup evaluate``: score a folder of predictions against reference label maps.

Registered in :mod:`medsup.cli` with ``app.command("evaluate")(evaluate_command)``. numpy, SimpleITK and
MLflow are imported inside the command, so ``medsup --help`` stays instant.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from medsup.cli_common import emit, fail


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _render(summary: dict[str, Any]) -> str:
    """A short human summary: one line per class, then the counts."""
    lines = []
    for name, block in summary["classes"].items():
        d, h, s = block["dice"], block["hd95_mm"], block["nsd"]
        lines.append(f"{name:<8} Dice mean {_num(d['mean'])} median {_num(d['median'])} (n={d['n']}, "
                     f"global {_num(d['global'])})  HD95 median {_num(h['median'], 2)} mm "
                     f"(undefined {h['n_undefined']})  NSD@{block['nsd_tolerance_mm']}mm mean {_num(s['mean'])}")
        if "lesions" in block:
            les = block["lesions"]
            lines.append(f"{'':<8} lesions: recall {_num(les['recall'], 3)} ({les['detected']}/{les['reference']}), "
                         f"precision {_num(les['precision'], 3)} ({les['predicted'] - les['false_positives']}/"
                         f"{les['predicted']}), F1 {_num(les['f1'], 3)}, {les['fp_per_case']:.2f} FP per case")
    c = summary["counts"]
    lines.append(f"{c['ok']} of {c['cases']} cases evaluated, {c['missing']} missing, {c['error']} failed, "
                 f"{c['unmatched_predictions']} predictions without reference")
    return "\n".join(lines)


def evaluate_command(
    pred: Annotated[Path, typer.Option("--pred", "-p", help="Folder of predicted label maps.")],
    ref: Annotated[Path, typer.Option("--ref", "-r", help="Folder of reference label maps (or a dataset "
                                                          "root with labelsTr/).")],
    task: Annotated[str, typer.Option("--task", "-t", help="Task name (see `medsup tasks`).")] = "liver",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder for metrics.csv and summary.json "
                                                                 "(default PRED/evaluation).")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a setting, e.g. evaluate.nsd_tolerance_mm.tumour=1 (repeatable).")] = None,
    log_to: Annotated[str | None, typer.Option("--log-to", help="Log aggregates and files to this existing "
                                                                "MLflow run id.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow tracking URI for --log-to (default $MLFLOW_TRACKING_URI, else "
                               "tracking.uri, else ./mlflow.db).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary.json on stdout.")] = False,
) -> None:
    """Score predictions against references: Dice, HD95, NSD and volumes per case and class, lesion-wise detection
    for lesion classes; exit 1 if any failed."""
    from medsup.config import ConfigError, load
    from medsup.evaluation.evaluate import evaluate_folders

    try:
        cfg = load(task, overrides or [])
    except ConfigError as err:
        fail(str(err))
    uri = None
    if log_to:  # fail before the work, not after it
        from medsup.tracking.evaluation import require_run
        from medsup.tracking.uri import TrackingUnavailable, resolve_tracking_uri

        try:
            uri = resolve_tracking_uri(tracking_uri, cfg.tracking.uri, Path.cwd())[0]
            require_run(uri, log_to)
        except (ValueError, TrackingUnavailable) as err:
            fail(str(err))
    try:
        result = evaluate_folders(pred, ref, cfg, out if out is not None else Path(pred) / "evaluation")
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    if log_to and uri is not None:
        from medsup.tracking.evaluation import log_evaluation
        from medsup.tracking.uri import TrackingUnavailable

        try:
            log_evaluation(uri, log_to, result.flat_metrics(), [result.metrics_csv, result.summary_json])
        except (ValueError, TrackingUnavailable) as err:
            fail(f"{err} (the results are in {result.summary_json.parent})")
    if as_json:
        emit(result.summary)
    else:
        typer.echo(_render(result.summary))
        typer.echo(f"wrote {result.metrics_csv} and {result.summary_json}")
    for case in result.failed:
        typer.secho(f"  {case.status}: {case.error}", fg=typer.colors.RED, err=True)
    if result.failed:
        raise typer.Exit(1)
