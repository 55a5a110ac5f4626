"""SIGTERM and Ctrl-C (SIGINT) during batch inference, then ``--resume``: no partial or temp file is left, the
exit status says what happened (143 / 130), and every case is predicted exactly once over the two runs.

SIGKILL during training then ``--resume`` is integration/test_train.py::test_resume_after_sigkill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medsup.cli import app
from medsup.data.io import read_header, read_image, write_volume
from tests.conftest import make_volume

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _cases(folder: Path, n: int, shape: tuple[int, int, int] = (24, 20, 16)) -> list[Path]:
    return [write_volume(folder / f"case{i}.nii.gz", make_volume(i, shape=shape)[0]) for i in range(n)]


def _statuses(report: dict[str, Any]) -> dict[str, str]:
    return {Path(c["input"]).name: c["status"] for c in report["cases"]}


def _assert_clean_outputs(out: Path, inputs: list[Path]) -> list[str]:
    """Only complete outputs (on their input's grid) and the report in OUT: no temp file, no stub.
    Returns the names of the cases with an output."""
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], f"temp files left: {names}"
    by_name = {p.name: p for p in inputs}
    done = [n for n in names if n != "report.json"]
    assert set(done) <= set(by_name), names
    for name in done:
        assert read_image(out / name).geometry.mismatches(read_header(by_name[name]).geometry, 1e-5) == []
    return done


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_in_the_middle_of_a_write(tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch,
                                         signum: int, code: int) -> None:
    """Deterministic: the signal lands while the second output is half written."""
    inputs = _cases(tmp_path / "in", 4)
    out = tmp_path / "out"
    real_write = sitk.WriteImage
    calls: list[str] = []

    def write_then_die(image: sitk.Image, path: str, *args: Any, **kwargs: Any) -> None:
        calls.append(path)
        real_write(image, path, *args, **kwargs)
        if len(calls) == 2:
            Path(path).write_bytes(Path(path).read_bytes()[:200])  # half a file on disk, as a kill finds it
            # without the batch's handler SIGTERM would end pytest itself: fail instead
            assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN), "no handler for the signal"
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the Python-level handler runs here, raising out of the write

    monkeypatch.setattr(sitk, "WriteImage", write_then_die)
    # a shell starts background jobs (`cmd &`, nohup) with SIGINT ignored and Python then installs no Ctrl-C
    # handler; put Python's own back, as an interactive terminal would have it
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    args = ["infer", "-i", str(tmp_path / "in"), "-o", str(out), "--model", str(bundle), "--device", "cpu"]
    try:
        first = runner.invoke(app, args)
    finally:
        signal.signal(signal.SIGINT, previous_int)
    monkeypatch.undo()
    assert first.exit_code == code, first.output
    assert Path(calls[1]).name.startswith(".case1.nii.gz.")  # it was the temp file that was cut short
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the batch's handler is gone again
    assert _assert_clean_outputs(out, inputs) == ["case0.nii.gz"]
    assert _statuses(json.loads((out / "report.json").read_text(encoding="utf-8"))) == {"case0.nii.gz": "ok"}

    second = runner.invoke(app, [*args, "--resume", "--json"])
    assert second.exit_code == 0, second.output
    assert _statuses(json.loads(second.stdout)) == {
        "case0.nii.gz": "skipped", "case1.nii.gz": "ok", "case2.nii.gz": "ok", "case3.nii.gz": "ok"}
    assert _assert_clean_outputs(out, inputs) == [f"case{i}.nii.gz" for i in range(4)]


def _wait_for_done(proc: subprocess.Popen[str], report: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            payload = json.loads(report.read_text(encoding="utf-8"))
            if payload["summary"]["ok"] >= 1:
                return payload
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no case finished before the deadline or the process ended:\n{proc.communicate()[0]}")


@pytest.mark.slow
def test_sigterm_during_batch_inference_then_resume(tmp_path: Path, bundle: Path) -> None:
    """The real thing: ``python -m medsup infer`` gets SIGTERM once a case is done, then ``--resume``."""
    inputs = _cases(tmp_path / "in", 5, shape=(80, 80, 48))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "medsup", "infer", "-i", str(tmp_path / "in"), "-o", str(out), "--model",
            str(bundle), "--device", "cpu", "--tta"]  # mirror TTA: seconds per case, time to land a signal
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            encoding="utf-8", errors="replace")
    _wait_for_done(proc, out / "report.json", timeout=300)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, log  # not -15: the handler ran and cleaned up
    assert "SIGTERM: stopping" in log and "Traceback" not in log, log
    first = _statuses(json.loads((out / "report.json").read_text(encoding="utf-8")))
    done = _assert_clean_outputs(out, inputs)
    assert 1 <= len(done) < len(inputs), f"SIGTERM came too late to test anything: {first}"
    # the report is rewritten after each case, so at most the case that finished as the signal came is missing
    assert {n for n, s in first.items() if s == "ok"} <= set(done) and len(done) - len(first) <= 1

    resumed = runner.invoke(app, [*args[3:], "--resume", "--json"])  # in-process: no second start-up
    assert resumed.exit_code == 0, resumed.output
    second = _statuses(json.loads(resumed.stdout))
    assert sorted(second) == [p.name for p in inputs]
    assert {n for n, s in second.items() if s == "skipped"} == set(done)  # done before: not redone
    assert {n for n, s in second.items() if s == "ok"} == {p.name for p in inputs} - set(done)  # done now, once
    assert _assert_clean_outputs(out, inputs) == [p.name for p in inputs]
