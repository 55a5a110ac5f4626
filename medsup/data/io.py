"""Image readers and writers that keep geometry exactly.

Arrays are indexed ``(i, j, k)`` with a :class:`~medsup.data.geometry.Geometry` in ITK terms (conventions:
:mod:`medsup.data.geometry`). Every format goes through SimpleITK (NIfTI, NRRD, MHA/MHD, DICOM series
folders) so one code path decides geometry. The header is read and validated before any pixel is, so a
header claiming a terabyte-sized volume fails fast without allocating it, and so does one claiming far more
pixel data than its file can hold (:mod:`medsup.data.filecheck` also refuses FIFOs, dangling symlinks and
headers ITK misreads or chokes on). Writes are atomic (:func:`medsup.data.files.atomic_path`): a temp file in
the target folder, then a rename.
"""

from __future__ import annotations

import logging
import types
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.arrayproxy import ArrayProxy
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.volumeutils import apply_read_scaling

from medsup.data.filecheck import (
    ImageReadError,
    check_data_size,
    check_metaimage_header,
    check_nifti_header,
    check_nifti_written,
    check_nrrd_header,
    check_source,
)
from medsup.data.files import IMAGE_SUFFIXES, atomic_path, image_suffix
from medsup.data.geometry import Geometry, Volume

log = logging.getLogger(__name__)

try:  # zlib-ng inflates 1.6-1.8x faster than the system zlib (bench/read_nifti.py); same API and checks
    from zlib_ng import zlib_ng as _zlib_ng

    _zlib: types.ModuleType = _zlib_ng
except ImportError:  # an environment set up before it was a dependency (a GPU kit): the system zlib
    _zlib = zlib
#: what reading a truncated or corrupt NIfTI raises (nibabel, zlib, zlib-ng)
_DATA_ERRORS: tuple[type[Exception], ...] = (EOFError, OSError, ValueError, zlib.error, _zlib.error, ImageFileError,
                                             HeaderDataError)

#: the largest volume a header may claim before we refuse to allocate it (voxels)
MAX_VOXELS = 2_000_000_000


def is_image_path(path: Path) -> bool:
    """True for a file with a readable image suffix or a folder holding a DICOM series."""
    if path.is_dir():
        return bool(_dicom_files(path, quiet=True))
    return bool(image_suffix(path)) or path.suffix.lower() == ".dcm"


def _dicom_files(folder: Path, quiet: bool = False) -> list[str]:
    """File names of the largest DICOM series in ``folder`` (a folder may hold several)."""
    # ITK prints a warning for every folder without DICOM; asking is how we find out, so silence it
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or []
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if not ids:
        return []
    series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in ids]
    series.sort(key=len, reverse=True)
    if len(series) > 1 and not quiet:
        log.warning("%s holds %d DICOM series; reading the largest (%d files)", folder, len(ids), len(series[0]))
    return list(series[0])


@dataclass(frozen=True)
class Header:
    """What a header says before pixels are read."""

    path: Path
    geometry: Geometry
    pixel_type: str


def _check_header(path: Path, size: tuple[int, ...], spacing: tuple[float, ...],
                  direction: tuple[float, ...], components: int) -> None:
    """Refuse images medsup cannot use, before any pixel is allocated."""
    if components != 1:
        raise ImageReadError(f"{path}: {components} components per voxel; expected a scalar (grey-level) image")
    dims = len(size)
    if dims == 4 and size[3] == 1:
        dims = 3  # NIfTI often stores 3-D as 4-D with one time point
    if dims != 3:
        raise ImageReadError(f"{path}: {len(size)}-D image of size {list(size)}; expected a 3-D volume")
    if min(size[:3]) < 1:
        raise ImageReadError(f"{path}: empty image (size {list(size)})")
    if min(size[:3]) == 1:
        raise ImageReadError(f"{path}: a single slice (size {list(size[:3])}) is a 2-D image; expected a 3-D volume")
    voxels = int(np.prod(size[:3], dtype=np.int64))
    if voxels > MAX_VOXELS:
        raise ImageReadError(
            f"{path}: header claims {list(size[:3])} = {voxels:.3g} voxels, more than the {MAX_VOXELS:.1g} allowed; "
            "the header is corrupt or the volume is not a CT"
        )
    if min(spacing[:3]) <= 0 or not np.all(np.isfinite(spacing[:3])):
        raise ImageReadError(f"{path}: spacing {list(spacing[:3])} must be positive and finite")
    direction3 = np.asarray(direction, dtype=np.float64)
    if direction3.size == 16:
        direction3 = direction3.reshape(4, 4)[:3, :3]
    direction3 = direction3.reshape(3, 3)
    if not np.allclose(direction3.T @ direction3, np.eye(3), atol=1e-3):
        raise ImageReadError(f"{path}: direction cosines {direction3.round(4).tolist()} are not orthonormal")


def _geometry_of(image: sitk.Image) -> Geometry:
    return Geometry.from_itk(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def read_header(path: Path | str) -> Header:
    """Read and validate the geometry of ``path`` without reading its pixels (DICOM: see :func:`_series_header`).

    Raises:
        ImageReadError: missing, unreadable, not 3-D scalar, absurd size, bad spacing or direction.
    """
    path = Path(path)
    if check_source(path):
        return _series_header(path)
    if image_suffix(path) in (".nii", ".nii.gz"):
        check_nifti_header(path)
    elif image_suffix(path) in (".mha", ".mhd"):
        check_metaimage_header(path)
    elif image_suffix(path) in (".nrrd", ".nhdr"):
        check_nrrd_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ImageReadError(f"{path}: unreadable image header ({_itk_reason(err)})") from None
    size, spacing, direction = reader.GetSize(), reader.GetSpacing(), reader.GetDirection()
    _check_header(path, size, spacing, direction, reader.GetNumberOfComponents())
    check_data_size(path, image_suffix(path), size, reader.GetPixelID())
    geom = Geometry.from_itk(size, spacing, reader.GetOrigin(), direction)
    return Header(path, geom, sitk.GetPixelIDValueAsString(reader.GetPixelID()))


def _slice_info(path: Path, file: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ImageReadError(f"{path}: unreadable DICOM header in {file} ({_itk_reason(err)})") from None
    return reader


def _series_header(path: Path) -> Header:
    """The geometry of the DICOM series in folder ``path`` from the headers of its first and last file.

    Reading every slice's pixels to learn a shape (what ``ImageSeriesReader.Execute`` would do) costs the
    whole volume; this is what ITK's ``ImageSeriesReader`` derives before it reads pixels, with SimpleITK's
    default ``ForceOrthogonalDirection``: size, spacing and direction in-plane from the first file, the
    slice count from the series, the slice spacing from the distance between the first and last slice
    positions, the origin and direction from the first file.
    """
    files = _dicom_files(path)
    if not files:
        raise ImageReadError(f"{path}: folder holds no DICOM series")
    first = _slice_info(path, files[0])
    size, spacing = list(first.GetSize()), list(first.GetSpacing())
    if len(size) != 3:
        raise ImageReadError(f"{path}: {files[0]} is a {len(size)}-D image; expected slices of a 3-D series")
    origin = first.GetOrigin()
    if len(files) > 1:
        size[2] = len(files)
        step = np.subtract(_slice_info(path, files[-1]).GetOrigin(), origin)
        distance = float(np.linalg.norm(step))
        # ITK's rule: coincident first and last positions leave the slice spacing undefined (1)
        spacing[2] = distance / (len(files) - 1) if distance > 1e-12 else 1.0
    _check_header(path, tuple(size), tuple(spacing), first.GetDirection(), first.GetNumberOfComponents())
    geom = Geometry.from_itk(tuple(size), tuple(spacing), origin, first.GetDirection())
    return Header(path, geom, sitk.GetPixelIDValueAsString(first.GetPixelID()))


def _itk_reason(err: Exception) -> str:
    """The useful last line of an ITK exception (they carry several lines of C++ context)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if "description" in line.lower() or "error" in line.lower():
            return line.split(":", 1)[-1].strip() if ":" in line else line
    return lines[-1] if lines else type(err).__name__


def _nifti_voxels(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """NIfTI voxels through nibabel: ITK silently zero-fills a truncated .nii/.nii.gz, nibabel raises.

    Geometry still comes from ITK's header reading, so every format shares one geometry code path; the
    voxel order of nibabel's array is already ``(i, j, k)``. A ``.nii.gz`` is decompressed here
    (:func:`_gunzip_into`, zlib-ng) with nibabel's offset, type, order and scaling: nibabel's own gzip
    stream reads it slower and holds it twice (``bench/read_nifti.py``). Nothing is allocated before
    nibabel's idea of the shape agrees with the header ITK read (which was checked for size).
    """
    try:
        proxy = nib.load(str(path), mmap=False).dataobj  # type: ignore[attr-defined]
    except _DATA_ERRORS as err:
        raise ImageReadError(f"{path}: truncated or corrupt image data ({err})") from None
    stored = tuple(int(n) for n in proxy.shape)
    if (stored[:3] if stored[3:] == (1,) else stored) != shape:
        raise ImageReadError(f"{path}: voxel data has shape {list(stored)}, header says {list(shape)}")
    try:
        if image_suffix(path) == ".nii.gz" and isinstance(proxy, ArrayProxy):
            array = _gunzipped_voxels(path, proxy)
        else:
            array = np.asanyarray(proxy)
    except _DATA_ERRORS as err:
        raise ImageReadError(f"{path}: truncated or corrupt image data ({err})") from None
    return array.reshape(shape)  # a trailing time axis of 1 dropped: a view


#: compressed bytes read per step: larger steps decompress no faster (bench/read_nifti.py) and hold more
_GZIP_CHUNK = 1 << 20


def _gunzipped_voxels(path: Path, proxy: ArrayProxy) -> np.ndarray:
    """What ``np.asanyarray(proxy)`` returns (nibabel's ``ArrayProxy.__array__``: the stored values, then its
    slope and intercept, in its types), the file decompressed in large steps into one buffer."""
    buffer = bytearray(int(np.prod(proxy.shape)) * proxy.dtype.itemsize)
    _gunzip_into(path, memoryview(buffer), skip=int(proxy.offset))
    raw = np.ndarray(proxy.shape, proxy.dtype, buffer=buffer, order=proxy.order)
    # nibabel's ArrayProxy._get_scaled with dtype=None: scale factors in their own type, then apply_read_scaling
    slope, inter = np.asanyarray(proxy.slope), np.asanyarray(proxy.inter)
    if np.can_cast(inter, slope.dtype):
        inter = inter.astype(slope.dtype)
    return apply_read_scaling(raw, slope, inter)


def _gunzip_into(path: Path, out: memoryview, skip: int = 0) -> None:
    """Fill ``out`` with the decompressed bytes of the gzip file ``path`` that follow its first ``skip``.

    zlib checks each member's CRC and length as it ends (the member holding the last byte is read to its end
    when that is near; a stream going on far past what is wanted is not read on); a file of several members
    (bgzip writes many) is read across them. Output comes a bounded step at a time: the only large
    allocation is ``out``, whatever ``skip`` says.

    Raises:
        EOFError: the stream ends before ``skip + len(out)`` bytes (a truncated file).
        zlib_ng.error (zlib.error without zlib-ng): corrupt data or a failed CRC check.
    """
    need, done, spill = skip + len(out), 0, 0  # done and need count from the start of the stream
    inflate = _zlib.decompressobj(31)  # 31: gzip header and trailer, checked
    rest = b""
    with open(path, "rb") as f:
        while True:
            if inflate.eof:
                rest = inflate.unused_data
                if done == need or not (rest or (rest := f.read(_GZIP_CHUNK))):
                    break
                inflate = _zlib.decompressobj(31)  # the next member
            data = inflate.unconsumed_tail or rest or f.read(_GZIP_CHUNK)
            rest = b""
            if not data:
                break
            # past the last byte wanted, read on only to the member's end (its CRC), a little at most
            chunk = inflate.decompress(data, min(need - done, 4 * _GZIP_CHUNK) if done < need else _GZIP_CHUNK)
            take = min(len(chunk), need - done)
            start = max(skip - done, 0)  # the part of this chunk that is still header
            if take > start:  # through a memoryview: a bytes slice would copy the step once more
                out[done + start - skip:done + take - skip] = memoryview(chunk)[start:take]
            done += take
            spill += len(chunk) - take
            if done == need and spill > _GZIP_CHUNK:
                break
    if done < need:
        raise EOFError(f"the gzip stream ends after {done} of {need} bytes")


def read_image(path: Path | str, orientation: str | None = None) -> Volume:
    """Read a NIfTI/NRRD/MHA/MHD file or a DICOM series folder into a :class:`Volume`.

    Args:
        path: image file, or folder holding one DICOM series (the largest if several).
        orientation: if given (e.g. ``"RAS"``), reorient exactly to it.

    Returns:
        Volume with ``array`` of shape ``(I, J, K)`` in the file's pixel type.

    Raises:
        ImageReadError: the file cannot be read or is not a usable 3-D scalar volume.
    """
    path = Path(path)
    try:
        if check_source(path):
            files = _dicom_files(path)
            if not files:
                raise ImageReadError(f"{path}: folder holds no DICOM series")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            header = read_header(path)  # validate before allocating
            if image_suffix(path) in (".nii", ".nii.gz"):
                volume = Volume(_nifti_voxels(path, header.geometry.shape), header.geometry)
                return volume.reoriented(orientation) if orientation else volume
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ImageReadError(f"{path}: cannot read image data ({_itk_reason(err)})") from None
    _check_header(path, image.GetSize(), image.GetSpacing(), image.GetDirection(),
                  image.GetNumberOfComponentsPerPixel())
    array = sitk.GetArrayFromImage(image)  # (k, j, i) order, owned copy
    if array.ndim == 4:  # (t=1, k, j, i)
        array = array[0]
    volume = Volume(array.transpose(2, 1, 0), _geometry_of(image))
    return volume.reoriented(orientation) if orientation else volume


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """Build a SimpleITK image from an ``(I, J, K)`` array and its geometry."""
    if array.shape != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def write_image(path: Path | str, array: np.ndarray, geometry: Geometry, compress: bool = True) -> Path:
    """Atomically write an ``(I, J, K)`` array with ``geometry`` to ``path`` (format from the suffix).

    Raises:
        OSError: the write failed (disk full, permissions); no partial file is left.
    """
    path = Path(path)
    if not image_suffix(path):
        raise ValueError(f"{path}: unsupported output suffix; use one of {', '.join(IMAGE_SUFFIXES)}")
    image = to_sitk(array, geometry)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as err:
            raise OSError(f"{path}: write failed ({_itk_reason(err)})") from None
        if image_suffix(path) in (".nii", ".nii.gz"):
            check_nifti_written(tmp, path)
    return path


def write_volume(path: Path | str, volume: Volume, compress: bool = True) -> Path:
    """:func:`write_image` for a :class:`Volume`."""
    return write_image(path, volume.array, volume.geometry, compress)
