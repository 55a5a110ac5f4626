"""Synthetic CT phantoms: layout, determinism, label/geometry consistency, realism of HU and lesions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medsup.data import phantoms
from medsup.data.geometry import Geometry, Volume
from medsup.data.io import read_image
from medsup.data.solids import Layer, tissue_at
from medsup.data.synth import _Grid, generate_case, paint, synthesize


def _load(root: Path, rel: str) -> Volume:
    return read_image(root / rel)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six tiny training cases and one test image, seed 3."""
    return synthesize("tiny", 6, tmp_path_factory.mktemp("tiny") / "ds", seed=3, test_cases=1)


def test_layout_and_dataset_json(tiny_set: Path) -> None:
    meta = json.loads((tiny_set / "dataset.json").read_text(encoding="utf-8"))
    assert meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert (meta["numTraining"], meta["numTest"]) == (6, 1)
    assert [e["image"] for e in meta["training"]] == [f"./imagesTr/tiny_{n:03d}.nii.gz" for n in range(6)]
    assert [e["label"] for e in meta["training"]] == [f"./labelsTr/tiny_{n:03d}.nii.gz" for n in range(6)]
    assert meta["test"] == ["./imagesTs/tiny_006.nii.gz"]  # numbering continues after training
    assert meta["synthetic"]["seed"] == 3
    assert meta["synthetic"]["generator"] == "medsup.data.synth"
    assert meta["synthetic"]["full_size"] is False
    for entry in meta["training"]:
        assert (tiny_set / entry["image"]).is_file() and (tiny_set / entry["label"]).is_file()
    assert (tiny_set / meta["test"][0]).is_file()
    assert not (tiny_set / "labelsTr" / "tiny_006.nii.gz").exists()


def test_labels_geometry_and_dtypes(tiny_set: Path) -> None:
    meta = json.loads((tiny_set / "dataset.json").read_text(encoding="utf-8"))
    orientations, spacings = set(), set()
    for entry in meta["training"]:
        image, label = _load(tiny_set, entry["image"]), _load(tiny_set, entry["label"])
        assert image.array.dtype == np.int16 and label.array.dtype == np.uint8
        assert image.geometry.mismatches(label.geometry) == []
        assert max(image.geometry.shape) <= 48
        assert set(np.unique(label.array)) <= {0, 1, 2}
        assert (label.array == 1).sum() > 100  # the organ is always in view
        # every lesion component sits in the organ: it touches organ voxels
        lesions, count = ndimage.label(label.array == 2)
        organ_near = ndimage.binary_dilation(label.array == 1)
        for n in range(1, count + 1):
            assert organ_near[lesions == n].any()
        orientations.add(image.geometry.orientation)
        spacings.add(tuple(round(s, 3) for s in image.geometry.spacing))
    assert {"LPS", "RAS"} <= orientations
    assert len(spacings) == 6  # anisotropic spacing differs per case


def test_lesion_centres_land_on_lesion_labels(tiny_set: Path) -> None:
    """dataset.json's lesion centres (world mm) map, through each file's geometry, onto label 2."""
    meta = json.loads((tiny_set / "dataset.json").read_text(encoding="utf-8"))
    checked = 0
    for entry in meta["training"]:
        cid = Path(entry["label"]).name.removesuffix(".nii.gz")
        label = _load(tiny_set, entry["label"])
        g = label.geometry
        for lesion in meta["synthetic"]["lesions"][cid]:
            if lesion["diameter_mm"] < 3 * max(g.spacing):
                continue  # too small for its centre voxel to be sure
            lps = np.asarray(lesion["center_mm"]) - np.asarray(g.origin)
            ijk = np.rint(np.linalg.solve(g.direction_matrix * np.asarray(g.spacing), lps)).astype(int)
            assert label.array[tuple(ijk)] == 2, (cid, lesion)
            checked += 1
    assert checked >= 1


def test_deterministic_and_independent_of_case_count(tmp_path: Path) -> None:
    a = synthesize("tiny", 2, tmp_path / "a", seed=7, test_cases=0)
    b = synthesize("tiny", 3, str(tmp_path / "b"), seed=7, test_cases=0)
    c = synthesize("tiny", 2, tmp_path / "c", seed=8, test_cases=0)
    assert isinstance(b, Path)
    for n in range(2):
        for sub in ("imagesTr", "labelsTr"):
            va, vb = _load(a, f"{sub}/tiny_{n:03d}.nii.gz"), _load(b, f"{sub}/tiny_{n:03d}.nii.gz")
            assert np.array_equal(va.array, vb.array)
            assert va.geometry == vb.geometry
        other = _load(c, f"imagesTr/tiny_{n:03d}.nii.gz")
        mine = _load(a, f"imagesTr/tiny_{n:03d}.nii.gz")
        assert other.array.shape != mine.array.shape or not np.array_equal(other.array, mine.array)
    # a case generated on its own equals the same case inside a dataset
    alone = generate_case("tiny", 2, seed=7)
    assert np.array_equal(alone.image, _load(b, "imagesTr/tiny_002.nii.gz").array)


def test_liver_hu_and_lesion_free_cases_occur() -> None:
    """Coarse (8 mm) liver cases: liver HU in 60-140, and tumour counts vary, zero included."""
    tumour_voxels = []
    for seed in range(10):
        case = generate_case("liver", 0, seed=seed, voxel_mm=8.0)
        liver = case.label == 1
        assert liver.sum() > 500
        assert 60 <= float(np.median(case.image[liver])) <= 140
        assert set(np.unique(case.label)) <= {0, 1, 2}
        tumour_voxels.append(int((case.label == 2).sum()))
        if case.lesions:  # tumours are darker than the liver around them
            assert float(np.median(case.image[case.label == 2])) < float(np.median(case.image[liver]))
    assert min(tumour_voxels) == 0
    assert max(tumour_voxels) > 0


def test_lung_case_has_aerated_lungs_and_nodule_labels() -> None:
    case = generate_case("lung", 1, seed=0, voxel_mm=8.0)
    assert set(np.unique(case.label)) <= {0, 1}
    body = case.image > -950
    assert (case.image[body] < -600).mean() > 0.15  # plenty of lung inside the field of view
    assert case.image.dtype == np.int16


def _grid_pair() -> tuple[list[Layer], _Grid, _Grid, Geometry]:
    """A tiny phantom and two grids on exactly the same voxel centres: one stored LPS, one RAS."""
    phantom = phantoms.abdomen(np.random.default_rng(0), scale=0.22)
    shape, spacing = (30, 28, 20), (2.5, 2.5, 3.0)
    lps = Geometry(shape, spacing, (-36.0, -34.0, -60.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    ras = Volume(np.zeros(shape), lps).reoriented("RAS").geometry
    to_world = np.array([5.0, -3.0, -500.0])  # the patient lies somewhere on the table
    lps, ras = _shifted(lps, to_world), _shifted(ras, to_world)
    return phantom.layers, _Grid(lps, to_world), _Grid(ras, to_world), ras


def _shifted(g: Geometry, by: np.ndarray) -> Geometry:
    x, y, z = (float(v) for v in np.asarray(g.origin) + by)
    return Geometry(g.shape, g.spacing, (x, y, z), g.direction)


def test_labels_are_computed_in_world_space() -> None:
    """The same phantom painted on an LPS grid and on the RAS grid of the same voxels agrees voxel by voxel."""
    layers, grid_lps, grid_ras, ras = _grid_pair()
    _, tissue_lps = paint(layers, grid_lps, 0, grid_lps.shape[2])
    _, tissue_ras = paint(layers, grid_ras, 0, grid_ras.shape[2])
    back = Volume(tissue_ras, ras).reoriented("LPS").array
    assert np.array_equal(back, tissue_lps)
    assert (tissue_lps == phantoms.Tissue.LIVER).sum() > 100


def test_slab_painting_matches_whole_volume() -> None:
    layers, grid, _, _ = _grid_pair()
    whole_hu, whole = paint(layers, grid, 0, 20)
    parts = [paint(layers, grid, k0, k1) for k0, k1 in ((0, 7), (7, 13), (13, 20))]
    assert np.array_equal(np.concatenate([p[1] for p in parts], axis=2), whole)
    assert np.array_equal(np.concatenate([p[0] for p in parts], axis=2), whole_hu)


def test_rewrite_replaces_previous_synthetic_dataset(tmp_path: Path) -> None:
    root = synthesize("tiny", 3, tmp_path / "ds", seed=0, test_cases=1)
    synthesize("tiny", 2, root, seed=0, test_cases=0)
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["tiny_000.nii.gz", "tiny_001.nii.gz"]
    assert list((root / "imagesTs").iterdir()) == []
    assert json.loads((root / "dataset.json").read_text(encoding="utf-8"))["numTraining"] == 2


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cases"):
        synthesize("tiny", 0, tmp_path / "x")
    with pytest.raises(ValueError, match="unknown task"):
        synthesize("kidney", 2, tmp_path / "x")
    with pytest.raises(ValueError, match="test_cases"):
        synthesize("tiny", 1, tmp_path / "x", test_cases=-1)
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "dataset.json").write_text(json.dumps({"name": "Task03_Liver"}), encoding="utf-8")
    with pytest.raises(FileExistsError, match="not written by"):
        synthesize("tiny", 1, foreign)
    assert json.loads((foreign / "dataset.json").read_text(encoding="utf-8")) == {"name": "Task03_Liver"}


def test_painting_agrees_with_point_queries_on_a_rotated_grid() -> None:
    """Box culling on an oblique RAS grid loses nothing: every voxel gets the tissue found at its centre."""
    phantom = phantoms.abdomen(np.random.default_rng(1), scale=0.22)
    a = np.radians(7.0)
    direction = (-np.cos(a), np.sin(a), 0.0, -np.sin(a), -np.cos(a), 0.0, 0.0, 0.0, 1.0)  # RAS, rotated
    geometry = Geometry((32, 30, 18), (2.2, 2.2, 2.5), (40.0, 35.0, -45.0), tuple(float(v) for v in direction))
    assert geometry.orientation == "RAS"
    grid = _Grid(geometry, np.zeros(3))
    _, tissue = paint(phantom.layers, grid, 0, 18)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), -1).reshape(-1, 3)
    centres = np.asarray(geometry.origin) + (ijk * np.asarray(geometry.spacing)) @ geometry.direction_matrix.T
    expected = tissue_at(phantom.layers, centres).reshape(geometry.shape)
    assert np.array_equal(tissue, expected)
