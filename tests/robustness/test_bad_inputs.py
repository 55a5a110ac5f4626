"""Bad inputs through the user-facing commands: ``medsup data check``, ``medsup infer``, ``medsup train``.

The fault table (every fault, what medsup does, where it is tested) is in this folder's ``conftest.py``.
Commands run in-process through Typer's runner (the real CLI, without ~10 s of imports per subprocess).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

from medsup.cli import app
from medsup.data.io import read_header, read_image, write_volume
from tests.conftest import make_volume, write_msd
from tests.robustness.faults import IMAGE_FAULTS, good, unprivileged, write_fault, write_label_faults

runner = CliRunner()


def cli(*args: str) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def infer(inp: Path | str, out: Path, model: Path | str, *extra: str) -> Result:
    return cli("infer", "-i", inp, "-o", out, "--model", model, "--device", "cpu", "--json", *extra)


def _payload(result: Result) -> dict:
    return json.loads(result.stdout)


def _problems(report: dict) -> dict[str, str]:
    found: dict[str, str] = {}
    for p in report["problems"]:
        found[p["case"]] = found.get(p["case"], "") + " | " + p["problem"]
    return found


def _leftovers(folder: Path) -> list[str]:
    """Hidden (temp) files anywhere under ``folder``."""
    return sorted(str(p) for p in folder.rglob(".*"))


def test_data_check_names_every_bad_case(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    image, label = good()
    for i in range(2):
        write_volume(root / "images" / f"good{i}.nii.gz", image)
        write_volume(root / "labels" / f"good{i}.nii.gz", label)
    expected = {}
    for fault in IMAGE_FAULTS:
        path = write_fault(fault, root / "images")
        write_volume(root / "labels" / f"{fault.name}.nii.gz", label)
        expected[fault.name] = (fault.says, path)
    for case, says in write_label_faults(root / "labels").items():
        write_volume(root / "images" / f"{case}.nii.gz", image)
        expected[case] = (says, root / "labels" / f"{case}.nii.gz")

    result = cli("data", "check", root, "--task", "tiny", "--json")
    assert result.exit_code == 1, result.output
    report = _payload(result)
    assert report["bad_cases"] == sorted(expected)
    assert report["good_cases"] == 2
    problems = _problems(report)
    for case, (says, path) in expected.items():
        assert says in problems[case], (case, problems[case])
        assert str(path) in problems[case], (case, problems[case])


def test_infer_reports_every_bad_case_and_finishes_the_rest(tmp_path: Path, bundle: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(2):
        write_volume(inp / f"good{i}.nii.gz", make_volume(i)[0])
    paths = {f.name: write_fault(f, inp) for f in IMAGE_FAULTS}

    result = infer(inp, out, bundle)
    assert result.exit_code == 1, result.output
    cases = {Path(c["input"]).name: c for c in _payload(result)["cases"]}
    assert {n for n, c in cases.items() if c["status"] == "ok"} == {"good0.nii.gz", "good1.nii.gz"}
    for fault in IMAGE_FAULTS:
        case = cases[paths[fault.name].name]
        assert case["status"] == "error"
        assert fault.says in case["error"] and str(paths[fault.name]) in case["error"], case
    # outputs only for the good cases, each on its input's grid; nothing partial, nothing hidden
    assert sorted(p.name for p in out.iterdir()) == ["good0.nii.gz", "good1.nii.gz", "report.json"]
    for i in range(2):
        assert read_header(out / f"good{i}.nii.gz").geometry.mismatches(
            read_header(inp / f"good{i}.nii.gz").geometry, 1e-5) == []


def test_empty_folders(tmp_path: Path, bundle: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("data", "check", empty, "--task", "tiny")
    assert result.exit_code == 2 and "no dataset.json with a 'training' list" in result.output
    (tmp_path / "plain" / "images").mkdir(parents=True)
    (tmp_path / "plain" / "labels").mkdir()
    result = cli("data", "check", tmp_path / "plain", "--task", "tiny")
    assert result.exit_code == 1 and "no training cases found" in result.output

    out = tmp_path / "out"
    result = infer(empty, out, bundle)
    assert result.exit_code == 2 and f"{empty}: no images in this folder" in result.output
    listing = tmp_path / "cases.txt"
    listing.write_text("# nothing yet\n\n", encoding="utf-8")
    result = infer(listing, out, bundle)
    assert result.exit_code == 2 and f"{listing}: the list names no images" in result.output
    assert not out.exists()

    run = tmp_path / "run"
    result = cli("train", "--task", "tiny", "--data", empty, "--preset", "smoke", "--output", run,
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.exit_code == 1, result.output
    assert f"dataset {empty}: {empty}: no dataset.json" in result.output
    assert not run.exists()  # a refused dataset leaves no run folder behind


def test_unreadable_files_and_folders(shared_dir: Path, bundle: Path) -> None:
    """EACCES, for real: as uid ``nobody`` when root (root reads any file whatever its mode)."""
    image, label = good()
    ds = shared_dir / "ds"
    for name in ("good", "locked"):
        write_volume(ds / "images" / f"{name}.nii.gz", image)
        write_volume(ds / "labels" / f"{name}.nii.gz", label)
    model = Path(shutil.copytree(bundle, shared_dir / "model"))
    inp, locked_dir, out = shared_dir / "in", shared_dir / "in_locked", shared_dir / "out"
    write_volume(inp / "good.nii.gz", image)
    write_volume(inp / "locked.nii.gz", image)
    write_volume(locked_dir / "x.nii.gz", image)
    # once as root: every lazy import is done before nobody (who cannot read root's Python) runs the commands
    assert cli("data", "check", ds, "--task", "tiny").exit_code == 0
    assert infer(inp / "good.nii.gz", shared_dir / "warm", model).exit_code == 0

    (ds / "images" / "locked.nii.gz").chmod(0)
    (inp / "locked.nii.gz").chmod(0)
    locked_dir.chmod(0)
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    with unprivileged():
        try:
            (inp / "locked.nii.gz").open("rb").close()
            pytest.skip("file permissions are not enforced for this user/filesystem")
        except PermissionError:
            pass
        check = cli("data", "check", ds, "--task", "tiny", "--json")
        predicted = infer(inp, out, model)
        listing = infer(locked_dir, shared_dir / "out2", model)
    (ds / "labels").chmod(0o700)  # root's: nobody may not list it
    with unprivileged():
        unlisted = cli("data", "check", ds, "--task", "tiny")
    (ds / "labels").chmod(0o755)

    assert check.exit_code == 1, check.output
    problem = _problems(_payload(check))["locked"]
    assert f"{ds / 'images' / 'locked.nii.gz'}: cannot open for reading (Permission denied)" in problem
    assert predicted.exit_code == 1, predicted.output
    cases = {Path(c["input"]).name: c for c in _payload(predicted)["cases"]}
    assert cases["good.nii.gz"]["status"] == "ok"
    assert "locked.nii.gz: cannot open for reading (Permission denied)" in cases["locked.nii.gz"]["error"]
    assert listing.exit_code == 2 and "Permission denied" in listing.output and str(locked_dir) in listing.output
    assert unlisted.exit_code == 2, unlisted.output
    assert f"{ds / 'labels'}: cannot list the folder (Permission denied)" in unlisted.output


def test_dataset_json_paths_stay_inside_the_dataset(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "ds", n=2)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    meta["training"] += [
        {"image": "../../etc/passwd", "label": "./labelsTr/case0.nii.gz"},
        {"image": "./imagesTr/case1.nii.gz", "label": "/etc/passwd"},
        {"image": "./imagesTr/nul\u0000.nii.gz", "label": "./labelsTr/case0.nii.gz"},
        {"label": "./labelsTr/case0.nii.gz"},
    ]
    meta["test"] = [{"no_image": 1}]
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    result = cli("data", "check", root, "--task", "tiny", "--json")
    assert result.exit_code == 1, result.output
    text = " ".join(p["problem"] for p in _payload(result)["problems"])
    for words in ("'../../etc/passwd' in dataset.json escapes the dataset folder",
                  "'/etc/passwd' in dataset.json is absolute", "holds a NUL byte",
                  "dataset.json entry lacks an 'image' path", "dataset.json test entry lacks an 'image' path"):
        assert words in text, words

    (root / "dataset.json").write_text(json.dumps({"training": "imagesTr"}), encoding="utf-8")
    result = cli("data", "check", root, "--task", "tiny")
    assert result.exit_code == 2 and "'training' must be a list, not str" in result.output


def test_output_names_cannot_escape_the_output_folder(tmp_path: Path, bundle: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    src = write_volume(inp / "case0.nii.gz", make_volume(0)[0])
    listing = tmp_path / "cases.txt"
    listing.write_text(f"{src}\n..\n", encoding="utf-8")
    result = infer(listing, out, bundle)
    assert result.exit_code == 2 and "..: cannot name an output after '..'" in result.output
    result = infer(src, out, bundle, "--format", "/../../../escaped.nii.gz")
    assert result.exit_code == 2 and "--format '/../../../escaped.nii.gz': use one of" in result.output
    write_volume(inp / "case0.nii", make_volume(1)[0], compress=False)
    result = infer(inp, out, bundle)
    assert result.exit_code == 2 and "would both write" in result.output
    assert not out.exists()
    # a planted link in OUT must not redirect a write outside it
    victim = tmp_path / "victim.nii.gz"
    victim.write_bytes(b"precious")
    out.mkdir()
    os.symlink(victim, out / "case0.nii.gz")
    result = infer(src, out, bundle)
    assert result.exit_code == 2 and "would escape the output folder" in result.output
    assert victim.read_bytes() == b"precious"


def test_recursive_search_follows_a_symlink_loop_once(tmp_path: Path, bundle: Path) -> None:
    inp = tmp_path / "in"
    write_volume(inp / "sub" / "case0.nii.gz", make_volume(0)[0])
    os.symlink(inp, inp / "sub" / "up")  # in/sub/up/sub/up/... would list case0 ~40 times
    result = infer(inp, tmp_path / "out", bundle, "--recursive")
    assert result.exit_code == 0, result.output
    assert [Path(c["input"]).name for c in _payload(result)["cases"]] == ["case0.nii.gz"]


def test_pickle_bomb_model_is_refused(tmp_path: Path, bundle: Path) -> None:
    """``infer --model bomb.pt`` (the ``train --resume`` path is integration/test_train)."""
    pwned = tmp_path / "pwned"

    class Bomb:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {pwned}",))

    bomb = tmp_path / "bomb.pt"
    torch.save({"model": Bomb(), "config": "{}", "plan": "{}"}, bomb)
    folder = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    shutil.copy(bomb, folder / "weights.pt")
    src = write_volume(tmp_path / "in" / "case0.nii.gz", make_volume(0)[0])
    out = tmp_path / "out"
    for model, says in ((bomb, "not a loadable medsup checkpoint"), (folder, "not a usable model bundle")):
        result = infer(src, out, model)
        assert result.exit_code == 2, result.output
        assert says in result.output and "Weights only load failed" in result.output, result.output
    assert not pwned.exists() and not out.exists()


def test_bad_dataset_refused_by_train_cli(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "ds", n=3)
    label = read_image(root / "labelsTr" / "case1.nii.gz")
    values = label.array.astype(np.float32)
    values[2, 2, 2] = 1.5
    write_volume(root / "labelsTr" / "case1.nii.gz", type(label)(values, label.geometry))
    run = tmp_path / "run"
    result = cli("train", "--task", "tiny", "--data", root, "--preset", "smoke", "--output", run,
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.exit_code == 1, result.output
    assert "fails `medsup data check`" in result.output and "case1" in result.output
    assert "non-integer values [1.5]" in result.output
    assert not run.exists()
