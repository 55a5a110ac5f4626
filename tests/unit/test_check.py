from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medsup.config import load
from medsup.data.check import check_dataset
from medsup.data.datalist import load_datalist
from medsup.data.geometry import Geometry
from medsup.data.io import read_image, write_image
from tests.conftest import make_volume, write_msd


def test_good_dataset_passes(msd_dataset: Path) -> None:
    report = check_dataset(msd_dataset, load("tiny"))
    assert report.ok, report.render()
    summary = report.summary()
    assert summary["spacing_mm"]["median"] == pytest.approx([0.8, 0.9, 2.5], rel=1e-5)
    assert set(summary["label_voxel_fraction"]) == {"0", "1", "2"}
    assert report.as_dict()["good_cases"] == 3


def test_three_bad_cases_are_all_named(tmp_path: Path) -> None:
    """The issue's acceptance case: a bad label value, a missing label, a spacing mismatch."""
    root = write_msd(tmp_path / "ds", n=5)
    # case1: label value 7
    label = read_image(root / "labelsTr/case1.nii.gz")
    arr = label.array.copy()
    arr[0, 0, 0] = 7
    write_image(root / "labelsTr/case1.nii.gz", arr, label.geometry)
    # case2: label file missing
    (root / "labelsTr/case2.nii.gz").unlink()
    # case3: label spacing differs from the image
    label = read_image(root / "labelsTr/case3.nii.gz")
    g = label.geometry
    write_image(root / "labelsTr/case3.nii.gz", label.array, Geometry(g.shape, (1.0, 0.9, 2.5), g.origin, g.direction))
    report = check_dataset(root, load("tiny"))
    assert not report.ok
    assert report.bad_cases == ["case1", "case2", "case3"]
    text = report.render()
    assert "values [7] outside the task's [0, 1, 2]" in text
    assert "case2.nii.gz does not exist" in text
    assert "spacing [1, 0.9, 2.5] != [0.8, 0.9, 2.5]" in text or "spacing [0.8, 0.9, 2.5] != [1, 0.9, 2.5]" in text


@pytest.mark.parametrize("kind", ["float_label", "nan_image", "shape", "origin", "direction", "unreadable", "4d"])
def test_each_kind_of_bad_case(tmp_path: Path, kind: str) -> None:
    root = write_msd(tmp_path / "ds", n=2)
    image, label = make_volume(0)
    g = image.geometry
    img_path, lab_path = root / "imagesTr/case0.nii.gz", root / "labelsTr/case0.nii.gz"
    expected = {
        "float_label": "non-integer values [0.5]",
        "nan_image": "NaN/Inf voxels",
        "shape": "shape [24, 20, 16] != [24, 20, 15]",
        "origin": "origin",
        "direction": "direction",
        "unreadable": "unreadable image header",
        "4d": "4-D image",
    }[kind]
    if kind == "float_label":
        arr = label.array.astype(np.float32)
        arr[1, 1, 1] = 0.5
        write_image(lab_path, arr, g)
    elif kind == "nan_image":
        arr = image.array.astype(np.float32)
        arr[2, 2, 2] = np.nan
        write_image(img_path, arr, g)
    elif kind == "shape":
        write_image(lab_path, label.array[:, :, :15], Geometry((24, 20, 15), g.spacing, g.origin, g.direction))
    elif kind == "origin":
        write_image(lab_path, label.array, Geometry(g.shape, g.spacing, (0.0, 0.0, 0.0), g.direction))
    elif kind == "direction":
        write_image(lab_path, label.array, Geometry(g.shape, g.spacing, g.origin, (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    elif kind == "unreadable":
        img_path.write_bytes(b"\x00" * 100)
    elif kind == "4d":
        import SimpleITK as sitk

        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 5, 6), np.int16), isVector=False), str(img_path))
    report = check_dataset(root, load("tiny"))
    assert report.bad_cases == ["case0"], report.render()
    assert expected in report.render()


def test_folder_layout_and_pairing_rules(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    for idx in range(3):
        image, label = make_volume(idx)
        write_image(root / "images" / f"ct{idx}_0000.nii.gz", image.array, image.geometry)
        if idx != 2:
            write_image(root / "labels" / f"ct{idx}.nrrd", label.array, label.geometry)
    image, label = make_volume(9)
    write_image(root / "labels" / "orphan.nii.gz", label.array, label.geometry)
    (root / "images" / "._ct0_0000.nii.gz").write_bytes(b"resource fork")  # ignored
    datalist = load_datalist(root)
    assert datalist.layout == "folders"
    assert [c.case_id for c in datalist.labelled] == ["ct0", "ct1"]
    messages = {p.case_id: p.message for p in datalist.problems}
    assert set(messages) == {"ct2", "orphan"}
    assert "has no label" in messages["ct2"] and "has no image" in messages["orphan"]


def test_msd_channel_suffix_and_escaping_paths(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "ds", n=2)
    shutil.move(root / "imagesTr/case0.nii.gz", root / "imagesTr/case0_0000.nii.gz")
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    meta["training"].append({"image": "../../etc/passwd", "label": "/etc/shadow"})
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    datalist = load_datalist(root)
    assert [c.image.name for c in datalist.labelled] == ["case0_0000.nii.gz", "case1.nii.gz"]
    text = " ".join(p.message for p in datalist.problems)
    assert "escapes the dataset folder" in text and "is absolute" in text


def test_missing_or_empty_dataset(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_dataset(tmp_path / "nope", load("tiny"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no dataset\.json"):
        check_dataset(tmp_path / "empty", load("tiny"))
    (tmp_path / "empty" / "dataset.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        check_dataset(tmp_path / "empty", load("tiny"))


def test_real_lung_dataset_checks(realdata: Path) -> None:
    report = check_dataset(realdata / "lung_2mm", load("lung"))
    assert report.ok, report.render()
    assert report.summary()["cases_with_label"]["1"] == 2
