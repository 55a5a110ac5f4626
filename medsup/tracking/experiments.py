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

from medsup.tracking.batching import Item, next_chunk, send_chunk
from medsup.tracking.runs import ensure_experiment
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


#: a run :func:`restore_runs` made carries the id of the run it was restored from
RESTORED_FROM = "medsup.restored_from"


def restore_runs(uri: str, experiment: str, runs: Sequence[RunRecord]) -> tuple[list[str], list[str]]:
    """Recreate ``runs`` (read back from elsewhere, e.g. arm records of an earlier session's store) in
    ``experiment`` at ``uri``, created if missing: name, start time, params, tags, every metric history they
    hold, status. A run whose id the store holds already, itself or as the :data:`RESTORED_FROM` tag of an
    earlier restore, is not made twice. A metric with no history is logged once, at the run's last step. The
    values go through the tracker's batching (:mod:`medsup.tracking.batching`): a value the store refuses is
    dropped with an error in the log, as in training.

    Returns:
        ``(created, kept)``: the original run ids restored now, and those the store already held.

    Raises:
        ValueError: the experiment is deleted.
        TrackingUnavailable: the store does not answer.
    """
    client = store_client(uri)
    experiment_id = call_store(uri, f"open experiment {experiment!r}", lambda: ensure_experiment(client, uri,
                                                                                                  experiment))
    present = call_store(uri, f"read experiment {experiment!r}", lambda: _records(client, experiment_id, (), None))
    held = {r.run_id for r in present} | {r.tags[RESTORED_FROM] for r in present if RESTORED_FROM in r.tags}
    created, kept = [], []
    for record in runs:
        if record.run_id in held:
            kept.append(record.run_id)
            continue

        def restore(record: RunRecord = record) -> None:
            tags = {k: v for k, v in record.tags.items() if k != "mlflow.runName"} | {RESTORED_FROM: record.run_id}
            run = client.create_run(experiment_id, start_time=record.start_time or None, tags=tags,
                                    run_name=record.name)
            run_id = run.info.run_id
            last = max((step for points in record.history.values() for step, _ in points), default=0)
            points = [(key, step, value) for key, history in record.history.items() for step, value in history]
            points += [(key, last, value) for key, value in record.metrics.items() if key not in record.history]
            # timestamps keep the steps' order: MLflow orders a history by them
            items = [Item(0, "param", key, value) for key, value in record.params.items()]
            items += [Item(0, "metric", key, value, step, record.start_time + step) for key, step, value in points]
            while items:  # the tracker's own batching: every log_batch limit (counts, bytes) respected
                chunk = next_chunk(items)
                send_chunk(client, run_id, chunk, check_existing=False)
                items = items[len(chunk):]
            client.set_terminated(run_id, status=record.status)

        call_store(uri, f"restore run {record.name} ({record.run_id})", restore)
        created.append(record.run_id)
        log.info("restored run %s (%s) into experiment %r at %s", record.name, record.run_id, experiment, uri)
    return created, kept
