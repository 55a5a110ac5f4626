"""Files without images: recognised image suffixes, atomic writes, strict JSON, and telling a full disk.

Light on purpose (the standard library only): reports, histories and JSON summaries write through here
without importing nibabel or SimpleITK. Every write is atomic: a temp file beside the target, renamed over it
only on success, so a crash, Ctrl-C or full disk never leaves a partial file where a complete one is expected.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

#: file suffixes read as single files, longest first so ``.nii.gz`` wins over ``.gz``
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class DiskFullError(OSError):
    """A write failed because its file system (or the user's quota) is full: every later write there would fail
    too, so a batch stops instead of computing outputs it cannot keep."""


#: a failed write with less than this free beside it counts as a full disk (what is left is less than a label
#: volume of a small scan; the partial temp file still holds the space when this is checked)
DISK_FULL_FREE_BYTES = 1 << 20


def is_disk_full(err: BaseException, folder: Path) -> bool:
    """Did the write that raised ``err`` into ``folder`` fail for want of space? ENOSPC or EDQUOT, or (ITK's
    writers report a short write without errno) less than :data:`DISK_FULL_FREE_BYTES` free in ``folder``."""
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):  # DiskFullError carries ENOSPC too
        return True
    if not isinstance(err, OSError):
        return False
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_FREE_BYTES
    except OSError:
        return False


def image_suffix(path: Path) -> str:
    """The recognised suffix of ``path`` (``".nii.gz"`` ...); ``""`` for a DICOM folder or unknown file."""
    name = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def strip_suffix(path: Path) -> str:
    """File name without its image suffix: ``case_01.nii.gz`` -> ``case_01``."""
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def real_path(path: Path) -> Path:
    """``path`` made absolute with every symlink resolved, like ``Path.resolve()``, except that a symlink loop
    stays unresolved instead of raising ``RuntimeError`` (Python < 3.13); reading such a path reports it."""
    return Path(os.path.realpath(path))


@contextlib.contextmanager
def atomic_path(path: Path | str):  # type: ignore[no-untyped-def]
    """Yield a temp path beside ``path`` with the same suffix; rename it over ``path`` only on success.

    A crash, Ctrl-C or full disk leaves no partial ``path`` behind (the temp file is removed).

    Raises:
        DiskFullError: the write failed for want of space (an ``OSError``; see :func:`is_disk_full`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = image_suffix(path) or path.suffix
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}")
        try:
            # not tempfile.mkstemp: its 0600 would survive the rename and hide every output from other users;
            # os.open's 0666 less the umask gives what a plain open() would
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        full = not isinstance(err, DiskFullError) and is_disk_full(err, path.parent)  # before the temp file goes
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full:
            raise DiskFullError(errno.ENOSPC, f"{path}: write failed: no space left on the device ({err})") from None
        raise


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN and infinity (in nested dicts, lists and tuples) replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: Path | str, value: Any, indent: int = 2) -> Path:
    """Atomically write ``value`` to ``path`` as strict JSON plus a newline: NaN and infinities become ``null``
    (other JSON readers refuse Python's ``NaN``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(finite_or_none(value), indent=indent, allow_nan=False) + "\n", encoding="utf-8")
    return Path(path)
