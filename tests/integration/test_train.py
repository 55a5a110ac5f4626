"""Tiny end-to-end trainings (smoke preset, CPU, seconds each) tracked to real MLflow stores."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from medsup.checkpoint import load_checkpoint
from medsup.cli import app
from medsup.config import load
from medsup.device import cpu_has_native_bf16
from medsup.train import TrainingError, run_training
from tests.conftest import write_msd

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_msd(tmp_path_factory.mktemp("data") / "tiny", n=4)


def _metric_keys(client: MlflowClient, run_id: str) -> set[str]:
    return set(client.get_run(run_id).data.metrics)


def test_train_two_epochs_to_sqlite(tiny_data: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load("tiny", presets=["smoke"], overrides=["train.figures=true"])
    result = run_training(cfg, tiny_data, output=tmp_path / "run", tracking_uri=uri, run_name="smoke-test")
    assert result.epochs_done == 2 and result.run_id
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke-test"
    params, tags = run.data.params, run.data.tags
    assert params["train.epochs"] == "2" and params["loss.scheme"] == "nnunet"
    assert params["planned.patch_size"] == "[32, 32, 32]"
    for tag in ("task", "fold", "git_sha", "data_fingerprint", "version.torch", "version.monai", "device"):
        assert tags.get(tag), tag
    assert tags["num_workers"] == "0"  # the smoke preset's, as the loader used it
    # train.amp is on: a CPU trains in float32 and validates in bf16 where it has bf16 in hardware
    assert tags["train_dtype"] == "float32"
    assert tags["validation_dtype"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    keys = _metric_keys(client, result.run_id)
    metrics = run.data.metrics
    heads = load_checkpoint(result.output_dir / "checkpoints" / "last.pt")["model"]
    n_heads = sum(1 for k in heads if k.startswith("heads.") and k.endswith("conv.conv.weight"))
    assert n_heads == 2  # 3 stages -> 2 decoder scales, one head each
    for i in range(n_heads):
        assert {f"train.loss.head{i}", f"train.loss.weight{i}", f"train.loss.active{i}"} <= keys
    assert {"train.loss.total", "train.lr", "val.dice", "val.dice.organ", "val.dice_global.organ",
            "train.samples_per_s"} <= keys
    assert len(client.get_metric_history(result.run_id, "train.loss.total")) == 2
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.json", "plan.json", "splits.json", "figures"} <= artifacts
    figures = {"training_curves.png", "grad_norms.png", "overlays.png", "deep_supervision.png"}
    assert {a.path for a in client.list_artifacts(result.run_id, "figures")} == {f"figures/{f}" for f in figures}
    for name in figures:
        assert mpimg.imread(result.output_dir / "figures" / name).shape[0] > 100, name
    for stage in ("encoder0", "encoder1", "encoder2", "decoder0", "decoder1", "head0", "head1", "total"):
        assert 0 < metrics[f"train.grad_norm.{stage}"] < math.inf, stage
    assert len(client.get_metric_history(result.run_id, "train.grad_norm.encoder0")) == 2
    history = json.loads((result.output_dir / "history.json").read_text(encoding="utf-8"))
    assert [h["epoch"] for h in history] == [1, 2] and "train.grad_norm.encoder0" in history[0]
    validation = json.loads((result.output_dir / "validation.json").read_text(encoding="utf-8"))
    assert len(validation) == 2 and all(Path(v["label"]).is_file() for v in validation)
    # the logged global Dice is the one the last validation's voxel counts give
    counts = [v["voxels"]["organ"] for v in validation]
    global_dice = 2 * sum(c["tp"] for c in counts) / sum(c["predicted"] + c["reference"] for c in counts)
    assert metrics["val.dice_global.organ"] == pytest.approx(global_dice)
    # lesion-wise detection for the lesion class only, and the logged recall is the one the rows give
    assert all(set(v["lesions"]) == {"lesion"} for v in validation)
    lesions = [v["lesions"]["lesion"] for v in validation]
    assert sum(c["ref_lesions"] for c in lesions) >= 2  # every tiny case holds a lesion
    recall = sum(c["detected_lesions"] for c in lesions) / sum(c["ref_lesions"] for c in lesions)
    assert metrics["val.lesion_recall.lesion"] == pytest.approx(recall)
    redrawn = CliRunner().invoke(app, ["figures", "--run", str(result.output_dir), "--cases", "--out",
                                       str(tmp_path / "redrawn"), "--device", "cpu"])
    assert redrawn.exit_code == 0, redrawn.output
    assert {p.name for p in (tmp_path / "redrawn").iterdir()} == figures
    bundle = result.bundle_dir
    assert {p.name for p in bundle.iterdir()} >= {"weights.pt", "config.json", "plan.json", "labels.json"}
    assert json.loads((bundle / "labels.json").read_text(encoding="utf-8"))["2"] == "lesion"
    # postprocessing fitted on the validation cases: in the bundle (so in the registered model) and on the run
    rules = json.loads((bundle / "postprocessing.json").read_text(encoding="utf-8"))
    assert rules["fit"]["cases"] == 2 and set(rules["fit"]["dice_before"]) == {"organ", "lesion"}
    assert tags["postprocess.rules"].startswith("organ component: ")
    assert metrics["postprocess.dice_before.organ"] == pytest.approx(rules["fit"]["dice_before"]["organ"])
    assert metrics["postprocess.seconds"] > 0


def test_none_scheme_logs_a_single_supervised_head(tiny_data: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load("tiny", ["loss.scheme=none", "train.epochs=1"], presets=["smoke"])
    result = run_training(cfg, tiny_data, output=tmp_path / "run", tracking_uri=uri)
    metrics = MlflowClient(uri).get_run(result.run_id).data.metrics
    assert metrics["train.loss.weight0"] == 1.0 and metrics["train.loss.weight1"] == 0.0
    assert metrics["train.loss.active1"] == 0.0
    assert metrics["train.grad_norm.head1"] == 0.0 and metrics["train.grad_norm.head0"] > 0  # no gradient


@pytest.mark.parametrize(("sync_every", "checked_at"), [(2, 2), (1000, 5)])
def test_a_diverging_run_stops_before_saving_the_epoch(tiny_data: Path, tmp_path: Path, sync_every: int,
                                                        checked_at: int) -> None:
    """lr 1e30 makes the loss NaN by the 2nd step: the loss's check (every train.sync_every steps, and at the
    epoch's end before validation and checkpoint) stops the run, naming the head and the first bad call."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load("tiny", ["train.lr=1e30", f"train.sync_every={sync_every}", "train.iterations_per_epoch=5"],
               presets=["smoke"])
    with pytest.raises(TrainingError, match=rf"diverged in epoch 1 \(checked at iteration {checked_at},.*"
                                            r"loss of head \d \(scale .* is nan .*call 2 of the loss") as err:
        run_training(cfg, tiny_data, output=tmp_path / "run", tracking_uri=uri)
    assert "Nothing of this epoch was saved (no checkpoint was written)" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "train.loss.total" not in runs[0].data.metrics


def test_train_against_live_server(tiny_data: Path, tmp_path: Path, mlflow_server: str) -> None:
    cfg = load("tiny", ["train.epochs=1"], presets=["smoke"])
    result = run_training(cfg, tiny_data, output=tmp_path / "run", tracking_uri=mlflow_server,
                          experiment="live")
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and "train.loss.total" in run.data.metrics
    assert "plan.json" in {a.path for a in client.list_artifacts(result.run_id)}


def test_unreachable_server_fails_before_training(tiny_data: Path, tmp_path: Path) -> None:
    cfg = load("tiny", presets=["smoke"])
    with pytest.raises(TrainingError, match=r"127\.0\.0\.1:9"):
        run_training(cfg, tiny_data, output=tmp_path / "run", tracking_uri="http://127.0.0.1:9")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_dataset_names_the_case(tiny_data: Path, tmp_path: Path) -> None:
    bad = write_msd(tmp_path / "bad", n=2)
    (bad / "labelsTr" / "case1.nii.gz").unlink()
    with pytest.raises(TrainingError, match="case1"):
        run_training(load("tiny", presets=["smoke"]), bad, output=tmp_path / "run",
                     tracking_uri=f"sqlite:///{tmp_path / 'db.sqlite'}")
    with pytest.raises(TrainingError, match="does not exist"):
        run_training(load("tiny", presets=["smoke"]), tmp_path / "nowhere", output=tmp_path / "run2",
                     tracking_uri=f"sqlite:///{tmp_path / 'db.sqlite'}")


def _cli(*args: str, env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "medsup", *args], cwd=cwd, env=env, encoding="utf-8",
                            errors="replace", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_resume_after_sigkill(tiny_data: Path, tmp_path: Path) -> None:
    """Kill a training mid-run with SIGKILL, resume it: same run, all epochs, a monotone history.

    The resume names no store and runs from another directory: it finds the run in the store its
    checkpoint was written to (the default store of a plain resume would be ./mlflow.db there). It names no
    experiment either: the run stays in the one it was started in, without a warning (as pipelines/ablation.sh
    resumes its arms).
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONUNBUFFERED": "1"}
    args = ["train", "--task", "tiny", "--data", str(tiny_data), "--preset", "smoke", "--set", "train.epochs=6",
            "--set", "train.iterations_per_epoch=4", "--output", str(out), "--tracking-uri", uri,
            "--experiment", "killed"]
    proc = _cli(*args, env=env)
    last = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    try:
        # wait for the second epoch's checkpoint, then kill without warning
        while time.monotonic() < deadline and proc.poll() is None:
            if last.is_file() and load_checkpoint(last)["epoch"] >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"training ended before it could be killed:\n{proc.communicate()[0]}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    killed_at = load_checkpoint(last)["epoch"]
    assert 2 <= killed_at < 6
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], "temp checkpoint left"
    assert load_checkpoint(last)["tracking_uri"] == uri
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = _cli("train", "--task", "tiny", "--data", str(tiny_data), "--resume", str(out), "--json",
                   env=env, cwd=elsewhere)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    summary = json.loads(output[output.index("{"):])
    assert summary["epochs"] == 6
    assert "resuming run" not in output
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("medsup-tiny") is None
    runs = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == summary["run_id"]
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "train.loss.total")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6] and steps == sorted(steps)
    assert not (elsewhere / "mlflow.db").exists()


def test_resume_of_a_finished_training_only_exports(tiny_data: Path, tmp_path: Path) -> None:
    """Killed after the last epoch's checkpoint but before the export: resuming exports, it does not train again."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load("tiny", presets=["smoke"], overrides=["train.epochs=1", "train.iterations_per_epoch=2"])
    first = run_training(cfg, tiny_data, output=tmp_path / "run", tracking_uri=uri)
    weights = first.bundle_dir / "weights.pt"
    exported = load_checkpoint(weights)["model"]
    weights.unlink()
    again = run_training(cfg, tiny_data, resume=str(tmp_path / "run"), tracking_uri=uri)
    assert again.run_id == first.run_id and again.epochs_done == 1
    assert (again.best_dice, again.best_epoch) == (first.best_dice, first.best_epoch)
    assert len(again.history) == 1
    reexported = load_checkpoint(weights)["model"]  # the same best checkpoint, exported again
    assert reexported.keys() == exported.keys() and all(torch.equal(reexported[k], exported[k]) for k in exported)
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(first.run_id, "train.loss.total")] == [1]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_pickle_bomb_checkpoint_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    class Bomb:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "bomb.pt"
    torch.save({"model": Bomb()}, bad)
    with pytest.raises(TrainingError, match="not a loadable medsup checkpoint"):
        run_training(load("tiny", presets=["smoke"]), tiny_data, resume=str(bad),
                     tracking_uri=f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert not (tmp_path / "pwned").exists()


def test_ddp_two_gloo_ranks(tiny_data: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes: one MLflow run (rank 0), metrics reduced, one checkpoint writer; both
    ranks preprocess their share of the cases into one disk cache at the same time."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(  # --standalone: a local rendezvous on a port the OS picks (a fixed one can be taken)
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "medsup", "-q", "train",
         "--task", "tiny", "--data", str(tiny_data), "--preset", "smoke", "--output", str(tmp_path / "run"),
         "--tracking-uri", uri, "--set", "train.cache=disk", "--json"],
        cwd=REPO, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MEDSUP_PREPROCESSED": str(tmp_path / "pre")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count('"run_id"') == 1  # only rank 0 reports
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("medsup-tiny").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["world_size"] == "2" and run.info.status == "FINISHED"
    assert run.data.tags["train_cache"] == "disk"
    splits = json.loads((tmp_path / "run" / "splits.json").read_text(encoding="utf-8"))
    fold = splits[int(run.data.params["data.fold_used"])]
    stores = {json.loads(p.read_text(encoding="utf-8"))["kind"]: p.parent  # (memo/ beside them has none)
              for p in (tmp_path / "pre").glob("tiny-*/*/settings.json")}
    for kind, ids in (("train", fold["train"]), ("eval", fold["val"])):
        assert sorted(p.stem for p in stores[kind].glob("case*.json")) == sorted(ids), kind
    # the check and the fingerprint of every case are memoised beside the store for the next start
    for kind in ("check", "fingerprint"):
        assert len(list((tmp_path / "pre").glob(f"tiny-*/memo/{kind}/case*.json"))) == 4, kind
    assert len(client.get_metric_history(run.info.run_id, "val.dice")) == 2


def test_the_augmentation_can_run_in_the_training_step(tiny_data: Path, tmp_path: Path) -> None:
    """augment.runs_in=step (what auto picks on CUDA) on a CPU: the loader only crops, the step augments every
    batch, and the run says where it ran."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load("tiny", presets=["smoke"], overrides=["augment.runs_in=step", "augment.affine_prob=1.0",
                                                     "augment.noise_prob=0.5", "augment.gamma_prob=0.5"])
    result = run_training(cfg, tiny_data, output=tmp_path / "run", tracking_uri=uri)
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and result.epochs_done == 2 and math.isfinite(result.best_dice)
    assert run.data.tags["augment_runs_in"] == "step" and run.data.params["augment.runs_in"] == "step"
