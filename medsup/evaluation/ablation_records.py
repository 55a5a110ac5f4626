"""Arm records: one JSON file per finished arm of the deep-supervision ablation, kept beside its report.

An ablation is hours of training (the lung one, 27 arms of ~10 minutes on 2 cores) and the MLflow store and run
folders it writes live outside version control. A session that ends part way loses them, and a fresh checkout
would start over. So ``pipelines/ablation.sh`` records every arm as soon as it is finished (its training run and,
for the largest training-set size, its early-exit inferences) into ``docs/ablation/<task>/arms/<run>.json``,
committed with the report, and skips an arm whose record exists. In a fresh checkout it first restores the
recorded runs into its new store (``medsup ablation restore``: :func:`medsup.tracking.experiments.restore_runs`),
so one experiment holds every arm again, and ``medsup ablation summarize --records DIR`` adds the recorded
early exits (and any arm the store lacks): the report is the same whether an arm was trained in this session or
an earlier one.

A record holds what the summary reads, not the models: the run's identity, status, params, tags, last metric
values and the histories of the validation metrics (``val.*``) and of the first encoder stage's gradient norm,
plus the trimmed early-exit sources (:class:`~medsup.evaluation.ablation.ExitSource`). A run read back from a
record carries the tag :data:`~medsup.evaluation.ablation.RECORD_TAG` (the record's path), so the report can
say which arms came from records.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medsup.data.files import write_json
from medsup.evaluation.ablation import DATASET_PARAM, GRAD_KEY, RECORD_TAG, ExitSource
from medsup.tracking.experiments import RunRecord

log = logging.getLogger(__name__)

FORMAT = "medsup-ablation-arm/1"
#: the metric histories a record keeps: every validation metric (any --metric the summary may be asked for)
#: and the gradient-flow curve
HISTORY_PREFIXES = ("val.", GRAD_KEY)


def record_path(folder: Path, run_name: str) -> Path:
    """``folder/<run_name>.json``.

    Raises:
        ValueError: the run name could not be a file name (empty, a path separator, or a leading dot).
    """
    if not run_name or "/" in run_name or "\\" in run_name or run_name.startswith("."):
        raise ValueError(f"run name {run_name!r} cannot name an arm record file")
    return Path(folder) / f"{run_name}.json"


def write_record(folder: Path, run: RunRecord, exits: Sequence[ExitSource], experiment: str,
                 tracking_uri: str) -> Path:
    """Write the record of one finished ``run`` (and its early exits) to ``folder/<run name>.json``, atomically.

    Raises:
        ValueError: ``run`` is not FINISHED, an early exit belongs to another arm (scheme, seed or training-set
            size differ from the run's params), or the records already in ``folder`` were trained on another
            dataset (data fingerprint): a pool synthesised by other code or settings, whose arms do not compare.
    """
    if run.status != "FINISHED":
        raise ValueError(f"run {run.name} ({run.run_id}) is {run.status}, not FINISHED: only finished arms are "
                         "recorded")
    arm = (run.params.get("loss.scheme"), run.params.get("seed"), run.params.get("data.max_train_cases"))
    for source in exits:
        cfg = source.config
        other = (cfg["loss"]["scheme"], str(cfg["seed"]), str(cfg["data"].get("max_train_cases")))
        if other != arm:
            raise ValueError(f"{source.folder}: an early exit of arm (scheme, seed, n_train) = {other}, not of run "
                             f"{run.name}'s {arm}")
    path = record_path(folder, run.name)
    dataset = run.params.get(DATASET_PARAM)
    for other_path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
        if other_path != path and (theirs := read_record(other_path)[0].params.get(DATASET_PARAM)) != dataset:
            raise ValueError(f"run {run.name} trained on dataset {dataset} ({DATASET_PARAM}), but {other_path} on "
                             f"{theirs}: the pool was made by other code or settings, and arms on different data do "
                             f"not compare (delete {folder} to start the ablation over)")
    history = {key: points for key, points in run.history.items() if key.startswith(HISTORY_PREFIXES)}
    write_json(path, {
        "format": FORMAT,
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "experiment": experiment,
        "tracking_uri": tracking_uri,
        "run": {**asdict(run), "history": history},
        "early_exit": [asdict(source) for source in exits],
    })
    log.info("recorded arm %s (run %s, %d early exits) in %s", run.name, run.run_id, len(exits), path)
    return path


def read_record(path: Path) -> tuple[RunRecord, list[ExitSource]]:
    """One record back: the run (tagged with :data:`RECORD_TAG` = ``path``) and its early-exit sources.

    Raises:
        ValueError: naming ``path``: unreadable, not JSON, or not an arm record of this format.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"format {found!r}, expected {FORMAT!r}")
        r: dict[str, Any] = data["run"]
        # JSON holds NaN as null (write_json): such points are dropped, as the summary drops non-finite values
        history = {str(key): [(int(step), float(v)) for step, v in points if v is not None and math.isfinite(v)]
                   for key, points in r["history"].items()}
        run = RunRecord(str(r["run_id"]), str(r["name"]), str(r["status"]), int(r["start_time"]),
                        {str(k): str(v) for k, v in r["params"].items()},
                        {**{str(k): str(v) for k, v in r["tags"].items()}, RECORD_TAG: str(path)},
                        {str(k): float(v) for k, v in r.get("metrics", {}).items() if v is not None}, history)
        exits = [ExitSource(str(e["folder"]), dict(e["report"]), dict(e["config"]),
                            None if e.get("classes") is None else dict(e["classes"]))
                 for e in data.get("early_exit", [])]
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror or err})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not an ablation arm record ({err})") from None
    return run, exits


def read_records(folder: Path) -> tuple[list[RunRecord], list[ExitSource]]:
    """Every record in ``folder`` (``*.json``, sorted by name): the runs and all their early-exit sources.
    A folder that does not exist holds no records.

    Raises:
        ValueError: a file in ``folder`` is not a readable arm record (named in the message).
    """
    runs: list[RunRecord] = []
    exits: list[ExitSource] = []
    for path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
        run, run_exits = read_record(path)
        runs.append(run)
        exits.extend(run_exits)
    log.info("read %d arm records (%d early exits) from %s", len(runs), len(exits), folder)
    return runs, exits
