"""Attach an evaluation (``medsup evaluate --log-to RUN_ID``) to an existing MLflow run.

The run is only added to: metrics (step 0) and artifacts under ``evaluation/``; its status, params and tags
are left alone, so a finished training run stays finished. Synchronous on purpose: a one-off command has no
training loop to protect from a slow server, and the caller wants to know whether it worked.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from medsup.tracking.batching import MAX_METRICS_PER_BATCH, sanitize_key
from medsup.tracking.uri import TrackingUnavailable, call_store, store_client

log = logging.getLogger(__name__)

ARTIFACT_PATH = "evaluation"


def require_run(uri: str, run_id: str) -> None:
    """Check, before any work, that ``run_id`` exists at ``uri`` and is not deleted.

    Raises:
        ValueError: no such store (SQLite file absent), no such run, or the run is deleted.
        TrackingUnavailable: the store does not answer.
    """
    client = store_client(uri, must_exist=True)
    run = call_store(uri, f"look up run {run_id}", lambda: client.get_run(run_id),
                     missing=f"no MLflow run {run_id!r} at {uri}")
    if run.info.lifecycle_stage == "deleted":
        raise ValueError(f"MLflow run {run_id} at {uri} is deleted; restore it or log to another run")


def log_evaluation(uri: str, run_id: str, metrics: dict[str, float], artifacts: Sequence[Path],
                   artifact_path: str = ARTIFACT_PATH) -> int:
    """Log aggregate ``metrics`` (non-finite values skipped) and ``artifacts`` (files) to an existing run.

    Returns:
        The number of metric values logged.

    Raises:
        ValueError: the run does not exist or is deleted (see :func:`require_run`).
        TrackingUnavailable: the store refused or did not answer.
    """
    require_run(uri, run_id)
    client = store_client(uri, must_exist=True)
    now = int(time.time() * 1000)
    points = [Metric(sanitize_key(key), float(value), now, 0) for key, value in sorted(metrics.items())
              if math.isfinite(value)]
    try:
        for start in range(0, len(points), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=points[start:start + MAX_METRICS_PER_BATCH])
        for path in artifacts:
            client.log_artifact(run_id, str(path), artifact_path)
    except (MlflowException, OSError) as err:
        raise TrackingUnavailable(f"{uri}: cannot log the evaluation to run {run_id}: {err}") from err
    log.info("logged %d metrics and %d artifacts to run %s at %s", len(points), len(artifacts), run_id, uri)
    return len(points)
