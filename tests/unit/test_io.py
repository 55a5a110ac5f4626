from __future__ import annotations

import gzip
import json
import locale
import math
import os
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from zlib_ng import zlib_ng

from medsup.data import io
from medsup.data.files import write_json
from medsup.data.geometry import Geometry, Volume
from medsup.data.io import ImageReadError, _gunzip_into, read_header, read_image, to_sitk, write_image
from tests.conftest import make_volume, rotated_direction


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_round_trip_keeps_geometry(tmp_path: Path, suffix: str) -> None:
    image, label = make_volume(1)
    for vol in (image, label):
        path = write_image(tmp_path / f"x{suffix}", vol.array, vol.geometry)
        back = read_image(path)
        np.testing.assert_array_equal(back.array, vol.array)
        assert back.array.dtype == vol.array.dtype
        assert back.geometry.mismatches(vol.geometry, tol=1e-5) == []
        # what SimpleITK itself says about the written file
        ref = sitk.ReadImage(str(path))
        np.testing.assert_allclose(ref.GetSpacing(), vol.geometry.spacing, rtol=1e-6)
        np.testing.assert_allclose(ref.GetDirection(), vol.geometry.direction, atol=1e-6)
        np.testing.assert_allclose(ref.GetOrigin(), vol.geometry.origin, atol=1e-4)


def write_dicom_series(volume: Volume, folder: Path) -> None:
    """Write ``volume`` as a CT DICOM series, one file per k-slice, the way scanners do.

    SimpleITK's DICOM writer (GDCM) sets the whole process's C locale to "C": text decoded with the locale's
    encoding later in the same test process (``subprocess.run(text=True)``) would then be ASCII. The caller's
    locale is put back afterwards (medsup reads DICOM but never writes it; its reader leaves the locale be).
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_slices(volume, folder)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(volume: Volume, folder: Path) -> None:
    image = to_sitk(volume.array.astype(np.int16), volume.geometry)
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = volume.geometry.direction
    stamp = time.strftime("%Y%m%d")
    series_uid = "1.2.826.0.1.3680043.2.1125." + "42.7"
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        tags = {
            "0008|0060": "CT", "0008|0020": stamp, "0020|000d": series_uid + ".1", "0020|000e": series_uid,
            "0020|0037": "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0013": str(k + 1), "0018|0050": str(volume.geometry.spacing[2]),
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_round_trip(tmp_path: Path) -> None:
    image, _ = make_volume(2, shape=(16, 14, 6), spacing=(0.7, 0.7, 3.0), angle=0.0)
    write_dicom_series(image, tmp_path / "series")
    back = read_image(tmp_path / "series")
    np.testing.assert_array_equal(back.array, image.array)
    assert back.geometry.mismatches(image.geometry, tol=1e-4) == []
    assert read_header(tmp_path / "series").geometry.shape == (16, 14, 6)


def test_dicom_series_header_matches_the_read_image(tmp_path: Path) -> None:
    image, _ = make_volume(4, shape=(16, 14, 6), spacing=(0.7, 0.8, 2.5), angle=20.0)
    write_dicom_series(image, tmp_path / "series")
    header = read_header(tmp_path / "series")
    assert header.geometry.mismatches(read_image(tmp_path / "series").geometry, tol=1e-6) == []
    assert header.geometry.mismatches(image.geometry, tol=1e-4) == []
    assert header.pixel_type == "16-bit signed integer"


@pytest.mark.parametrize("folder", ["liver_io/dcmqi_ct3slice/dicom", "unlabeled/dicom_series_ts_example"])
def test_real_dicom_series_header_matches_the_read_image(realdata: Path, folder: str) -> None:
    path = realdata / folder
    if not path.is_dir():
        pytest.skip(f"{path} absent")
    header, volume = read_header(path), read_image(path)
    assert header.geometry.mismatches(volume.geometry, tol=1e-9) == []
    assert header.geometry.shape == volume.array.shape


def test_lps_and_ras_copies_give_the_same_voxels(tmp_path: Path) -> None:
    image, _ = make_volume(3)
    # the same scan stored RAS: flip the i and j axes of the array and move the origin accordingly
    affine = image.geometry.affine()
    flipped = image.array[::-1, ::-1, :]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [image.array.shape[0] - 1, image.array.shape[1] - 1]
    ras_geom = Geometry.from_affine(affine @ flip, flipped.shape)
    assert image.geometry.orientation != ras_geom.orientation
    a = write_image(tmp_path / "lps.nii.gz", image.array, image.geometry)
    b = write_image(tmp_path / "ras.nrrd", np.ascontiguousarray(flipped), ras_geom)
    va, vb = read_image(a, "RAS"), read_image(b, "RAS")
    np.testing.assert_array_equal(va.array, vb.array)
    np.testing.assert_allclose(va.geometry.affine(), vb.geometry.affine(), atol=1e-4)
    assert va.geometry.orientation == "RAS"
    # reorientation never moves a voxel in the world
    world = image.geometry.affine() @ np.array([3, 5, 7, 1.0])
    idx = np.linalg.solve(va.geometry.affine(), world)[:3].round().astype(int)
    assert va.array[tuple(idx)] == image.array[3, 5, 7]


def test_affine_round_trip() -> None:
    geom = Geometry((5, 6, 7), (0.5, 0.7, 3.0), (10.0, -4.0, 2.0), rotated_direction(30, flip=(1, -1, 1)))
    back = Geometry.from_affine(geom.affine(), geom.shape)
    assert back.mismatches(geom, tol=1e-9) == []


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [((10, 12), "2-D image"), ((6, 7, 8, 3), "4-D image")],
)
def test_wrong_dimensionality_is_refused(tmp_path: Path, shape: tuple[int, ...], fragment: str) -> None:
    path = tmp_path / "bad.nii.gz"
    img = sitk.GetImageFromArray(np.zeros(shape[::-1], np.int16), isVector=False)
    sitk.WriteImage(img, str(path))
    with pytest.raises(ImageReadError, match=fragment) as err:
        read_image(path)
    assert str(path) in str(err.value)


def test_4d_with_one_timepoint_is_3d(tmp_path: Path) -> None:
    path = tmp_path / "t1.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((1, 4, 5, 6), np.int16), isVector=False), str(path))
    assert read_image(path).array.shape == (6, 5, 4)


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    image, _ = make_volume(4)
    good = write_image(tmp_path / "good.nii.gz", image.array, image.geometry)
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    for path in (truncated, garbage, tmp_path / "missing.nii.gz"):
        with pytest.raises(ImageReadError) as err:
            read_image(path)
        assert str(path) in str(err.value)


def _nibabel_voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path), mmap=False).dataobj)


@pytest.mark.parametrize(("dtype", "slope", "inter", "big_endian"), [
    (np.int16, None, None, False), (np.int16, 2.0, -1024.0, False), (np.uint8, 0.5, 0.0, False),
    (np.float32, None, None, False), (np.int16, None, None, True), (np.int32, 1.0, 3.0, True)])
def test_a_gzipped_nifti_reads_as_nibabel_reads_it(tmp_path: Path, dtype: type, slope: float | None,
                                                   inter: float | None, big_endian: bool) -> None:
    """medsup decompresses .nii.gz itself (faster than nibabel's gzip stream): the same values in the same type
    as nibabel's array, scale factors and byte order included."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 200, (7, 6, 5)).astype(dtype)
    img = nib.Nifti1Image(data, np.diag([0.8, 0.9, 2.5, 1.0]))
    if big_endian:
        img = nib.Nifti1Image(data, img.affine, img.header.as_byteswapped(">"))
    img.header.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    path = tmp_path / "v.nii.gz"
    nib.save(img, str(path))
    expected = _nibabel_voxels(path)
    assert (slope is not None) == (expected.dtype.kind == "f" and dtype is not np.float32)
    got = read_image(path).array
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_every_step_boundary_of_the_inflater_reads_the_same_voxels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   chunk: int) -> None:
    """The reader inflates a bounded step at a time (1 MiB of input, 4 MiB of output): with tiny steps every
    boundary case turns up on a small volume (a step ending inside the header, in a long run of air that
    compresses to a few bytes, in the trailer; one member or several)."""
    monkeypatch.setattr(io, "_GZIP_CHUNK", chunk)
    rng = np.random.default_rng(1)
    data = np.zeros((24, 20, 16), np.int16)
    data[:, :, :6] = rng.integers(-1000, 1000, (24, 20, 6))  # noise, then a long run of zeros
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    members = tmp_path / "members.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    members.write_bytes(b"".join(gzip.compress(raw[i:i + 3000]) for i in range(0, len(raw), 3000)))
    for source in (path, members):
        got = read_image(source).array
        assert got.dtype == np.int16 and np.array_equal(got, data)


@pytest.mark.parametrize("inflater", ["zlib-ng", "zlib"])
def test_a_gzipped_nifti_of_several_members_and_a_corrupt_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              inflater: str) -> None:
    """bgzip writes one gzip member per block: every member is read. A damaged CRC or deflate stream is an
    error naming the file, never zero-filled or wrong voxels; a header offset far past the data allocates
    nothing for it. With zlib-ng (a dependency) and with the system zlib (what an environment without it
    falls back to)."""
    if inflater == "zlib":
        monkeypatch.setattr(io, "_zlib", zlib)
    image, _ = make_volume(4)
    good = write_image(tmp_path / "good.nii.gz", image.array, image.geometry)
    raw = gzip.decompress(good.read_bytes())
    members = tmp_path / "members.nii.gz"
    members.write_bytes(b"".join(gzip.compress(raw[i:i + 1000]) for i in range(0, len(raw), 1000)))
    assert np.array_equal(read_image(members).array, read_image(good).array)
    packed = bytearray(good.read_bytes())
    crc = tmp_path / "crc.nii.gz"
    packed[-6] ^= 0xFF  # the trailer's CRC-32
    crc.write_bytes(bytes(packed))
    stream = tmp_path / "stream.nii.gz"
    body = bytearray(good.read_bytes())
    body[len(body) // 2] ^= 0xFF
    stream.write_bytes(bytes(body))
    for path in (crc, stream):
        with pytest.raises(ImageReadError) as err:  # ITK's header read may notice first
            read_image(path)
        assert str(path) in str(err.value)
        with pytest.raises((zlib.error, zlib_ng.error)):  # and the voxel reader does not need ITK for it
            _gunzip_into(path, memoryview(bytearray(len(raw))))
    with pytest.raises(EOFError, match="ends after"):
        _gunzip_into(good, memoryview(bytearray(16)), skip=2**50)
    header = memoryview(bytearray(348))
    _gunzip_into(members, header)
    assert bytes(header) == raw[:348]
    voxels = memoryview(bytearray(len(raw) - 352))
    _gunzip_into(members, voxels, skip=352)
    assert bytes(voxels) == raw[352:]


def test_huge_header_is_refused_before_allocation(tmp_path: Path) -> None:
    path = tmp_path / "huge.nii"
    write_image(path, np.zeros((4, 4, 4), np.int16), Geometry(
        (4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    raw = bytearray(path.read_bytes())
    # NIfTI-1 dim[1..3] are int16 at byte offsets 42, 44, 46
    for offset in (42, 44, 46):
        raw[offset:offset + 2] = (30000).to_bytes(2, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageReadError, match="header claims"):
        read_image(path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    image, _ = make_volume(5)
    with pytest.raises(ValueError, match="does not match geometry"):
        write_image(tmp_path / "x.nii.gz", image.array[:-1], image.geometry)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="unsupported output suffix"):
        write_image(tmp_path / "x.png", image.array, image.geometry)
    assert os.listdir(tmp_path) == []


def _realdata_images(root: Path) -> list[Path]:
    """Every NIfTI file and every folder holding a multi-file DICOM series."""
    found = []
    for path in sorted(root.rglob("*")):
        is_series = path.is_dir() and len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))) > 2
        if path.name.endswith((".nii.gz", ".nii")) or is_series:
            found.append(path)
    return found


def test_every_real_ct_loads_like_simpleitk(realdata: Path) -> None:
    paths = _realdata_images(realdata)
    assert any(p.is_dir() for p in paths), f"no DICOM series under {realdata}"
    for path in paths:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
            ref = reader.Execute()
        else:
            ref = sitk.ReadImage(str(path))
        vol = read_image(path)
        assert vol.array.shape == ref.GetSize(), path
        np.testing.assert_allclose(vol.geometry.spacing, ref.GetSpacing(), rtol=1e-6, err_msg=str(path))
        np.testing.assert_allclose(vol.geometry.direction, ref.GetDirection(), atol=1e-6, err_msg=str(path))
        np.testing.assert_allclose(vol.geometry.origin, ref.GetOrigin(), atol=1e-4, err_msg=str(path))
        k = vol.array.shape[2] // 2
        np.testing.assert_array_equal(vol.array[:, :, k], sitk.GetArrayFromImage(ref)[k].T)


def test_real_orientations(realdata: Path) -> None:
    ts = read_header(realdata / "liver_io/totalsegmentator_example/example_ct.nii.gz").geometry
    lung = read_header(realdata / "lung/imagesTr/pyrad_lung1.nii.gz").geometry
    assert ts.orientation == "RAS" and lung.orientation == "LPS"
    assert read_image(realdata / "lung/imagesTr/pyrad_lung1.nii.gz", "RAS").geometry.orientation == "RAS"


def test_single_slice_dicom_is_refused_as_2d(realdata: Path) -> None:
    folder = realdata / "unlabeled/lungmask_slices"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    for path in sorted(folder.glob("*.dcm")):
        with pytest.raises(ImageReadError, match="single slice") as err:
            read_image(path)
        assert str(path) in str(err.value)


def test_write_json_is_strict_and_atomic(tmp_path: Path) -> None:
    value = {"a": math.nan, "b": [1.0, math.inf, (2, -math.inf)], "c": "x"}
    path = write_json(tmp_path / "out" / "numbers.json", value)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"a": None, "b": [1.0, None, [2, None]], "c": "x"} and text.endswith("}\n")
    assert "NaN" not in text and "Infinity" not in text
    with pytest.raises(TypeError):
        write_json(path, {"unserialisable": object()})
    assert json.loads(path.read_text(encoding="utf-8"))["c"] == "x"  # the old file stays whole
    assert [p.name for p in path.parent.iterdir()] == ["numbers.json"]
