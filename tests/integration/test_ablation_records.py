"""Arm records through real SQLite MLflow stores: a run read from one store, recorded, read back and restored
into a fresh store is the same run to the summary (params, tags, metric histories, status, start time), and
restoring twice makes nothing twice."""

from __future__ import annotations

import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from medsup.evaluation.ablation import GRAD_KEY, RECORD_TAG, summarize
from medsup.evaluation.ablation_records import HISTORY_PREFIXES, read_records, write_record
from medsup.tracking.experiments import RESTORED_FROM, experiment_runs, restore_runs

EXPERIMENT = "medsup-ablation"


def _train_like_run(uri: str, scheme: str, seed: int) -> str:
    """A finished run as training leaves it: params, tags, per-epoch metrics (two of them NaN-free curves)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    run = client.create_run(exp_id, run_name=f"ablation-liver-{scheme}-seed{seed}-n2",
                            tags={"task": "liver", "n_train": "2", "loss_scheme": scheme, "seed": str(seed)})
    params = {"task": "liver", "loss.scheme": scheme, "seed": str(seed), "data.max_train_cases": "2",
              "train.epochs": "3", "train.iterations_per_epoch": "4", "planned.batch_size": "2",
              "planned.fingerprint_hash": "abc123"}
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now + epoch, epoch) for epoch in (1, 2, 3)
               for key, value in (("val.dice.liver", 0.3 * epoch - 0.01 * seed), (GRAD_KEY, 1.0 / epoch),
                                  ("train.loss.total", 1.0 / epoch))]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run.info.run_id, "FINISHED")
    return str(run.info.run_id)


def test_records_restore_into_a_fresh_store_once(tmp_path: Path) -> None:
    old, new = f"sqlite:///{tmp_path / 'old.db'}", f"sqlite:///{tmp_path / 'new.db'}"
    ids = [_train_like_run(old, scheme, seed) for scheme in ("none", "dsn") for seed in (0, 1)]
    runs = experiment_runs(old, EXPERIMENT, history_prefixes=HISTORY_PREFIXES)
    assert sorted(r.run_id for r in runs) == sorted(ids)
    for run in runs:
        write_record(tmp_path / "arms", run, [], EXPERIMENT, old)
    recorded = read_records(tmp_path / "arms")[0]

    created, kept = restore_runs(new, EXPERIMENT, recorded)
    assert sorted(created) == sorted(ids) and kept == []
    back = {r.tags[RESTORED_FROM]: r for r in experiment_runs(new, EXPERIMENT, history_prefixes=HISTORY_PREFIXES)}
    assert set(back) == set(ids)
    for run in runs:
        twin = back[run.run_id]
        assert twin.run_id != run.run_id and (twin.name, twin.status, twin.start_time) == \
            (run.name, run.status, run.start_time)
        assert twin.params == run.params
        assert twin.history == run.history  # val.dice.liver and the gradient curve, every epoch
        assert twin.metrics["train.loss.total"] == run.metrics["train.loss.total"]  # no history: its last value
        assert {k: v for k, v in twin.tags.items() if k not in (RESTORED_FROM, RECORD_TAG)}.items() >= \
            {k: v for k, v in run.tags.items() if not k.startswith("mlflow.")}.items()
        assert twin.tags[RECORD_TAG].endswith(f"{run.name}.json")

    # a second restore (the next checkout with the same store) makes nothing twice, nor does one of the originals
    assert restore_runs(new, EXPERIMENT, recorded) == ([], [r.run_id for r in recorded])
    assert restore_runs(old, EXPERIMENT, recorded)[0] == []
    assert len(experiment_runs(new, EXPERIMENT)) == len(ids)

    # the summary is the same from the original store and from the restored one
    def numbers(uri: str) -> list[tuple[object, ...]]:
        s = summarize(experiment_runs(uri, EXPERIMENT, history_prefixes=HISTORY_PREFIXES), EXPERIMENT, "liver")
        return [(a.scheme, a.seed, a.n_train, a.best, a.final, a.curve, a.grad, a.budget, a.dataset) for a in s.arms]

    assert numbers(new) == numbers(old)
