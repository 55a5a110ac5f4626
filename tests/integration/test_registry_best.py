"""``medsup models promote --best``: the version with the highest metric gets the alias, against a real
SQLite store. Versions are registered straight from runs (no training): only tags and metrics matter here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from medsup.cli_models import models_app
from medsup.tracking.registry import best_version, model_name

runner = CliRunner()


@pytest.fixture
def store(tmp_path: Path) -> str:
    """medsup-tiny v1..v4: v1-v3 from experiment cv (val_dice 0.70, 0.85, 0.80; eval metric favours v3),
    v4 from experiment other with the highest val_dice (0.95); v5 has no val_dice at all."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    cv, other = client.create_experiment("cv"), client.create_experiment("other")
    name = model_name("tiny")
    client.create_registered_model(name)
    for experiment, dice, evaluated in ((cv, 0.70, 0.60), (cv, 0.85, 0.70), (cv, 0.80, 0.90), (other, 0.95, 0.5),
                                        (cv, None, None)):
        run = client.create_run(experiment)
        if evaluated is not None:
            client.log_metric(run.info.run_id, "eval.dice.organ.mean", evaluated)
        tags = {"run_id": run.info.run_id, "task": "tiny"}
        if dice is not None:
            tags["val_dice"] = repr(dice)
        client.create_model_version(name, source=str(tmp_path / "bundle"), run_id=run.info.run_id, tags=tags)
    return uri


def test_best_version_by_tag_metric_and_experiment(store: str) -> None:
    assert best_version(store, "tiny") == (4, pytest.approx(0.95))
    assert best_version(store, "tiny", experiment="cv") == (2, pytest.approx(0.85))
    # not a version tag: the source run's metric
    assert best_version(store, "tiny", metric="eval.dice.organ.mean", experiment="cv") == (3, pytest.approx(0.9))


def test_best_version_errors_name_the_problem(store: str) -> None:
    with pytest.raises(ValueError, match="no experiment 'absent'"):
        best_version(store, "tiny", experiment="absent")
    with pytest.raises(ValueError, match="has 'nothing'"):
        best_version(store, "tiny", metric="nothing")
    with pytest.raises(ValueError, match="medsup-lung"):
        best_version(store, "lung")


def test_cli_promote_best(store: str) -> None:
    uri = ["--tracking-uri", store]
    done = runner.invoke(models_app, ["promote", "--task", "tiny", "--best", "--experiment", "cv", "--json", *uri])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {"name": "medsup-tiny", "alias": "champion", "version": 2,
                                       "metric": "val_dice", "value": pytest.approx(0.85)}
    assert int(MlflowClient(store).get_model_version_by_alias("medsup-tiny", "champion").version) == 2
    text = runner.invoke(models_app, ["promote", "--task", "tiny", "--best", "--alias", "top", *uri])
    assert text.exit_code == 0 and "version 4 (best val_dice 0.9500)" in text.stdout
    both = runner.invoke(models_app, ["promote", "--task", "tiny", "--best", "--version", "1", *uri])
    assert both.exit_code == 2 and "exactly one of" in both.stderr
    stray = runner.invoke(models_app, ["promote", "--task", "tiny", "--version", "1", "--experiment", "cv", *uri])
    assert stray.exit_code == 2 and "go with --best" in stray.stderr
