"""Checks around the readers and writers of :mod:`medsup.data.io`, for what the libraries get wrong.

Before a reader opens a file: it must be a regular, readable file (ITK blocks forever opening a FIFO); a NIfTI
header must carry the NIfTI magic and non-zero pixdims (ITK reads Analyze 7.5 and substitutes 1 mm), a NRRD
header a finite spacing on every spatial axis (ITK substitutes 1 mm for a missing or NaN one); a MetaImage
NDims must be a small count (ITK hangs or segfaults on ``NDims = 1e20``); the header must not claim more pixel
data than the file can hold, since readers allocate first. After ITK writes a NIfTI file: every byte must be
there (its NIfTI writer reports a short write on stderr only).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener

#: deflate (gzip, zlib: .nii.gz, NRRD gzip, MHA CompressedData) expands at most ~1032:1; a single-file image whose
#: header claims more pixel data than this times its size is truncated or corrupt, and is refused before any
#: reader allocates the buffer the header asks for
MAX_EXPANSION = 1100
_PIXEL_BYTES = {sitk.sitkInt8: 1, sitk.sitkUInt8: 1, sitk.sitkInt16: 2, sitk.sitkUInt16: 2, sitk.sitkInt32: 4,
                sitk.sitkUInt32: 4, sitk.sitkFloat32: 4, sitk.sitkInt64: 8, sitk.sitkUInt64: 8, sitk.sitkFloat64: 8}


class ImageReadError(ValueError):
    """An image could not be read or is not a usable 3-D scalar volume; the message names the file."""


def check_source(path: Path) -> bool:
    """Stat ``path`` before any reader opens it; True for a folder (a DICOM series), False for a regular file.

    Raises:
        ImageReadError: missing, a dangling symlink or a symlink loop, not a regular file (ITK blocks forever
            opening a FIFO), or not readable by this user.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageReadError(f"{path}: dangling symbolic link (to {os.readlink(path)})") from None
        raise ImageReadError(f"{path}: no such file or folder") from None
    except OSError as err:  # ELOOP, or EACCES on a parent folder (Path.exists() would raise or lie here)
        what = "symbolic link loop" if err.errno == errno.ELOOP else f"cannot access ({err.strerror})"
        raise ImageReadError(f"{path}: {what}") from None
    if stat.S_ISDIR(info.st_mode):
        return True
    if not stat.S_ISREG(info.st_mode):
        raise ImageReadError(f"{path}: not a regular file (a FIFO, socket or device); refusing to read it")
    if info.st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    try:
        with open(path, "rb"):  # ITK only says "Unable to open"; say why
            pass
    except OSError as err:
        raise ImageReadError(f"{path}: cannot open for reading ({err.strerror})") from None
    return False


def check_nifti_header(path: Path) -> None:
    """What ITK does not refuse in a NIfTI header: ITK reads a file without the NIfTI magic as Analyze 7.5,
    silently replaces a zero or NaN pixdim by 1 mm, and hangs on an Inf in an sform it uses. nibabel reads the
    header only (no pixels)."""
    try:
        kind = type(nib.load(str(path)).header)  # NIfTI-1 or -2; refuses what is neither
        assert issubclass(kind, nib.Nifti1Header)  # NIfTI suffixes load as NIfTI (Nifti2Header subclasses it)
        with ImageOpener(str(path)) as f:  # again, without nibabel's silent fixes (it too sets a zero pixdim to 1)
            raw = kind.from_fileobj(f, check=False)
        zooms = raw.get_zooms()
        # ITK's reader never returns from an sform with an Inf in it (found by tests/robustness/test_fuzz_headers)
        transforms = {"sform (srow_x/y/z)": (int(raw["sform_code"]), [raw["srow_x"], raw["srow_y"], raw["srow_z"]]),
                      "qform (quatern_b/c/d, qoffset_x/y/z)": (int(raw["qform_code"]), [
                          raw[k] for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                                           "qoffset_z")])}
    except ImageFileError:
        raise ImageReadError(f"{path}: unreadable image header: not a NIfTI-1/2 file (no NIfTI magic; Analyze 7.5 "
                             "is not supported)") from None
    except Exception as err:  # a hostile header can upset nibabel's parser in many ways; all mean "corrupt"
        raise ImageReadError(f"{path}: unreadable image header ({type(err).__name__}: {err})") from None
    for name, (code, values) in transforms.items():
        if code > 0 and not np.all(np.isfinite(np.asarray(values, dtype=np.float64))):
            raise ImageReadError(f"{path}: NIfTI {name} holds NaN or Inf; the image's position in space is unknown")
    pixdim = [float(z) for z in zooms[:3]]
    if not all(np.isfinite(pixdim)) or 0.0 in pixdim:  # a negative one ITK and nibabel both read as its abs
        raise ImageReadError(f"{path}: NIfTI pixdim {pixdim} must be non-zero and finite (voxel spacing in mm)")


def check_metaimage_header(path: Path) -> None:
    """ITK's MetaImage reader hangs or segfaults on an NDims it cannot hold (``-1``, ``3000000000``, ``1e20``;
    found by tests/robustness/test_fuzz_headers.py), so the field is checked here first."""
    with open(path, "rb") as f:
        head = f.read(65536)
    match = re.search(rb"(?m)^\s*NDims\s*=\s*(\S*)", head)
    if match is None:
        return  # ITK says what is missing
    raw = match.group(1).decode("latin-1")
    if not raw.isdigit() or not 1 <= int(raw) <= 16:
        raise ImageReadError(f"{path}: MetaImage header says NDims = {raw!r}; expected a dimension count (3)")


#: NRRD axis kinds that are positions in space; other kinds (vector, RGB-color, list ...) are pixel components
_NRRD_SPACE_KINDS = {"domain", "space", "time", "???", "none"}


def check_nrrd_header(path: Path) -> None:
    """ITK's NRRD reader gives an axis 1 mm where the header does not say its spacing: ``spacings: nan``, a
    ``space directions`` vector that is ``none`` or NaN on a spatial axis, or neither field at all. Each spatial
    axis must have a finite spacing here, so that a scan of unknown geometry is refused, not resampled wrongly."""
    with open(path, "rb") as f:
        head = f.read(65536)
    end = head.find(b"\n\n")  # the header ends at the first blank line (detached headers: the file's end)
    fields: dict[str, str] = {}
    for line in head[: end if end >= 0 else len(head)].decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#") and not value.startswith("="):  # "key:=value" is a key/value pair
            fields[key.strip().lower()] = value.strip()
    try:
        dimension = int(fields.get("dimension", ""))
    except ValueError:
        return  # ITK says what is wrong with it
    kinds = fields.get("kinds", "").split()
    spatial = [i for i in range(dimension) if len(kinds) != dimension or kinds[i].lower() in _NRRD_SPACE_KINDS]
    directions = re.findall(r"\(([^)]*)\)|(none)", fields.get("space directions", ""))
    spacings = fields.get("spacings", "").split()
    for axis in spatial:
        if len(directions) == dimension:
            vector, none = directions[axis]
            values = [] if none else [_float(v) for v in vector.split(",")]
            known = bool(values) and all(np.isfinite(values))  # a zero vector reads as spacing 0: refused later
            what = f"space direction {'none' if none else '(' + vector + ')'}"
        elif len(spacings) == dimension:
            known, what = bool(np.isfinite(_float(spacings[axis]))), f"spacing {spacings[axis]}"
        else:
            known, what = False, "no 'space directions' or 'spacings' field"
        if not known:
            raise ImageReadError(f"{path}: NRRD axis {axis} has {what}: its voxel spacing is unknown (ITK would "
                                 "assume 1 mm); the header must give every spatial axis a finite spacing")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def check_data_size(path: Path, suffix: str, size: tuple[int, ...], pixel_id: int) -> None:
    """Refuse a single-file image whose header claims more pixel data than the file can hold, compressed or not.

    Readers allocate the whole buffer before they find the data short, so a 10 kB file claiming 1200^3 voxels
    would cost 3.5 GB first. Detached data (``.mhd``, ``.nhdr``, NRRD ``data file:``) is not checked.
    """
    if suffix not in (".nii", ".nii.gz", ".nrrd", ".mha"):
        return
    have = path.stat().st_size
    if suffix in (".nrrd", ".mha"):
        with open(path, "rb") as f:
            head = f.read(8192)
        external = re.search(rb"\n\s*data ?file\s*:", head) if suffix == ".nrrd" else \
            re.search(rb"\nElementDataFile\s*=\s*(?!LOCAL\s)\S", head)
        if external:
            return
    need = int(np.prod(size[:3], dtype=np.int64)) * _PIXEL_BYTES.get(pixel_id, 1)
    limit = have if suffix == ".nii" else have * MAX_EXPANSION
    if need > limit:
        how = "" if suffix == ".nii" else f", which cannot expand to more than {limit:.3g} bytes"
        raise ImageReadError(f"{path}: header claims {list(size[:3])} voxels ({need:.3g} bytes of pixel data) but "
                             f"the file holds {have} bytes{how}; the file is truncated or its header is corrupt")


def check_nifti_written(tmp: Path, path: Path) -> None:
    """ITK's NIfTI writer reports a short write (full disk, file-size limit) on stderr only and returns
    normally, leaving a truncated file that ``--resume`` would then take for a finished output: check that
    every byte the header promises is there (for ``.nii.gz``: gzip's ISIZE, the uncompressed length mod 2^32)."""
    try:
        with ImageOpener(str(tmp)) as f:  # the file's own header (a loaded image's copy has vox_offset 0)
            header = nib.Nifti1Header.from_fileobj(f, check=False)  # ITK writes NIfTI-1
        need = int(header.get_data_offset()) + \
            int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
        if tmp.name.endswith(".nii.gz"):
            with open(tmp, "rb") as f:
                f.seek(-4, os.SEEK_END)
                complete = int.from_bytes(f.read(4), "little") == need % 2**32
        else:
            complete = tmp.stat().st_size >= need
    except Exception as err:  # not even the header reads back
        raise OSError(f"{path}: write failed (the written file does not read back: {err})") from None
    if not complete:
        raise OSError(f"{path}: write failed (short write: the disk is full or a file-size limit was reached)")
