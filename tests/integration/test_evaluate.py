"""``medsup evaluate`` end to end on tiny NIfTI label maps: pairing, geometry refusal, missing cases, CSV/JSON
content, exit codes, and --log-to into a real SQLite MLflow store."""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medsup.cli import app
from medsup.config import load
from medsup.data.geometry import Volume
from medsup.data.io import write_volume
from medsup.evaluation.evaluate import evaluate_folders
from medsup.evaluation.metrics import volume_ml
from tests.conftest import make_volume

runner = CliRunner()


def _label(seed: int) -> Volume:
    return make_volume(seed)[1]


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """References for case0..case3; predictions: case0 exact (stored LPS), case1 lesion merged into the organ
    (named like an input image, ``_0000``), case2 on a shifted grid, case3 missing; plus a stray prediction and
    a probability map."""
    ref_dir, pred_dir = tmp_path / "labels", tmp_path / "preds"
    refs = {f"case{i}": _label(i) for i in range(4)}
    for name, vol in refs.items():
        write_volume(ref_dir / f"{name}.nii.gz", vol)
    write_volume(pred_dir / "case0.nii.gz", refs["case0"].reoriented("LPS"))  # same grid, another axis order
    merged = refs["case1"].array.copy()
    merged[merged == 2] = 1
    write_volume(pred_dir / "case1_0000.nii.gz", Volume(merged, refs["case1"].geometry))
    moved = replace(refs["case2"].geometry, origin=(0.0, 0.0, 0.0))
    write_volume(pred_dir / "case2.nii.gz", Volume(refs["case2"].array, moved))
    write_volume(pred_dir / "stray.nii.gz", _label(9))
    write_volume(pred_dir / "case0_prob_organ.nii.gz", Volume(refs["case0"].array.astype(np.float32),
                                                              refs["case0"].geometry))
    return pred_dir, ref_dir


def test_evaluate_cli(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred_dir, ref_dir = folders
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--task", "tiny",
                                 "--out", str(out), "--json", "--set", "evaluate.nsd_tolerance_mm.lesion=3"])
    assert result.exit_code == 1, result.output  # a missing and a refused case: failures, after the others
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text(encoding="utf-8"))
    by_case = {c["case"]: c for c in summary["cases"]}
    assert summary["counts"] == {"cases": 4, "ok": 2, "missing": 1, "error": 1, "unmatched_predictions": 1}
    assert summary["unmatched_predictions"] == [str(pred_dir / "stray.nii.gz")]  # the probability map is skipped

    perfect = by_case["case0"]["classes"]
    assert perfect["organ"]["dice"] == 1.0 and perfect["organ"]["hd95_mm"] == 0.0 and perfect["organ"]["nsd"] == 1.0
    assert by_case["case0"]["prediction"].endswith("case0.nii.gz")

    merged = by_case["case1"]["classes"]
    assert merged["lesion"]["dice"] == 0.0 and merged["lesion"]["hd95_mm"] is None and merged["lesion"]["nsd"] == 0.0
    ref1 = _label(1).array
    organ, lesion = int((ref1 == 1).sum()), int((ref1 == 2).sum())
    assert merged["organ"]["dice"] == pytest.approx(2 * organ / (2 * organ + lesion))
    spacing = _label(1).geometry.spacing
    assert merged["lesion"]["volume_ref_ml"] == pytest.approx(volume_ml(ref1 == 2, spacing))
    assert merged["lesion"]["volume_diff_ml"] == pytest.approx(-volume_ml(ref1 == 2, spacing))
    assert merged["lesion"]["volume_rel_diff"] == pytest.approx(-1.0)
    assert merged["lesion"]["nsd_tolerance_mm"] == 3.0 and summary["settings"]["nsd_tolerance_mm"]["lesion"] == 3.0

    refused = by_case["case2"]
    assert refused["status"] == "error" and "case2" in refused["error"] and "origin" in refused["error"]
    assert refused["classes"] == {}
    assert by_case["case3"]["status"] == "missing" and "case3" in by_case["case3"]["error"]

    lesion_block = summary["classes"]["lesion"]
    assert lesion_block["dice"]["n"] == 2 and lesion_block["dice"]["mean"] == pytest.approx(0.5)
    assert lesion_block["hd95_mm"]["n_undefined"] == 1
    organ_block = summary["classes"]["organ"]
    tp = int((_label(0).array == 1).sum()) + organ
    size = 2 * int((_label(0).array == 1).sum()) + 2 * organ + lesion
    assert organ_block["dice"]["global"] == pytest.approx(2 * tp / size)
    assert "NOT the mean" in summary["conventions"]["dice.global"]

    # lesion-wise detection, for the task's lesion class only: case0 finds its lesion, case1 (merged) misses it
    assert by_case["case0"]["lesions"]["lesion"]["detected_lesions"] == 1
    missed = by_case["case1"]["lesions"]["lesion"]
    assert (missed["ref_lesions"], missed["detected_lesions"], missed["pred_lesions"]) == (1, 0, 0)
    assert missed["reference"][0]["covered"] == 0.0 and not missed["reference"][0]["detected"]
    assert missed["reference"][0]["volume_ml"] == pytest.approx(volume_ml(ref1 == 2, spacing))
    assert "organ" not in by_case["case0"]["lesions"] and "lesions" not in organ_block
    detection = lesion_block["lesions"]
    assert (detection["reference"], detection["detected"], detection["recall"]) == (2, 1, 0.5)
    assert detection["precision"] == 1.0 and detection["fp_per_case"] == 0.0
    assert sum(b["reference"] for b in detection["by_size"].values()) == 2
    assert summary["settings"]["lesion_classes"] == ["lesion"]

    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 2  # every case and class, scored or not
    row = next(r for r in rows if r["case"] == "case1" and r["class"] == "lesion")
    assert row["status"] == "ok" and float(row["dice"]) == 0.0 and math.isnan(float(row["hd95_mm"]))
    assert (row["ref_lesions"], row["detected_lesions"], row["pred_lesions"], row["fp_lesions"]) == ("1", "0", "0", "0")
    assert next(r for r in rows if r["case"] == "case0" and r["class"] == "organ")["ref_lesions"] == ""
    missing = next(r for r in rows if r["case"] == "case3" and r["class"] == "organ")
    assert missing["status"] == "missing" and missing["dice"] == ""

    human = runner.invoke(app, ["evaluate", "-p", str(pred_dir), "-r", str(ref_dir), "-t", "tiny", "-o", str(out)])
    assert human.exit_code == 1
    assert "2 of 4 cases evaluated, 1 missing, 1 failed" in human.stdout
    assert "lesions: recall 0.500 (1/2), precision 1.000 (1/1)" in human.stdout
    assert "case2" in human.stderr and "origin" in human.stderr


def test_all_good_exits_zero_and_default_out(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    for name in ("case2", "case3"):
        (ref_dir / f"{name}.nii.gz").unlink()
    result = evaluate_folders(pred_dir, ref_dir, load("tiny"), pred_dir / "evaluation")
    assert not result.failed and [c.case for c in result.cases] == ["case0", "case1"]
    dataset = ref_dir.parent / "dataset"  # a dataset root: its labelsTr/ holds the references
    shutil.copytree(ref_dir, dataset / "labelsTr")
    from_root = evaluate_folders(pred_dir, dataset, load("tiny"), dataset / "evaluation")
    assert from_root.summary["classes"] == result.summary["classes"]
    cli = runner.invoke(app, ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--task", "tiny"])
    assert cli.exit_code == 0, cli.output
    assert (pred_dir / "evaluation" / "metrics.csv").is_file()
    nowhere = runner.invoke(app, ["evaluate", "--pred", str(pred_dir / "nope"), "--ref", str(ref_dir), "-t", "tiny"])
    assert nowhere.exit_code == 2 and "does not exist" in nowhere.stderr


def test_log_to_existing_mlflow_run(folders: tuple[Path, Path], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    pred_dir, ref_dir = folders
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("eval-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp, run_name="trained").info.run_id
    client.set_terminated(run_id, "FINISHED")

    bad = runner.invoke(app, ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--task", "tiny",
                              "--out", str(tmp_path / "never"), "--log-to", "0" * 32, "--tracking-uri", uri])
    assert bad.exit_code == 2 and "0" * 32 in bad.stderr
    assert not (tmp_path / "never").exists()  # refused before any work

    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--task", "tiny",
                                 "--out", str(out), "--log-to", run_id, "--tracking-uri", uri, "--json"])
    assert result.exit_code == 1, result.output  # case2/case3 still fail; the run gets the aggregates anyway
    summary = json.loads(result.stdout)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # added to, not reopened
    metrics = run.data.metrics
    assert metrics["eval.dice.organ.mean"] == pytest.approx(summary["classes"]["organ"]["dice"]["mean"])
    assert metrics["eval.dice.organ.global"] == pytest.approx(summary["classes"]["organ"]["dice"]["global"])
    assert metrics["eval.hd95.organ.median"] == pytest.approx(summary["classes"]["organ"]["hd95_mm"]["median"])
    assert metrics["eval.cases.missing"] == 1.0
    assert "eval.hd95.lesion.mean" in metrics  # case0 defines it; case1's undefined HD95 is counted instead
    assert metrics["eval.lesions.lesion.recall"] == 0.5 and metrics["eval.lesions.lesion.false_positives"] == 0
    assert "eval.lesions.lesion.min_overlap" not in metrics  # a setting, not a result
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert artifacts == {"evaluation/metrics.csv", "evaluation/summary.json"}
