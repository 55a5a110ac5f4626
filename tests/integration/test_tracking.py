"""medsup.tracking against real MLflow stores: SQLite files in tmp and real ``mlflow server`` processes.

No MLflow mocks. Tests marked ``mlflow_server`` start servers (~10 s each on 2 cores): the shared session
server for the HTTP round trip, and two start-ups for the outage test, which kills one mid-run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from medsup.tracking import (
    RunTracker,
    TrackingUnavailable,
    check_reachable,
    replay_spool,
    resolve_tracking_uri,
    run_output_dir,
)
from medsup.tracking.spool import read_spool, spool_files
from medsup.tracking.uri import HTTP_DEFAULTS, apply_http_defaults


@pytest.fixture(autouse=True)
def _http_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the HTTP variables the tracker would set, so they are restored after each test."""
    for name, value in HTTP_DEFAULTS.items():
        monkeypatch.setenv(name, value)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------------------------------------- URIs


def test_resolve_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert resolve_tracking_uri("http://cli:1", "http://cfg:2", tmp_path) == ("http://cli:1", "--tracking-uri")
    assert resolve_tracking_uri(None, "http://cfg:2", tmp_path) == ("http://127.0.0.1:5001", "MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, "http://cfg:2", tmp_path) == ("http://cfg:2", "config")
    uri, source = resolve_tracking_uri(None, None, tmp_path / "out")
    assert source == "default"
    assert uri == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"
    assert uri.startswith("sqlite:////")  # absolute path


@pytest.mark.parametrize("bad", ["mlruns", "/abs/mlruns", "file:///abs/mlruns", "./rel"])
def test_file_store_rejected(bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="sqlite:///"):
        resolve_tracking_uri(bad, None, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", bad)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        resolve_tracking_uri(None, None, tmp_path)


def test_http_defaults_only_fill_unset_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    apply_http_defaults()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"  # the user's choice wins


def test_check_reachable_creates_sqlite_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'new' / 'dir' / 'mlflow.db'}"
    check_reachable(uri)
    assert (tmp_path / "new" / "dir" / "mlflow.db").is_file()


def test_check_reachable_closed_port_fails_fast() -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(TrackingUnavailable, match=uri.replace(".", r"\.")):
        check_reachable(uri, timeout_s=5.0)


def test_check_reachable_silent_server_times_out() -> None:
    """A host that accepts connections but never answers: the deadline holds despite MLflow's 20 s timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # the kernel completes handshakes; nobody ever reads or replies
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(TrackingUnavailable, match="no answer within 1 s"):
            check_reachable(uri, timeout_s=1.0)


# ---------------------------------------------------------------------------------------------- SQLite


def test_sqlite_run_round_trip(tmp_path: Path) -> None:
    uri = sqlite_uri(tmp_path)
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with RunTracker(uri, "medsup-test", "first-run", spool_dir=tmp_path / "spool") as tracker:
        run_id = tracker.run_id
        assert run_id is not None
        tracker.log_params({"train.lr": 0.01, "plan.patch": [64, 64, 32], "long": "x" * 7000, "a:b c?": 1})
        tracker.set_tags({"task": "liver", "medsup.output_dir": str(tmp_path)})
        for step in range(4):
            tracker.log_metrics({"train.loss": 1.0 / (step + 1), "val.dice": 0.2 * step}, step=step)
        tracker.log_metrics({"diverged": float("nan")}, step=4)
        tracker.log_artifact(tmp_path / "notes.txt")
        tracker.log_dict({"spacing": [1.0, 1.0, 2.5]}, "plan/plan.json")

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "first-run"
    assert run.data.tags["mlflow.runName"] == "first-run"
    assert run.data.tags["task"] == "liver"
    params = run.data.params
    assert params["train.lr"] == "0.01"
    assert params["plan.patch"] == "[64, 64, 32]"
    assert len(params["long"]) == 6000
    assert params["long"].endswith("[truncated]")
    assert params["a_b c_"] == "1"  # sanitised key
    assert history(client, run_id, "train.loss") == [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.25)]
    assert math.isnan(client.get_metric_history(run_id, "diverged")[0].value)
    assert {a.path for a in client.list_artifacts(run_id)} == {"notes.txt", "plan"}
    plan_file = client.download_artifacts(run_id, "plan/plan.json", str(tmp_path / "dl"))
    assert json.loads(Path(plan_file).read_text(encoding="utf-8")) == {"spacing": [1.0, 1.0, 2.5]}
    # artifacts stay beside the database, not in ./mlruns of whatever the working directory was
    assert (tmp_path / "mlartifacts").is_dir()
    # everything was confirmed: the spool and its files are gone
    assert list((tmp_path / "spool").glob("*")) == []
    assert run_output_dir(uri, run_id) == tmp_path


def test_resume_continues_the_same_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = sqlite_uri(tmp_path)
    params = {"train.lr": 0.01, "train.epochs": 4}
    with RunTracker(uri, "medsup-test", "resumable", spool_dir=tmp_path) as first:
        first.log_params(params)
        first.log_metrics({"loss": 1.0}, step=0)
        first.log_metrics({"loss": 0.9}, step=1)
    run_id = first.run_id
    assert run_id is not None

    client = MlflowClient(tracking_uri=uri)
    with caplog.at_level(logging.WARNING, logger="medsup.tracking"):
        # another name is warned about and ignored: a run cannot change experiment
        RunTracker(uri, "medsup-other", "ignored", run_id=run_id, spool_dir=tmp_path).finish()
    assert "of experiment 'medsup-test', not 'medsup-other'" in caplog.text
    assert client.get_experiment_by_name("medsup-other") is None
    with pytest.raises(ValueError, match="a new run needs an experiment name"):
        RunTracker(uri, None, "nameless", spool_dir=tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medsup.tracking"):
        second = RunTracker(uri, None, "ignored", run_id=run_id, spool_dir=tmp_path)  # None: the run's own
    assert caplog.text == ""
    assert second.run_id == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="medsup.tracking"):
        second.log_params(params)  # identical values: skipped, no error
        second.log_params({"train.epochs": 8, "resume.count": 1})  # a changed value: warned and skipped
    assert "train.epochs" in caplog.text
    second.log_metrics({"loss": 0.8}, step=2)
    second.log_metrics({"loss": 0.7}, step=3)
    second.finish()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "resumable"
    assert run.data.params["train.epochs"] == "4"
    assert run.data.params["resume.count"] == "1"
    assert history(client, run_id, "loss") == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7)]
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]


def test_exit_status_follows_the_exception(tmp_path: Path) -> None:
    uri = sqlite_uri(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    with pytest.raises(RuntimeError), RunTracker(uri, "medsup-test", "crash", spool_dir=tmp_path) as failed:
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), RunTracker(uri, "medsup-test", "ctrl-c", spool_dir=tmp_path) as killed:
        raise KeyboardInterrupt
    assert failed.run_id is not None and killed.run_id is not None
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert client.get_run(killed.run_id).info.status == "KILLED"


def test_replay_without_acks_does_not_duplicate(tmp_path: Path) -> None:
    """A spool whose acks were lost (crash between send and ack): replay finds the points in the store."""
    uri = sqlite_uri(tmp_path)
    tracker = RunTracker(uri, "medsup-test", "acks-lost", spool_dir=tmp_path / "spool")
    assert tracker.run_id is not None
    tracker.log_params({"a": 1})
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    assert tracker.flush(timeout_s=30)
    (spool,) = spool_files(tmp_path / "spool", tracker.run_id)
    lines = [ln for ln in spool.read_text(encoding="utf-8").splitlines() if '"type": "ack"' not in ln]
    tracker.finish()
    no_acks = tmp_path / "copy" / spool.name
    no_acks.parent.mkdir()
    no_acks.write_text("\n".join(lines) + "\n", encoding="utf-8")

    assert replay_spool(no_acks, uri) == 0
    client = MlflowClient(tracking_uri=uri)
    assert history(client, tracker.run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert read_spool(no_acks)[1] == []  # the replay acked what it found


def test_memory_cap_spills_to_spool_and_finish_replays_it(tmp_path: Path) -> None:
    uri = sqlite_uri(tmp_path)
    # a long interval and a tiny cap: records beyond 4 live only in the spool until finish()
    tracker = RunTracker(uri, "medsup-test", "capped", spool_dir=tmp_path, max_buffered=4,
                         flush_interval_s=3600, flush_points=10_000)
    for step in range(20):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert tracker.pending == 20
    tracker.finish()
    assert tracker.pending == 0
    assert tracker.run_id is not None
    assert history(MlflowClient(tracking_uri=uri), tracker.run_id, "loss") == [(s, float(s)) for s in range(20)]


def test_disabled_tracker_does_nothing(tmp_path: Path) -> None:
    with RunTracker("http://127.0.0.1:9", "x", "y", spool_dir=tmp_path / "spool", enabled=False) as tracker:
        tracker.log_params({"a": 1})
        tracker.set_tags({"b": "c"})
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_dict({"a": 1}, "a.json")
        assert tracker.run_id is None
        assert tracker.pending == 0
        assert tracker.flush()
    assert not (tmp_path / "spool").exists()


# ---------------------------------------------------------------------------------------------- live servers


@pytest.mark.mlflow_server
def test_http_round_trip(mlflow_server: str, tmp_path: Path) -> None:
    """Shared session server: run, params, metrics and a proxied artifact over HTTP."""
    check_reachable(mlflow_server)
    (tmp_path / "model.txt").write_text("weights", encoding="utf-8")
    with RunTracker(mlflow_server, "medsup-http", "over-http", spool_dir=tmp_path) as tracker:
        tracker.log_params({"train.lr": 0.02})
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 - 0.1 * step}, step=step)
        tracker.log_artifact(tmp_path / "model.txt", "model")
        assert tracker.flush(timeout_s=30)
        assert tracker.pending == 0
    run_id = tracker.run_id
    assert run_id is not None

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.runName"] == "over-http"
    assert run.data.params == {"train.lr": "0.02"}
    assert history(client, run_id, "loss") == [(0, 1.0), (1, 0.9), (2, 0.8)]
    local = client.download_artifacts(run_id, "model/model.txt", str(tmp_path / "dl"))
    assert Path(local).read_text(encoding="utf-8") == "weights"


@pytest.mark.mlflow_server
def test_server_outage_mid_run(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                               mlflow_server_factory: Callable[[], Any]) -> None:
    """Kill the server mid-run, keep logging, restart it on the same port and database.

    Two trackers share the outage (one server start-up pair serves both checks): ``live`` waits in
    finish() until the server is back and must deliver every point; ``gave_up`` finishes while the server
    is down, keeps its spool, and replay_spool delivers it afterwards, twice without duplicates.
    """
    server = mlflow_server_factory().start()
    uri = server.uri
    knobs = {"flush_interval_s": 0.2, "max_backoff_s": 0.5}
    live = RunTracker(uri, "medsup-outage", "live", spool_dir=tmp_path / "live", outage_tolerance_s=120, **knobs)
    gave_up = RunTracker(uri, "medsup-outage", "gave-up", spool_dir=tmp_path / "gave", outage_tolerance_s=1,
                         **knobs)
    trackers = (live, gave_up)
    for tracker in trackers:
        tracker.log_params({"train.lr": 0.01})
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "dice": 0.1 * step}, step=step)
        assert tracker.flush(timeout_s=30)

    server.stop()
    start = time.monotonic()
    for tracker in trackers:
        for step in range(3, 8):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "dice": 0.1 * step}, step=step)
        tracker.set_tags({"during": "outage"})
    logging_took = time.monotonic() - start
    assert logging_took < 2.0, "logging must not wait for the network"
    assert not live.flush(timeout_s=20)  # one failed attempt, then it returns
    assert live.pending == 11  # 5 steps x 2 metrics + 1 tag

    with caplog.at_level(logging.ERROR, logger="medsup.tracking"):
        gave_up.finish()  # server still down: gives up after 1 s, raises nothing
    assert gave_up.run_id is not None
    (spool,) = spool_files(tmp_path / "gave", gave_up.run_id)
    assert str(spool) in caplog.text and "replay" in caplog.text
    assert len(read_spool(spool)[1]) == 12  # 10 points, the tag, the end of the run

    server.start()  # same port, same database
    live.finish()
    assert live.pending == 0
    assert live.run_id is not None
    assert spool_files(tmp_path / "live", live.run_id) == []

    assert replay_spool(spool, uri) == 10
    assert replay_spool(spool, uri) == 0  # confirmed records are not sent twice

    client = MlflowClient(tracking_uri=uri)
    for tracker in trackers:
        assert tracker.run_id is not None
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["during"] == "outage"
        assert history(client, tracker.run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(8)]
        assert history(client, tracker.run_id, "dice") == [(s, 0.1 * s) for s in range(8)]
    server.stop()
