from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medsup.cli import app
from medsup.cli_common import emit

runner = CliRunner()


def test_tasks_json_and_no_torch_import() -> None:
    result = runner.invoke(app, ["tasks", "--json"])
    assert result.exit_code == 0, result.output
    names = [t["name"] for t in json.loads(result.stdout)]
    assert names == ["liver", "lung", "tiny"]
    code = "import sys; from medsup.cli import app; app(['tasks'], standalone_mode=False); " \
           "bad = [m for m in ('torch', 'monai', 'mlflow', 'SimpleITK') if m in sys.modules]; " \
           "sys.exit(f'imported {bad}' if bad else 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace",
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "liver" in proc.stdout


def test_config_show_with_overrides() -> None:
    result = runner.invoke(app, ["config", "show", "--task", "lung", "--set", "train.epochs=7", "--json"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)
    assert cfg["task"] == "lung" and cfg["train"]["epochs"] == 7
    bad = runner.invoke(app, ["config", "show", "--task", "lung", "--set", "train.epoch=7"])
    assert bad.exit_code == 2 and "train.epoch: unknown key" in bad.output


def test_synth_refuses_bad_input_with_a_message(tmp_path: Path) -> None:
    """No traceback: a count below one is a usage error, a file where the folder goes names the file."""
    zero = runner.invoke(app, ["synth", "--task", "tiny", "--cases", "0", "--out", str(tmp_path / "s")])
    assert zero.exit_code == 2 and "--cases" in zero.output and not (tmp_path / "s").exists()
    (tmp_path / "afile").write_text("", encoding="utf-8")
    blocked = runner.invoke(app, ["synth", "--task", "tiny", "--cases", "1", "--out", str(tmp_path / "afile")])
    assert blocked.exit_code == 2 and f"{tmp_path / 'afile'} exists and is not a folder" in blocked.output
    assert blocked.exception is None or isinstance(blocked.exception, SystemExit)


def test_check_and_plan_commands(msd_dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "check", str(msd_dataset), "--task", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True
    (msd_dataset / "labelsTr" / "case1.nii.gz").unlink()
    result = runner.invoke(app, ["data", "check", str(msd_dataset), "--task", "tiny"])
    assert result.exit_code == 1 and "case1" in result.output
    out = tmp_path / "p" / "plan.json"
    result = runner.invoke(app, ["plan", "--task", "tiny", "--data", str(msd_dataset), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_cases"] == 2 and out.is_file()
    missing = runner.invoke(app, ["plan", "--task", "tiny", "--data", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_preprocess_stores_each_case_once_for_the_plan_training_makes(msd_dataset: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from medsup.config import load
    from medsup.data.fingerprint import plan_dataset
    from medsup.data.planning import Plan

    monkeypatch.setenv("MEDSUP_PREPROCESSED", str(tmp_path / "pre"))
    args = ["preprocess", "--task", "tiny", "--data", str(msd_dataset), "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    done = json.loads(first.stdout)
    assert (done["cases"], done["written"], done["reused"]) == (3, 3, 0) and done["bytes"] > 0
    root = Path(done["root"])
    assert root.is_relative_to(tmp_path / "pre") and len(list(root.glob("case*_image.npy"))) == 3
    # the plan `medsup train` makes of the dataset: training with train.cache=disk finds this store
    assert Plan.load(root / "plan.json") == plan_dataset(msd_dataset, load("tiny"), tmp_path / "p" / "plan.json")
    assert not (msd_dataset / "plan.json").exists(), "the dataset folder is left as it was"
    for kind in ("check", "fingerprint"):  # what a training start would read every case for, memoised
        assert len(list((root.parent / "memo" / kind).glob("case*.json"))) == 3, kind
    again = json.loads(runner.invoke(app, args).stdout)
    assert (again["written"], again["reused"], again["root"]) == (0, 3, done["root"])
    # a case that cannot be read: the data check names it, with its file, and nothing is preprocessed
    (msd_dataset / "imagesTr" / "case1.nii.gz").write_bytes(b"not a NIfTI" * 40)
    bad = runner.invoke(app, [*args[:-1], "--plan", str(root / "plan.json")])
    assert bad.exit_code == 1 and "case1" in bad.output and "imagesTr" in bad.output


def test_json_output_is_strict_json(capsys: pytest.CaptureFixture[str]) -> None:
    # the Dice of a class absent from prediction and reference is NaN: --json prints null, not Python's NaN
    emit({"dice": float("nan"), "hd95": [1.5, float("inf")], "path": Path("a")})
    out = capsys.readouterr().out
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == \
        {"dice": None, "hd95": [1.5, None], "path": "a"}
