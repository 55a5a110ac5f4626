"""Bad image files, one per fault, each with the words its error must contain; and two process helpers.

:func:`write_fault` writes ``folder / f"{name}{suffix}"``, starting from the tiny CT-like volume of
``tests.conftest`` (seed 0: 24 x 20 x 16 voxels, rotated direction). :func:`unprivileged` runs a block as uid
``nobody`` (permission faults under root); :func:`address_space_limit` makes any big allocation fail at once.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import resource
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medsup.data.geometry import Geometry, Volume
from medsup.data.io import write_image, write_volume
from tests.conftest import make_volume

NOBODY = 65534


@dataclass(frozen=True)
class Fault:
    """A bad image: how to write it and what its error says."""

    name: str
    suffix: str
    write: Callable[[Path], None]
    says: str


def good() -> tuple[Volume, Volume]:
    """The image and label every fault starts from (seed 0)."""
    return make_volume(0)


def _nifti_bytes() -> bytearray:
    """The good image as an uncompressed single-file NIfTI-1, in memory."""
    image, _ = good()
    return bytearray(nib.Nifti1Image(image.array, image.geometry.affine()).to_bytes())


def _truncated(path: Path) -> None:
    data = gzip.compress(bytes(_nifti_bytes()), mtime=0)
    path.write_bytes(data[: len(data) // 2])


def _wrong_magic(path: Path) -> None:
    data = _nifti_bytes()
    data[344:348] = b"xxxx"  # NIfTI-1 magic "n+1\0"; without it ITK reads the file as Analyze 7.5
    path.write_bytes(data)


def _dims(path: Path, dims: int) -> None:
    data = _nifti_bytes()
    for offset in (42, 44, 46):  # dim[1..3], int16
        data[offset:offset + 2] = struct.pack("<h", dims)
    path.write_bytes(gzip.compress(bytes(data)) if path.name.endswith(".gz") else bytes(data))


def _oversized_nrrd(path: Path) -> None:
    image, _ = good()
    write_volume(path, image, compress=False)
    path.write_bytes(path.read_bytes().replace(b"sizes: 24 20 16", b"sizes: 1200 1200 1200"))


def _sitk(path: Path, shape: tuple[int, ...]) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape[::-1], np.int16), isVector=False), str(path))


def _nonfinite(value: float) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        image, _ = good()
        array = image.array.astype(np.float32)
        array[3, 4, 5] = value
        write_image(path, array, image.geometry)
    return write


def _zero_pixdim(path: Path) -> None:
    data = _nifti_bytes()
    data[80:84] = struct.pack("<f", 0.0)  # pixdim[1]: ITK would silently read 1 mm
    path.write_bytes(data)


def _inf_sform(path: Path) -> None:
    data = _nifti_bytes()
    data[254:256] = struct.pack("<h", 1)  # sform_code: the sform is used
    data[300:304] = struct.pack("<f", float("inf"))  # srow_y[1]
    path.write_bytes(data)


def _text_header(pattern: bytes, replacement: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        image, _ = good()
        write_volume(path, image, compress=False)
        raw = path.read_bytes()
        path.write_bytes(re.sub(pattern, replacement, raw, count=1))
    return write


def _nrrd_spacings(line: bytes) -> Callable[[Path], None]:
    """A NRRD without world space: per-axis ``spacings`` (``line``; empty: none at all) instead of directions."""
    def write(path: Path) -> None:
        image, _ = good()
        write_volume(path, image, compress=False)
        raw = re.sub(rb"space(?: origin)?: [^\n]*\n", b"", path.read_bytes())
        path.write_bytes(re.sub(rb"space directions: [^\n]*\n", line + b"\n" if line else b"", raw, count=1))
    return write


def _sheared_nifti(path: Path) -> None:
    image, _ = good()
    affine = np.array([[0.8, 0.4, 0, 0], [0, 0.9, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(image.array, affine), str(path))


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _dangling(path: Path) -> None:
    os.symlink(path.with_name("nowhere.nii.gz"), path)


def _loop(path: Path) -> None:
    os.symlink(path, path)  # a link to itself: ELOOP


def _empty(path: Path) -> None:
    path.write_bytes(b"")


IMAGE_FAULTS = [
    Fault("truncated", ".nii.gz", _truncated, "truncated or corrupt image data"),
    Fault("wrong_magic", ".nii", _wrong_magic, "not a NIfTI-1/2 file"),
    Fault("terabyte", ".nii.gz", lambda p: _dims(p, 30000), "header claims [30000, 30000, 30000]"),
    Fault("oversized", ".nrrd", _oversized_nrrd, "the file holds"),
    Fault("two_d", ".nii.gz", lambda p: _sitk(p, (24, 20)), "2-D image"),
    Fault("four_d", ".nii.gz", lambda p: _sitk(p, (6, 7, 8, 3)), "4-D image"),
    Fault("nan", ".nii.gz", _nonfinite(float("nan")), "NaN/Inf voxels"),
    Fault("inf", ".nrrd", _nonfinite(float("inf")), "NaN/Inf voxels"),
    Fault("zero_spacing", ".nii", _zero_pixdim, "pixdim [0.0"),
    Fault("negative_spacing", ".mha", _text_header(rb"ElementSpacing = \S+", b"ElementSpacing = -0.8"),
          "must be positive and finite"),
    Fault("zero_spacing_nrrd", ".nrrd", _text_header(rb"space directions: \([^)]*\)", b"space directions: (0,0,0)"),
          "must be positive and finite"),
    # ITK's NRRD reader gives an axis of unknown spacing 1 mm: refused by medsup.data.filecheck
    Fault("nan_spacings_nrrd", ".nrrd", _nrrd_spacings(b"spacings: nan 0.9 2.5"), "spacing nan"),
    Fault("no_spacing_nrrd", ".nrrd", _nrrd_spacings(b""), "no 'space directions' or 'spacings' field"),
    Fault("none_direction_nrrd", ".nrrd", _text_header(rb"space directions: \([^)]*\)", b"space directions: none"),
          "space direction none"),
    Fault("nan_direction_nrrd", ".nrrd", _text_header(rb"space directions: \([^)]*\)",
                                                      b"space directions: (nan,nan,nan)"), "space direction (nan"),
    Fault("sheared", ".nii.gz", _sheared_nifti, "orthonormal direction cosines"),
    Fault("sheared_mha", ".mha", _text_header(rb"TransformMatrix = [^\n]*", b"TransformMatrix = 1 0 0 0.5 1 0 0 0 1"),
          "are not orthonormal"),
    # found by the fuzz: ITK's NIfTI reader never returns from an sform with an Inf in it
    Fault("inf_sform", ".nii", _inf_sform, "sform (srow_x/y/z) holds NaN or Inf"),
    # found by the fuzz: ITK's MetaImage reader hangs or segfaults on this
    Fault("ndims", ".mha", _text_header(rb"NDims = 3", b"NDims = 99999999999999999999"),
          "NDims = '99999999999999999999'"),
    Fault("fifo", ".nii.gz", _fifo, "not a regular file"),
    Fault("dangling", ".nii.gz", _dangling, "dangling symbolic link"),
    Fault("loop", ".nii.gz", _loop, "symbolic link loop"),
    Fault("empty", ".nii.gz", _empty, "empty file (0 bytes)"),
]


def write_fault(fault: Fault, folder: Path, stem: str | None = None) -> Path:
    """Write ``fault`` as ``folder/<stem or fault.name><suffix>``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem or fault.name}{fault.suffix}"
    fault.write(path)
    return path


def write_label_faults(labels: Path) -> dict[str, str]:
    """Label-side faults (``medsup data check`` only) as ``{case: words of its error}``."""
    _, label = good()
    g = label.geometry
    floats = label.array.astype(np.float32)
    floats[1, 1, 1] = 0.5
    write_image(labels / "float_label.nii.gz", floats, g)
    sevens = label.array.copy()
    sevens[0, 0, 0] = 7
    write_image(labels / "label_values.nii.gz", sevens, g)
    write_image(labels / "mismatch.nii.gz", label.array[:, :, :15], Geometry((24, 20, 15), g.spacing, g.origin,
                                                                           g.direction))
    return {"float_label": "non-integer values [0.5]", "label_values": "values [7] outside the task's [0, 1, 2]",
            "mismatch": "geometry differ: shape [24, 20, 16] != [24, 20, 15]"}


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Run the block with effective uid/gid ``nobody`` when root (for whom ``chmod 000`` blocks nothing).

    Root reads any file whatever its mode (these machines and most containers run tests as root), so
    ``chmod 000`` alone tests nothing there. Dropping only the *effective* ids keeps the saved uid 0, so the
    block can switch back; meanwhile the kernel checks permissions exactly as for an ordinary user.
    """
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@contextlib.contextmanager
def address_space_limit(extra: int) -> Iterator[None]:
    """Cap this process's address space (RLIMIT_AS) at its current size + ``extra`` bytes; restored on exit.

    Inside, any allocation of more than ``extra`` bytes (numpy, ITK's ``new[]``, nibabel's ``bytearray``) fails
    at once instead of being granted lazily by the kernel's overcommit, so "allocates nothing big" is testable.
    """
    status = Path("/proc/self/status").read_text(encoding="utf-8")
    vm = int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + extra if hard == resource.RLIM_INFINITY else min(vm + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
