"""The model registry against real MLflow stores: one tiny model trained once, logged as a pyfunc model,
registered, listed, promoted, resolved, pulled, served by ``mlflow models predict``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from medsup.cli_models import models_app
from medsup.config import load
from medsup.data.io import write_volume
from medsup.tracking import RunTracker
from medsup.tracking.pyfunc_model import parse_input
from medsup.tracking.registry import _global_tracking_uri, list_models, log_bundle_model, promote, register
from medsup.tracking.resolve import pull, resolve_bundle
from medsup.train import run_training
from tests.conftest import make_volume, write_msd

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _has_inference_api() -> bool:
    try:
        return importlib.util.find_spec("medsup.inference.api") is not None
    except ImportError:
        return False


needs_api = pytest.mark.skipif(not _has_inference_api(),
                               reason="medsup.inference.api (predict_files) is not written yet")


@dataclass(frozen=True)
class Registered:
    """The module's store after training once, logging twice and registering both logged models."""

    uri: str
    root: Path
    run_id: str
    bundle: Path
    val_dice: float
    model_uris: tuple[str, str]


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Registered:
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load("tiny", ["train.epochs=1", "tracking.register_best=false"], presets=["smoke"])  # registers below
    result = run_training(cfg, write_msd(root / "data", n=4), output=root / "run", tracking_uri=uri)
    assert result.run_id
    before = MlflowClient(uri).get_run(result.run_id).info
    first = log_bundle_model(uri, result.run_id, result.bundle_dir)
    assert register(uri, result.run_id, "tiny", first, result.best_dice) == 1
    second = log_bundle_model(uri, result.run_id, result.bundle_dir)
    assert register(uri, result.run_id, "tiny", second, result.best_dice) == 2
    after = MlflowClient(uri).get_run(result.run_id).info
    # logging to a finished run neither reopens it nor rewrites its end time, nor duplicates its metrics
    assert (after.status, after.end_time) == (before.status, before.end_time) == ("FINISHED", before.end_time)
    assert len(MlflowClient(uri).get_metric_history(result.run_id, "train.loss.total")) == 1
    promote(uri, "tiny", 1)
    return Registered(uri, root, result.run_id, result.bundle_dir, result.best_dice, (first, second))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(torch.load(path / "weights.pt", map_location="cpu", weights_only=True)["model"])


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_logged_models_are_pyfunc_models_from_code(registered: Registered) -> None:
    client = MlflowClient(registered.uri)
    first, second = registered.model_uris
    assert first.startswith("models:/m-") and first != second
    logged = client.get_logged_model(first.removeprefix("models:/"))
    assert logged.source_run_id == registered.run_id and logged.name == "model"
    run = client.get_run(registered.run_id)
    assert logged.experiment_id == run.info.experiment_id  # not MLflow's default experiment
    assert logged.model_id in {o.model_id for o in run.outputs.model_outputs}
    names = {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    assert {"MLmodel", "requirements.txt", "code", "artifacts"} <= names
    assert "python_model.pkl" not in names  # models-from-code: nothing pickled


def test_list_models_shows_versions_aliases_and_dice(registered: Registered) -> None:
    rows = list_models(registered.uri, "tiny")
    assert [(r["name"], r["version"]) for r in rows] == [("medsup-tiny", 1), ("medsup-tiny", 2)]
    assert rows[0]["aliases"] == ["champion"] and rows[1]["aliases"] == ["candidate"]
    for row in rows:
        assert row["val_dice"] == pytest.approx(registered.val_dice)
        assert row["run_id"] == registered.run_id and row["status"] == "READY"
        assert row["created"].endswith("+00:00")
    assert list_models(registered.uri) == rows  # all medsup-* models
    assert list_models(registered.uri, "nothing") == []


def test_promote_unknown_version_is_a_clear_error(registered: Registered) -> None:
    with pytest.raises(ValueError, match=r"medsup-tiny has no version 99"):
        promote(registered.uri, "tiny", 99)
    with pytest.raises(ValueError, match="medsup-nothing"):
        promote(registered.uri, "nothing", 1)


@pytest.mark.parametrize("ref", ["models:/medsup-tiny@champion", "models:/medsup-tiny/2", "runs:/{run}/model"])
def test_resolve_bundle_gives_the_trained_weights(registered: Registered, ref: str, tmp_path: Path) -> None:
    ref = ref.format(run=registered.run_id)
    folder = resolve_bundle(registered.uri, ref, cache_dir=tmp_path / "cache")
    assert {"weights.pt", "plan.json", "config.json", "labels.json", "versions.json"} <= {
        p.name for p in folder.iterdir()}
    assert _same_weights(folder, registered.bundle)
    assert resolve_bundle(registered.uri, ref, cache_dir=tmp_path / "cache") == folder  # cached
    model_root = folder.parents[1]  # <model>/artifacts/<bundle>
    pins = (model_root / "requirements.txt").read_text(encoding="utf-8")
    assert "torch==" in pins and "monai==" in pins and "pytorch-ignite==" in pins
    assert (model_root / "code" / "medsup" / "inference").is_dir()  # loads where medsup is not installed


def test_refs_resolve_to_the_right_logged_model(registered: Registered, tmp_path: Path) -> None:
    first, second = (u.removeprefix("models:/") for u in registered.model_uris)
    cache = tmp_path / "cache"
    assert first in str(resolve_bundle(registered.uri, "models:/medsup-tiny@champion", cache))
    assert second in str(resolve_bundle(registered.uri, "models:/medsup-tiny/2", cache))
    # runs:/<id>/model is the run's latest logged model of that name
    assert second in str(resolve_bundle(registered.uri, f"runs:/{registered.run_id}/model", cache))
    assert first in str(resolve_bundle(registered.uri, registered.model_uris[0], cache))


@pytest.mark.parametrize(("ref", "named"), [
    ("models:/medsup-tiny@nope", "nope"),
    ("models:/medsup-tiny/42", "42"),
    ("models:/medsup-absent@champion", "medsup-absent"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "0123456789abcdef0123456789abcdef"),
    ("s3://bucket/model", "not an MLflow model URI"),
    ("medsup-tiny@champion", "not an MLflow model URI"),
])
def test_bad_refs_are_value_errors_naming_them(registered: Registered, ref: str, named: str,
                                               tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=named):
        resolve_bundle(registered.uri, ref, cache_dir=tmp_path)


def test_read_commands_do_not_create_a_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no MLflow store"):
        list_models(f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()


def test_pull_exports_and_refuses_foreign_folders(registered: Registered, tmp_path: Path) -> None:
    out = pull(registered.uri, "models:/medsup-tiny@champion", tmp_path / "pulled")
    assert _same_weights(out, registered.bundle)
    record = json.loads((out / "medsup-pull.json").read_text(encoding="utf-8"))
    assert record["model_ref"] == "models:/medsup-tiny@champion" and record["version"] == 1
    assert pull(registered.uri, "models:/medsup-tiny/1", out) == out  # same logged model: refreshed
    with pytest.raises(ValueError, match="not an earlier pull"):
        pull(registered.uri, "models:/medsup-tiny/2", out)  # another logged model
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ValueError, match="not empty"):
        pull(registered.uri, "models:/medsup-tiny/1", foreign)
    assert (foreign / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_cli_list_promote_pull(registered: Registered, tmp_path: Path) -> None:
    uri = ["--tracking-uri", registered.uri]
    listed = runner.invoke(models_app, ["list", "--task", "tiny", "--json", *uri])
    assert listed.exit_code == 0, listed.output
    assert [r["version"] for r in json.loads(listed.stdout)] == [1, 2]
    text = runner.invoke(models_app, ["list", *uri])
    assert text.exit_code == 0 and "medsup-tiny" in text.stdout and "champion" in text.stdout
    promoted = runner.invoke(models_app, ["promote", "--task", "tiny", "--version", "2", "--alias", "staging", *uri])
    assert promoted.exit_code == 0, promoted.output
    assert int(MlflowClient(registered.uri).get_model_version_by_alias("medsup-tiny", "staging").version) == 2
    bad = runner.invoke(models_app, ["promote", "--task", "tiny", "--version", "7", *uri])
    assert bad.exit_code == 2 and "error:" in bad.stderr and "7" in bad.stderr
    pulled = runner.invoke(models_app, ["pull", "models:/medsup-tiny/2", "--out", str(tmp_path / "b"), *uri])
    assert pulled.exit_code == 0, pulled.output
    assert (tmp_path / "b" / "weights.pt").is_file()
    garbage = runner.invoke(models_app, ["pull", "nonsense", "--out", str(tmp_path / "c"), *uri])
    assert garbage.exit_code == 2 and "not an MLflow model URI" in garbage.stderr


def test_logging_into_an_open_tracker_run_keeps_it_consistent(registered: Registered, tmp_path: Path) -> None:
    tracker = RunTracker(registered.uri, "medsup-tiny-open", "open-run", spool_dir=tmp_path, flush_interval_s=0.2)
    assert tracker.run_id
    tracker.log_params({"p": 1})
    tracker.log_metrics({"m": 1.0}, step=1)
    assert tracker.flush(30)
    model_uri = log_bundle_model(registered.uri, tracker.run_id, registered.bundle)
    client = MlflowClient(registered.uri)
    assert client.get_run(tracker.run_id).info.status == "RUNNING"  # not ended under the tracker
    tracker.log_metrics({"m": 2.0}, step=2)
    tracker.finish()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"p": "1"}
    assert [m.value for m in client.get_metric_history(tracker.run_id, "m")] == [1.0, 2.0]
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert logged.experiment_id == run.info.experiment_id and logged.status == LoggedModelStatus.READY


@pytest.mark.mlflow_server
def test_registry_round_trip_over_http(registered: Registered, mlflow_server: str, tmp_path: Path) -> None:
    with RunTracker(mlflow_server, "registry-http", "http-run", spool_dir=tmp_path) as tracker:
        assert tracker.run_id
        run_id = tracker.run_id
        model_uri = log_bundle_model(mlflow_server, run_id, registered.bundle)
    assert register(mlflow_server, run_id, "tiny-http", model_uri, 0.5) == 1
    promote(mlflow_server, "tiny-http", 1)
    logged = MlflowClient(mlflow_server).get_logged_model(model_uri.removeprefix("models:/"))
    assert logged.artifact_location.startswith("mlflow-artifacts:")  # stored and served by the server
    folder = resolve_bundle(mlflow_server, "models:/medsup-tiny-http@champion", cache_dir=tmp_path / "cache")
    assert _same_weights(folder, registered.bundle)
    rows = list_models(mlflow_server, "tiny-http")
    assert [(r["version"], r["aliases"], r["val_dice"]) for r in rows] == [(1, ["candidate", "champion"], 0.5)]


def test_pyfunc_input_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDSUP_OUTPUT_DIR", raising=False)
    assert parse_input(["a.nii.gz"]) == [(Path("a.nii.gz"), Path("medsup-predictions"))]
    assert parse_input("a.nrrd", {"output_dir": str(tmp_path)}) == [(Path("a.nrrd"), tmp_path)]
    frame = pd.DataFrame({"path": ["a.mha", "b.mha"], "output_dir": ["x", None]})
    assert parse_input(frame) == [(Path("a.mha"), Path("x")), (Path("b.mha"), Path("medsup-predictions"))]
    assert parse_input(frame, {"output_dir": "p"}) == [(Path("a.mha"), Path("p")), (Path("b.mha"), Path("p"))]
    monkeypatch.setenv("MEDSUP_OUTPUT_DIR", str(tmp_path / "env"))
    assert parse_input(pd.DataFrame({0: ["c.nii"]}), {"output_dir": ""}) == [(Path("c.nii"), tmp_path / "env")]
    with pytest.raises(ValueError, match="'path' column"):
        parse_input(pd.DataFrame({"a": [1], "b": [2]}))
    with pytest.raises(ValueError, match="empty"):
        parse_input([""])


@needs_api
def test_mlflow_models_predict_cli(registered: Registered, tmp_path: Path) -> None:
    image, _ = make_volume(seed=11)
    source = write_volume(tmp_path / "in" / "case.nii.gz", image)
    missing = tmp_path / "in" / "missing.nii.gz"
    request = {"dataframe_split": {"columns": ["path"], "data": [[str(source)], [str(missing)]]},
               "params": {"output_dir": str(tmp_path / "out")}}
    (tmp_path / "input.json").write_text(json.dumps(request), encoding="utf-8")
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("PYTHONPATH", None)
    # `mlflow models predict`, with the checkout (where the editable install points) taken off sys.path
    # first: the model must run on the medsup copy it carries in code/ (--env-manager local predicts
    # in this same process)
    without_medsup = (
        "import importlib.util, sys; "
        f"sys.path = [p for p in sys.path if p.rstrip('/') != {str(REPO)!r}]; "
        "spec = importlib.util.find_spec('medsup'); "
        # an editable install may leave site-packages/medsup/configs: a namespace package without code
        "assert spec is None or spec.origin is None, f'medsup is still importable: {spec}'; "
        "from mlflow.cli import cli; cli(prog_name='mlflow')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", without_medsup, "models", "predict", "-m", "models:/medsup-tiny@champion",
         "-i", "input.json", "-o", "predictions.json", "-t", "json", "--env-manager", "local"],
        cwd=tmp_path, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    predictions = json.loads((tmp_path / "predictions.json").read_text(encoding="utf-8"))["predictions"]
    assert [p["status"] for p in predictions] == ["ok", "error"], predictions
    assert predictions[0]["input"] == str(source)
    assert Path(predictions[0]["output"]).is_file()
    assert Path(predictions[0]["output"]).parent == tmp_path / "out"
    assert predictions[1]["input"] == str(missing) and "missing.nii.gz" in predictions[1]["error"]


@needs_api
def test_pyfunc_in_process_takes_a_list_and_the_env_folder(registered: Registered, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pyfunc

    image, _ = make_volume(seed=12)
    source = write_volume(tmp_path / "case.nrrd", image)
    monkeypatch.setenv("MEDSUP_OUTPUT_DIR", str(tmp_path / "env-out"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)  # models:/ URIs resolve against it
    model = mlflow.pyfunc.load_model(registered.model_uris[1])
    frame = model.predict([str(source)])
    assert list(frame.columns) == ["input", "output", "status", "error"]
    assert frame["status"].tolist() == ["ok"], frame.to_dict("records")
    assert Path(frame["output"][0]).parent == tmp_path / "env-out"


def test_global_tracking_uri_is_held_by_one_thread_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads logging models to two stores: each sees its own store while inside, and the process-global
    URI and $MLFLOW_TRACKING_URI are as before once both are out."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    seen: dict[str, list[str]] = {}

    def work(name: str) -> None:
        uri = f"sqlite:///{tmp_path / name}.db"
        seen[name] = []
        for _ in range(10):
            with _global_tracking_uri(uri):
                time.sleep(0.005)  # the other thread runs meanwhile; without the lock it would move the URI
                seen[name].append(mlflow.get_tracking_uri())

    threads = [threading.Thread(target=work, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert {name: set(uris) for name, uris in seen.items()} == {
        name: {f"sqlite:///{tmp_path / name}.db"} for name in ("a", "b")}
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in os.environ
