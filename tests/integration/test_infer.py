"""Batch inference with a tiny model trained in seconds: exact output grids, robustness, resume, sharding."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from medsup.cli import app
from medsup.config import load
from medsup.data.geometry import Geometry
from medsup.data.io import read_header, read_image, write_image
from medsup.device import CPU_BF16_ENV, cpu_has_native_bf16
from medsup.engine.validation import dice_per_class
from medsup.inference.api import InferRequest, infer
from medsup.inference.batch import BatchReport, CaseJob, plan_outputs, run_batch
from medsup.inference.bundle import BundleError, load_bundle
from medsup.inference.postprocess import task_rules
from medsup.inference.predictor import PredictOptions, Predictor
from medsup.models.unet import build_model
from medsup.train import run_training
from tests.conftest import make_volume, write_msd
from tests.unit.test_io import write_dicom_series

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle folder, dataset folder) of a tiny model that has learnt the organ."""
    root = tmp_path_factory.mktemp("infer")
    data = write_msd(root / "data", n=4)
    cfg = load("tiny", ["plan.target_spacing=[1.5, 1.5, 1.5]", "train.epochs=6", "train.iterations_per_epoch=20",
                        "plan.base_filters=8",
                        "train.val_every=6", "infer.overlap=0.5"], presets=["smoke"])
    result = run_training(cfg, data, output=root / "run", tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return result.bundle_dir, data


@pytest.fixture(scope="module")
def coarse(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle planned at 4 mm (the smoke preset), for full-size CT where only the grid matters."""
    root = tmp_path_factory.mktemp("coarse")
    cfg = load("tiny", ["train.epochs=1"], presets=["smoke"])
    return run_training(cfg, trained[1], output=root / "run", tracking_uri=f"sqlite:///{root / 'db'}").bundle_dir


def _request(model: Path, inputs: list[str], out: Path, **kw: object) -> InferRequest:
    return InferRequest(inputs=inputs, output_dir=out, model=str(model), model_path=model, device="cpu", **kw)  # type: ignore[arg-type]


def test_folder_outputs_on_exact_input_grid(trained: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = trained
    report = infer(_request(bundle, [str(data / "imagesTr")], tmp_path / "out"))
    assert [c["status"] for c in report.cases] == ["ok"] * 4
    dices = []
    for case in report.cases:
        image, pred = read_header(case["input"]).geometry, read_image(case["output"])
        assert pred.geometry.mismatches(image, tol=1e-5) == []
        assert pred.array.dtype == np.uint8
        label = read_image(Path(case["input"]).parents[1] / "labelsTr" / Path(case["input"]).name)
        dices.append(dice_per_class(pred.array, label.array, [1])[0])
        assert set(case["seconds"]) >= {"read", "preprocess", "network", "export", "write"}
        assert case["volumes_ml"]["organ"] > 0
    assert np.mean(dices) > 0.6, dices
    saved = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert saved["summary"] == {"ok": 4, "skipped": 0, "error": 0, "not_run": 0}
    assert saved["bundle"]["task"] == "tiny" and saved["device"] == "cpu"


def test_lps_and_ras_copies_give_the_same_labels(trained: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, _ = trained
    image, _ = make_volume(11)
    lps = write_image(tmp_path / "in" / "lps.nii.gz", image.array, image.geometry)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [image.array.shape[0] - 1, image.array.shape[1] - 1]
    ras_geom = Geometry.from_affine(image.geometry.affine() @ flip, image.array.shape)
    ras = write_image(tmp_path / "in" / "ras.nii.gz", np.ascontiguousarray(image.array[::-1, ::-1]), ras_geom)
    assert read_header(lps).geometry.orientation != read_header(ras).geometry.orientation
    infer(_request(bundle, [str(tmp_path / "in")], tmp_path / "out"))
    a, b = read_image(tmp_path / "out" / "lps.nii.gz"), read_image(tmp_path / "out" / "ras.nii.gz")
    assert b.geometry.mismatches(ras_geom, tol=1e-5) == []
    np.testing.assert_array_equal(a.array, b.array[::-1, ::-1])
    assert a.array.any()


def test_bad_cases_are_reported_and_skipped(trained: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = trained
    inp = tmp_path / "in"
    shutil.copytree(data / "imagesTr", inp)
    (inp / "corrupt.nii.gz").write_bytes((inp / "case0.nii.gz").read_bytes()[:300])
    write_image(inp / "nan.nii.gz", np.full((20, 20, 12), np.nan, np.float32), Geometry(
        (20, 20, 12), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    flat = make_volume()[0]
    write_image(inp / "slice.nii.gz", flat.array[:, :, :1], Geometry((24, 20, 1), flat.geometry.spacing,
                                                                      flat.geometry.origin, flat.geometry.direction))
    result = runner.invoke(app, ["infer", "-i", str(inp), "-o", str(tmp_path / "out"), "--model", str(bundle),
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    status = {Path(c["input"]).name: c for c in report["cases"]}
    assert [n for n, c in status.items() if c["status"] == "ok"] == [f"case{i}.nii.gz" for i in range(4)]
    assert "corrupt.nii.gz" in status["corrupt.nii.gz"]["error"]
    assert "NaN/Inf" in status["nan.nii.gz"]["error"]
    assert "single slice" in status["slice.nii.gz"]["error"]
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert outputs == [*(f"case{i}.nii.gz" for i in range(4)), "report.json"]  # no partial or temp files
    # --fail-fast stops at the first failure (cases run in name order: case0..3, corrupt, nan, slice)
    ff = infer(_request(bundle, [str(inp)], tmp_path / "ff", fail_fast=True))
    assert [c["status"] for c in ff.cases] == ["ok"] * 4 + ["error"]


def test_resume_skips_complete_outputs(trained: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = trained
    out = tmp_path / "out"
    infer(_request(bundle, [str(data / "imagesTr" / "case0.nii.gz"), str(data / "imagesTr" / "case1.nii.gz")], out))
    (out / "case1.nii.gz").write_bytes(b"truncated")  # an incomplete output from some other writer
    progress = RecordingProgress()
    again = infer(_request(bundle, [str(data / "imagesTr")], out, resume=True), progress=progress)
    status = {Path(c["input"]).name: c["status"] for c in again.cases}
    assert status == {"case0.nii.gz": "skipped", "case1.nii.gz": "ok", "case2.nii.gz": "ok", "case3.nii.gz": "ok"}
    # the overall bar counts every case, the per-case bar runs over each predicted case's tiles to the end
    assert progress.total == 4 and len(progress.finished) == 4
    assert progress.started == ["case1.nii.gz", "case2.nii.gz", "case3.nii.gz"]
    assert len(progress.tile_ends) == 3 and all(done == total > 0 for done, total in progress.tile_ends)


class RecordingProgress:
    """A BatchProgress that records what it is told."""

    def __init__(self) -> None:
        self.total = -1
        self.started: list[str] = []
        self.tile_ends: list[tuple[int, int]] = []
        self.finished: list[str] = []

    def cases(self, total: int) -> None:
        self.total = total

    def case_started(self, path: Path) -> None:
        self.started.append(path.name)
        self.tile_ends.append((0, 0))

    def tiles(self, done: int, total: int) -> None:
        assert done > self.tile_ends[-1][0], "tile progress must increase"
        self.tile_ends[-1] = (done, total)

    def case_finished(self, entry: dict[str, Any]) -> None:
        self.finished.append(entry["status"])


class EventOrder:
    """A BatchProgress that records the order of case starts and ends."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def cases(self, total: int) -> None:
        pass

    def case_started(self, path: Path) -> None:
        self.events.append(f"start {path.name}")

    def tiles(self, done: int, total: int) -> None:
        pass

    def case_finished(self, entry: dict[str, Any]) -> None:
        self.events.append(f"done {Path(entry['input']).name}")


def test_writing_behind_overlaps_the_next_case_and_changes_no_output(
        trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Case i is written on the writer thread while case i+1 is predicted (case i+1 starts before case i is
    done); the report and every output are those of writing each case before the next starts, and softmax
    maps (which hold the case's logits) are written before the next case starts."""
    bundle, data = trained
    writers: list[str] = []
    real_write = sitk.WriteImage

    def recorded(*args: Any, **kwargs: Any) -> None:  # the real writer, noting which thread called it
        writers.append(threading.current_thread().name)
        real_write(*args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", recorded)
    cpu = torch.device("cpu")
    jobs = plan_outputs([(p, data / "imagesTr") for p in sorted((data / "imagesTr").iterdir())], tmp_path)
    names = [j.input.name for j in jobs]
    runs = {}
    for name, behind, probabilities in (("behind", True, False), ("sync", False, False), ("maps", True, True)):
        predictor = Predictor(load_bundle(bundle), cpu, PredictOptions(probabilities=probabilities))
        out_jobs = [CaseJob(j.input, tmp_path / name / j.output.name) for j in jobs]
        order = EventOrder()
        runs[name] = run_batch(predictor, out_jobs, BatchReport({}), tmp_path / name / "report.json",
                               progress=order, write_behind=behind), order.events
    sync = [e for n in names for e in (f"start {n}", f"done {n}")]
    assert runs["sync"][1] == runs["maps"][1] == sync
    assert runs["behind"][1] == [f"start {names[0]}", *(e for a, b in itertools.pairwise(names)
                                                        for e in (f"start {b}", f"done {a}")), f"done {names[-1]}"]
    assert set(writers) == {"medsup-write_0"}
    drop = ("seconds", "seconds_total", "output", "probabilities")
    entries = {n: [{k: v for k, v in c.items() if k not in drop} for c in runs[n][0].cases] for n in runs}
    assert entries["behind"] == entries["sync"] == entries["maps"]
    assert [c["status"] for c in runs["behind"][0].cases] == ["ok"] * len(names)
    for job in jobs:
        written = [read_image(tmp_path / n / job.output.name) for n in ("behind", "sync")]
        np.testing.assert_array_equal(written[0].array, written[1].array)
        assert written[0].geometry == written[1].geometry


def test_shards_cover_every_case_once(trained: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = trained
    seen = []
    for i in range(3):
        report = infer(_request(bundle, [str(data / "imagesTr")], tmp_path / "out", shard=(i, 3)))
        seen += [c["input"] for c in report.cases]
        assert (tmp_path / "out" / f"report.shard{i}of3.json").is_file()
    assert sorted(seen) == sorted(str(p) for p in (data / "imagesTr").iterdir())


def test_torchrun_ranks_share_the_cases_and_merge_one_report(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """torchrun with 2 CPU processes: each rank predicts every 2nd case, rank 0 writes the merged report and
    alone prints it, and both exit 0: the gloo group made for the gather is destroyed again (a group left to
    interpreter exit can abort a rank in gloo's teardown)."""
    bundle, data = trained
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", "-m", "medsup", "-q",
         "infer", "-i", str(data / "imagesTr"), "-o", str(out), "-m", str(bundle), "--device", "cpu", "--json"],
        cwd=REPO, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed = json.loads(proc.stdout)  # one JSON document: rank 1 prints nothing
    merged = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert printed["cases"] == merged["cases"] and merged["settings"]["shard"] == "all"
    assert merged["summary"]["ok"] == 4
    shards = [json.loads((out / f"report.shard{i}of2.json").read_text(encoding="utf-8"))["cases"] for i in (0, 1)]
    assert [len(s) for s in shards] == [2, 2]
    assert sorted(c["input"] for s in shards for c in s) == sorted(str(p) for p in (data / "imagesTr").iterdir())
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(p.name for p in (data / "imagesTr").iterdir())


def test_a_rank_that_fails_tells_the_others_why(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """Two ranks launched as torchrun would (its environment, no agent to kill the others): rank 1 cannot write
    its shard report (a folder in the way). Both still meet in the report gather: rank 1 exits with its own
    error, rank 0 (its cases done, its shard report written) with one naming rank 1 and why, instead of a
    gloo error from a gather that lost a peer; no merged report claims the whole batch."""
    bundle, data = trained
    out = tmp_path / "out"
    (out / "report.shard1of2.json").mkdir(parents=True)
    port = _free_port()
    procs = [_rank(rank, port, ["infer", "-i", str(data / "imagesTr"), "-o", str(out), "-m", str(bundle),
                                "--device", "cpu"]) for rank in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    rank0, rank1 = (stdout + stderr for stdout, stderr in results)
    assert [p.returncode for p in procs] == [2, 2], rank0 + rank1  # medsup's exit status for bad input
    assert "report.shard1of2.json: cannot write the report" in rank1 and "Traceback" not in rank1, rank1
    assert "rank 1: " in rank0 and "report.shard1of2.json: cannot write the report" in rank0, rank0
    assert "Traceback" not in rank0 and "gloo" not in rank0.lower(), rank0
    assert json.loads((out / "report.shard0of2.json").read_text(encoding="utf-8"))["summary"]["ok"] == 2
    assert not (out / "report.json").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank(rank: int, port: int, args: list[str], **env: str) -> subprocess.Popen[str]:
    """``medsup ARGS`` as rank ``rank`` of 2, with torchrun's environment but no agent (which would kill the
    other rank when one exits, hiding what each says)."""
    return subprocess.Popen(
        [sys.executable, "-m", "medsup", "-q", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        encoding="utf-8", errors="replace",
        env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **env},
    )


@pytest.fixture(scope="module")
def two_versions(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite registry of its own holding the trained bundle as medsup-tiny versions 1 (@champion) and 2."""
    from mlflow.tracking import MlflowClient

    from medsup.tracking.registry import log_bundle_model, promote, register

    root = tmp_path_factory.mktemp("two_versions")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("ranks", str(root / "artifacts"))).info.run_id
    for version in (1, 2):
        assert register(uri, run_id, "tiny", log_bundle_model(uri, run_id, trained[0]), None) == version
    client.set_terminated(run_id)
    promote(uri, "tiny", 1)
    return uri


def test_every_rank_runs_the_model_rank_0_resolved(trained: tuple[Path, Path], two_versions: str,
                                                   tmp_path: Path) -> None:
    """An alias is read once, by rank 0, after every rank has joined: champion moves from version 1 to 2 after
    rank 0 started (its rendezvous port open) and before rank 1 starts, and both ranks run version 2. Each
    rank resolving the alias itself ran version 1 on rank 0 and version 2 on rank 1 under one merged report."""
    from medsup.tracking.registry import promote

    _, data = trained
    out, port = tmp_path / "out", _free_port()
    args = ["infer", "-i", str(data / "imagesTr"), "-o", str(out), "-m", "models:/medsup-tiny@champion",
            "--tracking-uri", two_versions, "--device", "cpu"]
    cache = {"MEDSUP_CACHE": str(tmp_path / "cache")}
    rank0 = _rank(0, port, args, **cache)
    deadline = time.monotonic() + 120
    while True:  # rank 0 is in the rendezvous once its store listens
        assert rank0.poll() is None and time.monotonic() < deadline, rank0.communicate()
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    promote(two_versions, "tiny", 2)
    rank1 = _rank(1, port, args, **cache)
    results = [p.communicate(timeout=300) for p in (rank0, rank1)]
    assert [p.returncode for p in (rank0, rank1)] == [0, 0], results
    shards = [json.loads((out / f"report.shard{i}of2.json").read_text(encoding="utf-8")) for i in (0, 1)]
    merged = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [s["model_version"] for s in shards] == ["2", "2"] and merged["model_version"] == "2"
    assert merged["summary"]["ok"] == 4


def test_a_rank_that_cannot_fetch_the_model_tells_the_others(trained: tuple[Path, Path], two_versions: str,
                                                             tmp_path: Path) -> None:
    """Rank 1 cannot download the model (its cache is a file): it fails inside ``infer``, where the ranks meet,
    not before the rendezvous, where rank 0 would wait for it until the rendezvous times out (30 minutes)."""
    _, data = trained
    out, port = tmp_path / "out", _free_port()
    (tmp_path / "not_a_folder").write_text("", encoding="utf-8")
    args = ["infer", "-i", str(data / "imagesTr"), "-o", str(out), "-m", "models:/medsup-tiny/1",
            "--tracking-uri", two_versions, "--device", "cpu"]
    procs = [_rank(r, port, args, MEDSUP_CACHE=str(tmp_path / ("cache" if r == 0 else "not_a_folder")))
             for r in (0, 1)]
    rank0, rank1 = ("".join(p.communicate(timeout=120)) for p in procs)
    assert [p.returncode for p in procs] == [2, 2], rank0 + rank1
    assert "not_a_folder" in rank1 and "Traceback" not in rank1, rank1
    assert "rank 1: " in rank0 and "not_a_folder" in rank0 and "Traceback" not in rank0, rank0
    assert json.loads((out / "report.shard0of2.json").read_text(encoding="utf-8"))["model_version"] == "1"
    assert not (out / "report.json").exists()


def test_an_unreachable_store_is_a_clear_error(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there
    result = runner.invoke(app, ["infer", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m",
                                 "models:/medsup-tiny@champion", "--tracking-uri", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 2, result.output
    assert f"127.0.0.1:{port}: cannot look up medsup-tiny" in result.output
    assert not (tmp_path / "out").exists()


def test_early_exit_probabilities_and_format(trained: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = trained
    src = data / "imagesTr" / "case2.nii.gz"
    report = infer(_request(bundle, [str(src)], tmp_path / "out", exit_level=1, probabilities=True, fmt="nrrd"))
    case = report.cases[0]
    assert case["status"] == "ok" and case["exit_level"] == 1 and "early-exit" in case["note"]
    assert case["output"].endswith("case2.nrrd")
    probs = {k: read_image(v).array for k, v in case["probabilities"].items()}
    assert set(probs) == {"background", "organ", "lesion"}
    np.testing.assert_allclose(sum(probs.values()), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="exit-level must be in"):
        infer(_request(bundle, [str(src)], tmp_path / "bad", exit_level=9))


def test_fitted_postprocessing_travels_with_the_bundle(trained: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, _ = trained
    fitted = load_bundle(bundle).postprocessing
    assert fitted is not None and fitted.fit["cases"] >= 1
    validation = json.loads((bundle.parent / "validation.json").read_text(encoding="utf-8"))
    images = [v["image"] for v in validation]
    # the fit's Dice "before" is plain inference of the validation cases without postprocessing
    raw = infer(_request(bundle, images, tmp_path / "raw", postprocess=False))
    dices = [dice_per_class(read_image(c["output"]).array, read_image(v["label"]).array, [1])[0]
             for c, v in zip(raw.cases, validation, strict=True)]
    assert fitted.fit["dice_before"]["organ"] == pytest.approx(np.nanmean(dices))
    # rules that drop every lesion: applied at full resolution; an early exit gets the task rule
    strict = tmp_path / "strict"
    shutil.copytree(bundle, strict)
    (strict / "postprocessing.json").write_text(json.dumps(
        {"organ_component": True, "lesions": {"lesion": {"keep": "min_volume", "min_ml": 1e6}}}), encoding="utf-8")
    out = infer(_request(strict, images, tmp_path / "strict_out"))
    assert all(read_image(c["output"]).array.max() <= 1 for c in out.cases)
    saved = json.loads((tmp_path / "strict_out" / "report.json").read_text(encoding="utf-8"))
    assert saved["bundle"]["postprocessing"] == "organ component: yes; lesion: components >= 1e+06 mL"
    early = Predictor(load_bundle(strict), torch.device("cpu"), PredictOptions(exit_level=1))
    assert early.rules == task_rules([1])
    (strict / "postprocessing.json").write_text('{"organ_component": true, "lesions": {"nodule": {}}}',
                                                encoding="utf-8")
    with pytest.raises(BundleError, match=r"postprocessing\.json: unknown class 'nodule'"):
        load_bundle(strict)


def test_cpu_inference_runs_channels_last_and_agrees_with_the_default_layout(trained: tuple[Path, Path]) -> None:
    cpu = torch.device("cpu")
    bundle = load_bundle(trained[0])
    predictor = Predictor(bundle, cpu, PredictOptions())
    # every prediction from a bundle (infer, pyfunc, figures) gets the layout from Bundle.network itself
    for network in (predictor.network, bundle.network(cpu)):
        weights = [p for p in network.parameters() if p.dim() == 5 and p.shape[1] > 1]
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights)
    default = build_model(bundle.cfg, bundle.plan)  # torch's layout: the comparison below is between two layouts
    default.load_state_dict(bundle.weights)
    default.eval()
    assert not any(p.is_contiguous(memory_format=torch.channels_last_3d)
                   for p in default.parameters() if p.dim() == 5 and p.shape[1] > 1 and p.shape[2] > 1)
    x = torch.randn(2, 1, *bundle.plan.patch_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        # float32 sums in another order: logits of magnitude ~10 differ by up to ~2.5e-4 (a wrong layout: O(1))
        torch.testing.assert_close(predictor.network(x), default(x), rtol=1e-4, atol=1e-3)


def test_cpu_network_runs_bf16_where_the_cpu_has_it_and_labels_agree_with_float32(
        trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "1")  # as on a CPU with AVX512-BF16 or AMX, whichever CPU runs this
    cpu_has_native_bf16.cache_clear()
    try:
        bundle, data = trained
        cpu, case = torch.device("cpu"), sorted((data / "imagesTr").glob("*.nii.gz"))[0]
        labels, dtypes = {}, {}
        for amp in (True, False):
            predictor = Predictor(load_bundle(bundle), cpu, PredictOptions(amp=amp))
            seen: list[torch.dtype] = []
            conv = next(m for m in predictor.network.modules() if isinstance(m, torch.nn.Conv3d))
            conv.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out.dtype))
            labels[amp] = predictor.predict(predictor.prepare(case)).labels
            dtypes[amp] = (predictor.network_dtype, set(seen))
        assert dtypes == {True: ("bfloat16", {torch.bfloat16}), False: ("float32", {torch.float32})}
        assert np.mean(labels[True] == labels[False]) > 0.995
        assert dice_per_class(labels[True], labels[False], [1])[0] > 0.98
        # the batch report says which; `--no-amp` keeps float32 on any CPU
        for flags, expected in (([], "bfloat16"), (["--no-amp"], "float32")):
            out = tmp_path / (flags[0][2:] if flags else "amp")
            result = runner.invoke(app, ["infer", "-i", str(case), "-o", str(out), "--model", str(bundle),
                                         "--device", "cpu", "--json", *flags])
            assert result.exit_code == 0, result.output
            report = json.loads((out / "report.json").read_text(encoding="utf-8"))
            assert (report["network_dtype"], report["settings"]["amp"]) == (expected, not flags)
    finally:
        cpu_has_native_bf16.cache_clear()


def test_postprocess_command_refits_a_bundle(trained: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = trained
    copy = tmp_path / "model"
    shutil.copytree(bundle, copy)
    (copy / "postprocessing.json").unlink()
    result = runner.invoke(app, ["postprocess", "--model", str(copy), "--data", str(data), "--device", "cpu",
                                 "--json"])
    assert result.exit_code == 0, result.output
    # the same cases and weights as the fit at the end of training: the same choice, to the last digit
    def strict(text: str) -> object:  # every JSON reader's JSON: no NaN or Infinity
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    assert strict((copy / "postprocessing.json").read_text(encoding="utf-8")) == \
        strict((bundle / "postprocessing.json").read_text(encoding="utf-8"))
    assert strict(result.stdout)["rules"].startswith("organ component: ")  # type: ignore[index]
    bad = runner.invoke(app, ["postprocess", "--model", str(bundle.parent / "checkpoints" / "last.pt"),
                              "--data", str(data), "--device", "cpu"])
    assert bad.exit_code == 2 and "not a checkpoint file" in bad.output
    bad = runner.invoke(app, ["postprocess", "--model", str(copy), "--data", str(data), "--fold", "7"])
    assert bad.exit_code == 2 and "--fold 7: the model was trained with 2 folds" in bad.output


def test_output_never_overwrites_an_input(trained: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = trained
    inp = tmp_path / "in"
    shutil.copytree(data / "imagesTr", inp)
    with pytest.raises(ValueError, match="would overwrite an input"):
        infer(_request(bundle, [str(inp)], inp))


def test_dicom_series_input(trained: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, _ = trained
    image, _ = make_volume(5, shape=(20, 18, 10), spacing=(0.9, 0.9, 2.5), angle=0.0)
    write_dicom_series(image, tmp_path / "in" / "series1")
    report = infer(_request(bundle, [str(tmp_path / "in")], tmp_path / "out"))
    assert report.cases[0]["status"] == "ok", report.cases
    out = read_image(tmp_path / "out" / "series1.nii.gz")
    assert out.geometry.mismatches(read_image(tmp_path / "in" / "series1").geometry, tol=1e-4) == []


def test_real_ct_lands_on_its_grid(coarse: Path, tmp_path: Path, realdata: Path) -> None:
    """A 512x512 LPS portal-venous CT with -3024 padding: output on its exact grid (and a DICOM series)."""
    bundle = coarse
    inputs = [realdata / "unlabeled/crlm/CRLM-CT-1004_ct.nii.gz", realdata / "unlabeled/dicom_series_ts_example"]
    report = infer(_request(bundle, [str(p) for p in inputs], tmp_path / "out"))
    for case, src in zip(report.cases, inputs, strict=True):
        assert case["status"] == "ok", case
        assert read_header(case["output"]).geometry.mismatches(read_header(src).geometry, tol=1e-5) == []


def test_registry_candidate_promote_champion_infer(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """Training registered medsup-tiny@candidate; promote it to champion; infer through the alias."""
    bundle, data = trained
    uri = f"sqlite:///{bundle.parents[1] / 'mlflow.db'}"
    listed = runner.invoke(app, ["models", "list", "--task", "tiny", "--json", "--tracking-uri", uri])
    assert listed.exit_code == 0, listed.output
    versions = json.loads(listed.stdout)
    assert [v["aliases"] for v in versions] == [["candidate"]]
    promoted = runner.invoke(app, ["models", "promote", "--task", "tiny", "--version", str(versions[0]["version"]),
                                   "--tracking-uri", uri])
    assert promoted.exit_code == 0, promoted.output
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", "-i", str(data / "imagesTr" / "case3.nii.gz"), "-o", str(out),
                                 "--model", "models:/medsup-tiny@champion", "--tracking-uri", uri, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == "models:/medsup-tiny@champion" and report["model_version"] == "1"
    local = read_image(Path(infer(_request(bundle, [str(data / "imagesTr" / "case3.nii.gz")], tmp_path / "b"))
                            .cases[0]["output"])).array
    np.testing.assert_array_equal(read_image(out / "case3.nii.gz").array, local)
