"""The training cache on disk: every case preprocessed once, memory-mapped by the loader.

nnU-Net preprocesses a dataset once (``nnUNetv2_plan_and_preprocess``) and its loader reads the result; MONAI's
``CacheDataset`` preprocesses the training cases at the start of every run and keeps them all in RAM. The
second is the faster choice for a small set, and the wrong one for a real one: MSD Task03 at the liver plan's
0.77 mm is ~40 GB of float16/uint8 cache for a fold's 100 training cases, refilled (every CT decoded and
resampled) at every start, resume and fold, in every rank. This store keeps the deterministic head of the
training chain (:func:`medsup.data.transforms.train_cached_transforms`: preprocessed, padded to the patch,
foreground locations) as ``.npy`` files that the loader memory-maps: a patch crop reads the pages it touches,
the operating system's page cache is shared by every worker and rank, and a second run starts at once.

Layout, under the cache folder (``train.cache_dir``, else ``$MEDSUP_PREPROCESSED``, else
``~/.cache/medsup/preprocessed``)::

    <dataset folder name>-<hash of its path>/<hash of the preprocessing settings>/
        settings.json                  what the hash covers (the plan's spacing, orientation, normalisation...)
        plan.json                      the whole plan, when `medsup preprocess` made the store
        <case>_image.npy               (1, X, Y, Z) float16 (train.cache_dtype), normalised units, padded
        <case>_label.npy               (1, X, Y, Z) uint8 (see label_dtype)
        <case>_fg.npy                  foreground locations: (N, 4) rows of (class, i, j, k)
        <case>.json                    affine, meta, the size and mtime of the source files and the size of
                                       the arrays; written last
    <dataset folder name>-<hash of its path>/memo/   the data check's and fingerprint's per-case memo
                                                     (medsup.data.memo)

A case is reused only when its ``.json`` exists, names the same source files with the same size and
modification time, and its arrays have the sizes it records; otherwise it is preprocessed again. Every file
is written atomically (temp + rename), so a killed run leaves whole cases or none. Runs that share a store
(folds started together on one machine) preprocess each case once: a case is written under its lock
(``.<case>.lock``), and a run that waited for it finds it done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform

import medsup
from medsup.config import Config
from medsup.data.datalist import Case
from medsup.data.files import DiskFullError, atomic_path, real_path, write_json
from medsup.data.memo import case_sources, dataset_folder, default_cache_root, digest
from medsup.data.planning import Plan
from medsup.data.transforms import FG_LOCATIONS, IMAGE, LABEL, eval_transforms, label_dtype, train_cached_transforms

log = logging.getLogger(__name__)

#: bump when the files or what they hold change: older stores are then ignored, not misread
STORE_VERSION = 1
CASE_KEY = "case"


class PreprocessError(RuntimeError):
    """A case could not be preprocessed into the store (its message names the case and the file)."""


def store_settings(cfg: Config, plan: Plan, kind: Literal["train", "eval"] = "train") -> dict[str, Any]:
    """Everything the stored arrays depend on (and nothing else: a new batch size or network reuses them).

    ``kind``: ``train`` holds :func:`~medsup.data.transforms.train_cached_transforms` (``train.cache_dtype``
    images, padded to the patch, foreground located); ``eval`` holds
    :func:`~medsup.data.transforms.eval_transforms` (float32 images, unpadded), what validation reads.
    """
    train = kind == "train"
    return {
        "version": STORE_VERSION,
        "medsup": medsup.__version__,  # a release may preprocess differently: its stores are its own
        "kind": kind,
        "orientation": plan.orientation,
        "target_spacing": list(plan.target_spacing),
        "normalization": plan.normalization.model_dump(),
        "pad_to": list(plan.patch_size) if train else None,
        "image_dtype": cfg.train.cache_dtype if train else "float32",
        "label_dtype": np.dtype(label_dtype(plan)).name,
        "fg_classes": foreground_classes(cfg) if train else [],
        "fg_seed": int(cfg.seed) if train else None,
    }


def cached_chain(cfg: Config, plan: Plan, kind: str) -> Compose:
    """The deterministic transforms whose output a store of ``kind`` holds (see :func:`store_settings`)."""
    if kind == "train":
        return Compose(train_cached_transforms(cfg, plan, foreground_classes(cfg)))
    return eval_transforms(plan)


def foreground_classes(cfg: Config) -> list[int]:
    """The task's foreground classes: those the patch sampler oversamples and the store locates."""
    from medsup.tasks import get_task

    return [c for c in sorted(get_task(cfg.task).labels) if c != 0]


@dataclass(frozen=True)
class PreprocessedStore:
    """One dataset's cases preprocessed with one set of :func:`store_settings`, in ``root``."""

    root: Path
    settings: dict[str, Any]

    @classmethod
    def for_dataset(cls, cache_root: Path | str, data_dir: Path | str, settings: dict[str, Any]) -> PreprocessedStore:
        """The store of ``data_dir``'s cases under ``cache_root`` (created, with its ``settings.json``)."""
        root = dataset_folder(cache_root, data_dir) / digest(settings)
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not (root / "settings.json").exists():
                write_json(root / "settings.json", {**settings, "data_dir": str(real_path(Path(data_dir)))})
        except OSError as err:
            raise PreprocessError(f"cannot write the preprocessed cache in {root}: {err.strerror or err}; set "
                                  "train.cache_dir or $MEDSUP_PREPROCESSED to a writable folder") from None
        return cls(root, settings)

    def paths(self, case_id: str) -> dict[str, Path]:
        """The files of one case: ``image``, ``label``, ``fg``, ``meta``."""
        return {"image": self.root / f"{case_id}_image.npy", "label": self.root / f"{case_id}_label.npy",
                "fg": self.root / f"{case_id}_fg.npy", "meta": self.root / f"{case_id}.json"}

    def is_current(self, case: Case) -> bool:
        """Are the case's files there, complete, and made from its source files as they are now?"""
        files = self.paths(case.case_id)
        if case.label is None:
            return False
        try:
            meta = json.loads(files["meta"].read_text(encoding="utf-8"))
            fresh = meta.get("sources") == case_sources(case)
            # the arrays as written (a truncated or replaced file is preprocessed again, not misread)
            written = meta.get("bytes", {})
            whole = {"image", "label"} <= set(written) and written == {k: files[k].stat().st_size for k in written}
        except (OSError, ValueError):
            return False
        return fresh and whole

    def write(self, case: Case, item: Mapping[Hashable, Any]) -> int:
        """Store the output of the cached transforms for ``case``; returns the bytes written.

        The ``.json`` goes last: a case whose json is there is whole.
        """
        assert case.label is not None
        files = self.paths(case.case_id)
        meta: dict[str, Any] = {"sources": case_sources(case)}
        for key in (IMAGE, LABEL):
            value = item[key]
            array = value.as_tensor().numpy() if isinstance(value, MetaTensor) else np.asarray(value)
            # a file object: np.save(path) would append ".npy" to the temp name
            with atomic_path(files[key]) as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(array))
            meta[key] = {"affine": np.asarray(value.affine).tolist() if isinstance(value, MetaTensor) else None,
                         "meta": {k: v for k, v in getattr(value, "meta", {}).items()
                                  if k in ("filename_or_obj", "medsup_geometry")}}
        written = ["image", "label"]
        if FG_LOCATIONS in item:
            # one (N, 4) array of (class, i, j, k) rows, the classes in the order the cache holds them
            rows = [np.concatenate([np.full((len(v), 1), c, dtype=np.int64), np.asarray(v, dtype=np.int64)], axis=1)
                    for c, v in item[FG_LOCATIONS].items()]
            with atomic_path(files["fg"]) as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.concatenate(rows) if rows else np.zeros((0, 4), dtype=np.int64))
            written.append("fg")
        meta["bytes"] = {k: files[k].stat().st_size for k in written}
        write_json(files["meta"], meta)
        return sum(meta["bytes"].values())

    @contextlib.contextmanager
    def lock(self, case_id: str) -> Iterator[None]:
        """Hold an exclusive lock on one case of the store (an advisory ``flock`` on ``.<case>.lock``, across
        processes and threads; released if the holder dies). Where ``fcntl`` is missing (Windows) no lock:
        concurrent runs then may both write a case, which the atomic writes keep safe."""
        try:
            import fcntl
        except ImportError:
            yield
            return
        with open(self.root / f".{case_id}.lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def nbytes(self, case_ids: Sequence[str]) -> int:
        """Bytes the arrays of ``case_ids`` take on disk."""
        return sum(p.stat().st_size for c in case_ids for k, p in self.paths(c).items() if k != "meta" and p.exists())


class LoadPreprocessedd(MapTransform):
    """``{"case": id}`` -> the case from a :class:`PreprocessedStore`, as the in-memory cache would hold it:
    ``image`` and ``label`` ``(1, X, Y, Z)`` MetaTensors over copy-on-write memory maps of the ``.npy`` files
    (nothing is ever written back to them), with their affine and meta, and ``fg_locations``.

    Nothing is read but the headers until something indexes the arrays: the patch crop then reads the pages
    its patch touches, from the page cache once the file was read before. Each process opens a case once and
    hands the same maps to every later sample of it (as the memory cache hands over its cached case; the crop
    copies the patch), so a sample costs no file opening, no json and no read of the foreground locations, which
    are memory-mapped too: the sampler reads the one row it draws.
    """

    def __init__(self, store: PreprocessedStore) -> None:
        super().__init__([CASE_KEY])
        self.store = store
        self._opened: dict[str, dict[Hashable, Any]] = {}  # per process: never pickled to a worker

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opened": {}}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case_id = str(d.pop(CASE_KEY))
        if case_id not in self._opened:
            self._opened[case_id] = self._open(case_id)
        d.update(self._opened[case_id])
        return d

    def _open(self, case_id: str) -> dict[Hashable, Any]:
        files = self.store.paths(case_id)
        out: dict[Hashable, Any] = {}
        try:
            meta = json.loads(files["meta"].read_text(encoding="utf-8"))
            for key in (IMAGE, LABEL):
                array = np.load(files[key], mmap_mode="c")
                out[key] = MetaTensor(torch.from_numpy(array), affine=torch.as_tensor(meta[key]["affine"]),
                                      meta=dict(meta[key]["meta"]))
            if "fg" in meta["bytes"]:
                rows = np.load(files["fg"], mmap_mode="r")
                # the rows are written class by class: one contiguous block (a view, not a copy) per class
                classes = np.asarray(rows[:, 0])
                starts = [0, *(np.flatnonzero(np.diff(classes)) + 1).tolist()]
                stops = [*starts[1:], len(classes)]
                out[FG_LOCATIONS] = {int(classes[a]): rows[a:b, 1:] for a, b in zip(starts, stops, strict=True)
                                     if b > a}
        except (OSError, ValueError, KeyError) as err:
            raise PreprocessError(f"case {case_id}: preprocessed files in {self.store.root} unreadable ({err}); "
                                  "delete the folder to preprocess again") from None
        return out


def fill_store(store: PreprocessedStore, cfg: Config, plan: Plan, cases: Sequence[Case],
               workers: int = 1) -> dict[str, Any]:
    """Preprocess into ``store`` every case of ``cases`` that is missing or stale, ``workers`` at a time
    (threads: reading, resampling and normalising run outside the GIL). A case that fails does not stop the
    others: they are stored, and the failures are reported together at the end.

    Returns ``{"cases", "written", "reused", "seconds", "bytes", "root"}`` (bytes: all of ``cases`` on disk).

    Raises:
        PreprocessError: one or more cases failed; the message names each, with its files and the reason.
    """
    head = cached_chain(cfg, plan, store.settings["kind"])
    todo = [c for c in cases if not store.is_current(c)]
    started = time.perf_counter()

    def one(case: Case) -> tuple[bool, str | None]:
        """``(written here, error)``; under the case's lock, so that runs sharing the store (folds started
        together) preprocess each case once: the others wait for it and find it current."""
        try:
            with store.lock(case.case_id):
                if store.is_current(case):
                    return False, None
                store.write(case, head({IMAGE: str(case.image), LABEL: str(case.label)}))
        except DiskFullError as err:  # every later case would fail the same way: stop
            raise PreprocessError(f"case {case.case_id}: the disk of {store.root} is full ({err})") from None
        except Exception as err:  # any other failure is this case's: report it, the batch goes on
            # MONAI wraps a transform's error in a RuntimeError naming the transform: report the cause
            cause = err.__cause__ or err
            return False, f"case {case.case_id} ({case.image}, {case.label}): {cause}"
        return True, None

    if todo:
        log.info("preprocessing %d of %d case(s) into %s (%d worker(s))", len(todo), len(cases), store.root,
                 workers)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            outcomes = list(pool.map(one, todo))
        written = sum(done for done, _ in outcomes)
        failed = [msg for _, msg in outcomes if msg is not None]
        if failed:
            raise PreprocessError(f"{len(failed)} of {len(todo)} case(s) could not be preprocessed (the others are "
                                  f"stored in {store.root}):\n  " + "\n  ".join(failed))
    else:
        written = 0
    seconds = time.perf_counter() - started
    total = store.nbytes([c.case_id for c in cases])
    log.info("preprocessed store %s: %d case(s), %d written, %d reused, %.2f GB on disk, %.1f s", store.root,
             len(cases), written, len(cases) - written, total / 1e9, seconds)
    return {"cases": len(cases), "written": written, "reused": len(cases) - written, "seconds": seconds,
            "bytes": total, "root": str(store.root)}


def preprocess_dataset(cfg: Config, data_dir: Path | str, plan: Plan, workers: int = 1) -> dict[str, Any]:
    """``medsup preprocess``: every labelled case of ``data_dir`` (each is a training case of some fold) into
    the store that ``medsup train`` with ``train.cache: disk`` and the same plan reads; see :func:`fill_store`."""
    from medsup.data.datalist import load_datalist

    cases = list(load_datalist(Path(data_dir)).labelled)
    if not cases:
        raise PreprocessError(f"{data_dir}: no labelled cases to preprocess")
    store = open_store(cfg, plan, cases, "train")
    if not (store.root / "plan.json").exists():
        plan.save(store.root / "plan.json")  # for `medsup train --plan` (the store records only what it needs)
    return fill_store(store, cfg, plan, cases, workers)


def open_store(cfg: Config, plan: Plan, cases: Sequence[Case], kind: Literal["train", "eval"]) -> PreprocessedStore:
    """The store of ``kind`` for the dataset that holds ``cases``, under ``train.cache_dir`` (or the default)."""
    return PreprocessedStore.for_dataset(cfg.train.cache_dir or default_cache_root(), dataset_root(cases),
                                         store_settings(cfg, plan, kind))


def estimated_cache_bytes(plan: Plan, cases: Sequence[Case], image_bytes: int) -> int:
    """Bytes the training cache of ``cases`` takes at the plan's spacing (image + label per voxel), from the
    image headers alone (no pixel is read): what decides between the memory and the disk cache."""
    from medsup.data.io import read_header

    per_voxel = image_bytes + np.dtype(label_dtype(plan)).itemsize
    target = float(np.prod(plan.target_spacing))
    patch = float(np.prod(plan.patch_size))
    total = 0.0
    for case in cases:
        geom = read_header(case.image).geometry
        voxels = float(np.prod(geom.shape)) * float(np.prod(geom.spacing)) / target
        total += max(voxels, patch) * per_voxel
    return int(total)


#: the memory cache may take at most this fraction of the free memory (the rest: workers, batches, the model)
MEMORY_CACHE_SHARE = 0.5


def choose_cache(cfg: Config, plan: Plan, train_cases: Sequence[Case], val_cases: Sequence[Case] = (),
                 ranks_per_node: int = 1) -> str:
    """``train.cache`` resolved: ``memory`` or ``disk``. ``auto`` keeps the caches in memory while the estimate
    (training cases at ``train.cache_dtype``, validation cases at float32) for this node's ranks (each caches
    its own share, about the same size) fits in :data:`MEMORY_CACHE_SHARE` of the free memory, else goes to
    disk (also where free memory cannot be read)."""
    if cfg.train.cache != "auto":
        return cfg.train.cache
    from medsup.device import available_memory_bytes

    image_bytes = 2 if cfg.train.cache_dtype == "float16" else 4
    per_rank = estimated_cache_bytes(plan, train_cases, image_bytes) + estimated_cache_bytes(plan, val_cases, 4)
    need = per_rank * cfg.train.cache_rate * max(1, ranks_per_node)
    free = available_memory_bytes()
    mode = "memory" if free is not None and need <= MEMORY_CACHE_SHARE * free else "disk"
    log.info("training cache: %s (train.cache auto: ~%.2f GB for %d + %d case(s) x %d rank(s), %s GB free)", mode,
             need / 1e9, len(train_cases), len(val_cases), max(1, ranks_per_node),
             "?" if free is None else f"{free / 1e9:.1f}")
    return mode


def dataset_root(cases: Sequence[Case]) -> Path:
    """The folder that holds every image and label of ``cases`` (the dataset's root for an MSD layout)."""
    paths = [str(real_path(p)) for c in cases for p in (c.image, c.label) if p is not None]
    return Path(os.path.commonpath(paths)) if paths else Path(".")
