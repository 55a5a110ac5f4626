"""Read an experiment's runs back (params, tags, metric histories) as plain data, for summaries.

:func:`experiment_runs` is how code outside :mod:`medsup.tracking` (``medsup ablation summarize``) reads
MLflow without importing it: no MLflow type leaves this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from medsup.tracking.uri import call_store, store_client

log = logging.getLogger(__name__)

PAGE = 1000


@dataclass
class RunRecord:
    """One run: identity, status, params, tags, last metric values and the histories asked for.

    ``history[key]`` is ``[(step, value), ...]`` sorted by step (training logs one point per epoch, step =
    epoch); a metric logged twice at one step keeps its latest value.
    """

    run_id: str
    name: str
    status: str
    start_time: int
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def experiment_runs(uri: str, experiment: str, history_prefixes: Sequence[str] = (),
                    run_name: str | None = None) -> list[RunRecord]:
    """Every active run of ``experiment`` at ``uri`` (only those named ``run_name`` when given), oldest first,
    with the metric histories of every metric whose key starts with one of ``history_prefixes``.

    Raises:
        ValueError: no such store (a SQLite file that does not exist) or experiment.
        TrackingUnavailable: the store does not answer.
    """
    client = store_client(uri, must_exist=True)  # reading never creates an empty store
    exp = call_store(uri, f"read experiment {experiment!r}", lambda: client.get_experiment_by_name(experiment))
    if exp is None:
        raise ValueError(f"no experiment {experiment!r} at {uri}")
    records = call_store(uri, f"read experiment {experiment!r}",
                         lambda: _records(client, exp.experiment_id, history_prefixes, run_name))
    log.info("read %d runs of experiment %r from %s", len(records), experiment, uri)
    return records


def _records(client: MlflowClient, experiment_id: str, history_prefixes: Sequence[str],
             run_name: str | None) -> list[RunRecord]:
    """Every active run of the experiment (named ``run_name``, if given), oldest first, page by page, with the
    histories asked for."""
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=PAGE,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    records = []
    for run in runs:
        if run_name is not None and run.info.run_name != run_name:
            continue  # filtered here, not in a search filter string: any name works, quotes included
        record = RunRecord(run.info.run_id, run.info.run_name or "", run.info.status, run.info.start_time or 0,
                           dict(run.data.params), dict(run.data.tags), dict(run.data.metrics))
        for key in sorted(run.data.metrics):
            if any(key.startswith(p) for p in history_prefixes):
                points = {m.step: (m.timestamp, m.value) for m in
                          sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)}
                record.history[key] = sorted((step, value) for step, (_, value) in points.items())
        records.append(record)
    return records
