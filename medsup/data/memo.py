"""Where a dataset's caches live, and a per-case memo of what reading a case fully gives.

Light on purpose (the standard library and numpy): the data check and the fingerprint use the memo.

A training start checks every case (:func:`medsup.data.check.check_dataset`) and fingerprints it for the plan
(:func:`medsup.data.fingerprint.fingerprint_dataset`): both read every image and label in full, again at every
run, resume and fold. Their per-case results depend only on the case's two files and a few settings, so
where a dataset has a disk cache (``train.cache: disk``, or a cache folder already made for it) they are kept
beside it and reused while the files keep their size and modification time, as the preprocessed arrays are::

    <cache root>/<dataset folder name>-<hash of its path>/memo/<kind>/<case>.json   (+ <case>_<array>.npy)

Only results are memoised, never a failure: a case with a problem is read and reported every time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from medsup.data.datalist import Case
from medsup.data.files import atomic_path, real_path, write_json

log = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """``$MEDSUP_PREPROCESSED`` if set, else ``$XDG_CACHE_HOME/medsup/preprocessed`` (``~/.cache/...``)."""
    env = os.environ.get("MEDSUP_PREPROCESSED")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "medsup" / "preprocessed"


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def dataset_folder(cache_root: Path | str, data_dir: Path | str) -> Path:
    """The cache folder of the dataset at ``data_dir``: its name and a hash of its real path."""
    data = real_path(Path(data_dir))
    return Path(cache_root).expanduser() / f"{data.name}-{digest(str(data))[:8]}"


def source(path: Path) -> dict[str, Any]:
    """What identifies a file's content cheaply: its real path, size and modification time (ns). For a folder
    (a DICOM series) the same of every file in it, summed up: a folder's own mtime does not move when a file in
    it is rewritten in place."""
    if path.is_dir():
        stats = [(f.name, f.stat()) for f in sorted(path.iterdir()) if f.is_file()]
        return {"path": str(real_path(path)), "files": len(stats), "size": sum(st.st_size for _, st in stats),
                "mtime_ns": max((st.st_mtime_ns for _, st in stats), default=0),
                "names": digest([name for name, _ in stats])}
    st = path.stat()
    return {"path": str(real_path(path)), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def case_sources(case: Case) -> dict[str, Any]:
    """:func:`source` of a case's image and label (None for a missing label)."""
    return {"image": source(case.image), "label": source(case.label) if case.label is not None else None}


class CaseMemo:
    """Per-case results under ``root`` (a dataset's cache folder), reused while the case's files are unchanged
    and the settings are the same. Writing is best effort: a memo that cannot be written is skipped (logged),
    never an error."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_dataset(cls, cache: str, cache_dir: str | None, data_dir: Path | str) -> CaseMemo | None:
        """The memo of ``data_dir``, where the dataset has a disk cache: ``cache`` (``train.cache``) is
        ``disk``, or its cache folder exists already; else None (the memory cache writes nothing to disk)."""
        folder = dataset_folder(cache_dir or default_cache_root(), data_dir)
        return cls(folder / "memo") if cache == "disk" or folder.is_dir() else None

    def _path(self, kind: str, case_id: str, array: str | None = None) -> Path:
        return self.root / kind / (f"{case_id}.json" if array is None else f"{case_id}_{array}.npy")

    def get(self, kind: str, case: Case,
            settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """``(record, arrays)`` memoised for ``case`` under ``kind`` with these ``settings``, or None when
        there is none, the case's files changed, the settings differ or an array is not as written."""
        try:
            meta = json.loads(self._path(kind, case.case_id).read_text(encoding="utf-8"))
            if meta.get("settings") != json.loads(json.dumps(settings)) or meta.get("sources") != case_sources(case):
                return None
            arrays = {}
            for name, size in meta.get("arrays", {}).items():
                path = self._path(kind, case.case_id, name)
                if path.stat().st_size != size:
                    return None
                arrays[name] = np.load(path)
        except (OSError, ValueError):
            return None
        return dict(meta["record"]), arrays

    def put(self, kind: str, case: Case, settings: dict[str, Any], record: dict[str, Any],
            arrays: dict[str, np.ndarray] | None = None) -> None:
        """Memoise ``record`` (JSON-able) and ``arrays`` for ``case``; the arrays first, the json last."""
        try:
            sizes = {}
            for name, array in (arrays or {}).items():
                path = self._path(kind, case.case_id, name)
                with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(array))
                sizes[name] = path.stat().st_size
            write_json(self._path(kind, case.case_id), {"settings": settings, "sources": case_sources(case),
                                                        "record": record, "arrays": sizes})
        except OSError as err:
            log.debug("%s: memo not written in %s (%s)", case.case_id, self.root, err)
