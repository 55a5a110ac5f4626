"""Synthetic CT datasets in MSD layout: analytic phantoms (:mod:`medsup.data.phantoms`) scanned on varied grids.

Each case is a random patient (body habitus, organ shapes and HU, lesions) scanned the way clinical data
arrives: anisotropic spacing that varies per case, LPS or RAS storage, sometimes a small in-plane rotation of
the direction cosines, a random table position (origin), partial-volume blur, correlated noise, int16 HU and
sometimes -3024 padding outside the circular reconstruction field of view. Anatomy and labels are computed
in patient millimetres, so a case resampled to world space looks the same whatever its grid.

Everything is deterministic: case ``n`` of ``(task, seed)`` is generated from its own seed sequence
``(seed, task, n)``, so it does not depend on how many cases are generated or in which order.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medsup.data import phantoms
from medsup.data.geometry import Geometry
from medsup.data.io import write_image
from medsup.data.lesions import liver_tumours, lung_nodules
from medsup.data.phantoms import Phantom, Tissue
from medsup.data.solids import Canvas, Layer, Slices
from medsup.tasks import get_task

log = logging.getLogger(__name__)

GENERATOR = "medsup.data.synth"
#: HU written outside the reconstruction circle (as many scanners do)
PADDING_HU = -3024


@dataclass(frozen=True)
class _Spec:
    """How a task's cases are made. ``extent``: scanned length along z (mm); ``counts[n]``: P(n lesions)."""

    anatomy: str  # "abdomen" or "chest"
    scale: float  # every anatomical length is multiplied by this
    extent: tuple[float, float]
    diameters: tuple[float, float]
    counts: tuple[float, ...]
    labels: dict[int, int]  # tissue id -> label value
    tiny: bool = False


_LIVER_LABELS: dict[int, int] = {Tissue.LIVER: 1, Tissue.LIVER_VESSEL: 1, Tissue.TUMOUR: 2}
_SPECS = {
    "liver": _Spec("abdomen", 1.0, (190, 260), (5, 50), (0.2, 0.3, 0.2, 0.12, 0.1, 0.08), _LIVER_LABELS),
    "lung": _Spec("chest", 1.0, (230, 300), (3, 30), (0.15, 0.35, 0.25, 0.15, 0.1), {int(Tissue.NODULE): 1}),
    # the liver patient shrunk about 4.5 times: ~40^3 voxels at 2 mm, lesions still 2-8 voxels across
    "tiny": _Spec("abdomen", 0.22, (60, 80), (5, 16), (0.2, 0.4, 0.25, 0.15), _LIVER_LABELS, tiny=True),
}
_COMMON_SLICES = (1.5, 2.0, 2.5, 3.0, 5.0)


@dataclass(frozen=True)
class Case:
    """One synthetic scan.

    Attributes:
        image: ``(I, J, K)`` int16 HU.
        label: ``(I, J, K)`` uint8 label map (values from the task's label table).
        geometry: grid of both arrays.
        lesions: what was placed: kind, centre (world LPS mm) and diameter (mm) of each lesion.
    """

    image: np.ndarray
    label: np.ndarray
    geometry: Geometry
    lesions: tuple[dict[str, Any], ...]


class _Grid:
    """Patient-mm coordinates of a scan grid whose k axis runs along the patient's z axis."""

    def __init__(self, geometry: Geometry, to_world: np.ndarray) -> None:
        self.shape = geometry.shape
        d, sp = geometry.direction_matrix, np.asarray(geometry.spacing)
        o = np.asarray(geometry.origin) - to_world  # patient position of voxel (0, 0, 0)
        self.m2 = d[:2, :2] * sp[None, :2]  # in-plane index -> mm
        self.m2_inv = np.linalg.inv(self.m2)
        self.o, self.dz = o, float(d[2, 2] * sp[2])
        i = np.arange(self.shape[0], dtype=np.float64)[:, None]
        j = np.arange(self.shape[1], dtype=np.float64)[None, :]
        self.x = (o[0] + self.m2[0, 0] * i + self.m2[0, 1] * j).astype(np.float32)[:, :, None]
        self.y = (o[1] + self.m2[1, 0] * i + self.m2[1, 1] * j).astype(np.float32)[:, :, None]
        self.z = (o[2] + self.dz * np.arange(self.shape[2])).astype(np.float32)[None, None, :]

    def locate(self, lo: np.ndarray, hi: np.ndarray, k0: int, k1: int) -> Slices | None:
        """Index slices of slab ``k0:k1`` (relative to it) covering the patient box ``lo``..``hi``."""
        corners = np.array([[lo[0], lo[1]], [lo[0], hi[1]], [hi[0], lo[1]], [hi[0], hi[1]]]) - self.o[:2]
        ij = corners @ self.m2_inv.T
        ks = sorted(((lo[2] - self.o[2]) / self.dz, (hi[2] - self.o[2]) / self.dz))
        out = []
        for a, b, n, start in ((ij[:, 0].min(), ij[:, 0].max(), self.shape[0], 0),
                               (ij[:, 1].min(), ij[:, 1].max(), self.shape[1], 0), (ks[0], ks[1], k1, k0)):
            first, last = max(math.floor(a), start), min(math.ceil(b) + 1, n)
            if first >= last:
                return None
            out.append(slice(first - start, last - start))
        return out[0], out[1], out[2]


class _SmoothNoise:
    """Unit-variance smooth random field on a grid: a coarse random lattice (cell ~``cell_mm``) interpolated
    by cubic B-splines. Separable, so any slab costs three small matrix products and slabs agree."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...],
                 cell_mm: float) -> None:
        self.w = [_bspline_weights(n, max(cell_mm / s, 1.0)) for n, s in zip(shape, spacing, strict=True)]
        self.lattice = rng.standard_normal(tuple(w.shape[1] for w in self.w), dtype=np.float32)

    def slab(self, k0: int, k1: int) -> np.ndarray:
        wi, wj, wk = self.w
        t = np.tensordot(wi, self.lattice, axes=(1, 0))  # (I, Lj, Lk)
        t = np.tensordot(t, wj, axes=(1, 1))  # (I, Lk, J)
        return np.tensordot(t, wk[k0:k1], axes=(1, 1))  # (I, J, K)


def _bspline_weights(n: int, cell: float) -> np.ndarray:
    """(n, L) cubic B-spline weights from lattice nodes to samples; rows scaled to unit sum of squares, so
    interpolated white noise keeps unit variance."""
    nodes = math.ceil((n - 1) / cell) + 4
    d = np.abs(np.arange(n)[:, None] / cell + 1.5 - np.arange(nodes)[None, :])
    w = np.where(d < 1, 2 / 3 - d**2 + d**3 / 2, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))
    return (w / np.sqrt((w**2).sum(axis=1, keepdims=True))).astype(np.float32)


def _gauss_norm(sigma: float) -> float:
    """Standard deviation left when unit white noise is smoothed by scipy's 1-D Gaussian of ``sigma``."""
    if sigma <= 0:
        return 1.0
    r = int(4.0 * sigma + 0.5)
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return float(np.sqrt(((w / w.sum()) ** 2).sum()))


def _seeds(task: str, index: int, seed: int) -> list[np.random.SeedSequence]:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and case index must be non-negative, got seed={seed}, index={index}")
    # crc32, not hash(): stable across processes, so task names give stable streams
    return np.random.SeedSequence([seed, zlib.crc32(task.encode()), index]).spawn(4)


def _scan(rng: np.random.Generator, phantom: Phantom, spec: _Spec, full_size: bool, voxel_mm: float,
          ras: bool) -> tuple[Geometry, np.ndarray, bool]:
    """Sample the scan grid; returns its geometry, the patient->world shift and whether to pad outside the
    reconstruction circle."""
    s = spec.scale
    offset = np.clip(rng.normal(0, 6 * s, 2), -12 * s, 12 * s)  # patient not exactly in the centre
    fov = 2 * (phantom.half_width * 1.08 + 12 * s + rng.uniform(3, 35) * s)
    if full_size:
        n = 512
        pixel = float(np.clip(fov / n, 0.6, 1.0))
    else:
        lo, hi = (28, 44) if spec.tiny else (round(280 / voxel_mm), round(440 / voxel_mm))
        n = int(np.clip(round(fov / (voxel_mm * rng.uniform(0.85, 1.2))), lo, hi))
        pixel = fov / n
    if spec.tiny and not full_size:
        dz = voxel_mm * rng.uniform(0.8, 1.25)
    else:
        dz = float(rng.choice(_COMMON_SLICES)) if rng.uniform() < 0.5 else round(rng.uniform(1.5, 5.0), 1)
        if not full_size:
            dz = max(dz, 0.75 * voxel_mm)  # coarse previews get coarse slices too
    k = round(rng.uniform(*spec.extent) / dz)
    k = int(np.clip(k, 24, 44)) if spec.tiny and not full_size else max(k, 8)
    zc = 0.5 * (phantom.roi_lo[2] + phantom.roi_hi[2]) + rng.normal(0, 0.05 * k * dz)
    angle = math.radians(rng.uniform(-8, 8)) if rng.uniform() < 0.35 else 0.0
    c, si, f = math.cos(angle), math.sin(angle), -1.0 if ras else 1.0
    direction = np.array([[c * f, -si * f, 0], [si * f, c * f, 0], [0, 0, 1]])
    spacing = np.array([pixel, pixel, dz])
    shape = (n, n, k)
    to_world = np.array([rng.uniform(-20, 20), rng.uniform(-60, 60), rng.uniform(-1200, 100)])
    centre = np.array([offset[0], offset[1], zc]) + to_world
    origin = centre - direction @ (spacing * (np.array(shape) - 1) / 2)
    geometry = Geometry(shape=shape, spacing=(float(pixel), float(pixel), float(dz)),
                        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
                        direction=tuple(float(v) for v in direction.ravel()))
    return geometry, to_world, bool(rng.uniform() < 0.5)


def generate_case(task: str, index: int, seed: int = 0, full_size: bool = False,
                  voxel_mm: float = 2.0) -> Case:
    """Generate case ``index`` of ``task`` for ``seed`` (deterministic; independent of other cases).

    ``voxel_mm`` is the approximate in-plane voxel of default-size cases (slices stay 1.5-5 mm but never
    thinner than ``0.75 * voxel_mm``); ``full_size`` gives clinical 512 x 512 grids of 0.6-1.0 mm.
    Returns a :class:`Case` with ``(I, J, K)`` int16 image and uint8 label on the same geometry.
    """
    get_task(task)
    if task not in _SPECS:
        raise ValueError(f"no synthetic generator for task {task!r}; available: {', '.join(sorted(_SPECS))}")
    if not voxel_mm > 0:
        raise ValueError(f"voxel_mm must be positive, got {voxel_mm}")
    spec = _SPECS[task]
    anatomy_seq, scan_seq, tex_seq, noise_seq = _seeds(task, index, seed)
    anatomy_rng, scan_rng = np.random.default_rng(anatomy_seq), np.random.default_rng(scan_seq)
    build = phantoms.abdomen if spec.anatomy == "abdomen" else phantoms.chest
    phantom = build(anatomy_rng, spec.scale)
    # alternate the storage orientation so any two consecutive cases include one LPS and one RAS file
    geometry, to_world, pad = _scan(scan_rng, phantom, spec, full_size, voxel_mm, ras=(index + seed) % 2 == 1)
    grid = _Grid(geometry, to_world)
    z = grid.z.ravel()
    zlo, zhi = float(z.min()), float(z.max())
    if spec.anatomy == "abdomen":
        phantom.lesions = liver_tumours(anatomy_rng, phantom, zlo, zhi, spec.diameters, spec.counts)
    else:
        phantom.lesions = lung_nodules(anatomy_rng, phantom, zlo, zhi, spec.diameters, spec.counts)
    image, label = _image(phantom, spec, geometry, grid, np.random.default_rng(tex_seq), noise_seq,
                          scan_rng, pad, slab=48 if full_size else geometry.shape[2])
    lesions = tuple({"kind": les.kind, "center_mm": [round(float(v), 2) for v in les.center + to_world],
                     "diameter_mm": round(les.diameter, 2)} for les in phantom.lesions)
    return Case(image, label, geometry, lesions)


def paint(layers: list[Layer], grid: _Grid, k0: int, k1: int, tex: _SmoothNoise | None = None,
          grain: _SmoothNoise | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``layers`` on slices ``k0:k1`` of ``grid``: noise-free HU (float32) and tissue ids (uint8), both
    ``(I, J, k1 - k0)``; air (-1000 HU, tissue 0) where nothing is painted."""
    hu = np.full((grid.shape[0], grid.shape[1], k1 - k0), -1000.0, dtype=np.float32)
    tissue = np.zeros(hu.shape, dtype=np.uint8)
    canvas = Canvas(hu, tissue, grid.x, grid.y, grid.z[:, :, k0:k1],
                             locate=functools.partial(grid.locate, k0=k0, k1=k1),
                             tex=None if tex is None else tex.slab(k0, k1),
                             grain=None if grain is None else grain.slab(k0, k1))
    for layer in layers:
        canvas.paint(layer)
    return hu, tissue


def _image(phantom: Phantom, spec: _Spec, geometry: Geometry, grid: _Grid, tex_rng: np.random.Generator,
           noise_seq: np.random.SeedSequence, rng: np.random.Generator, pad: bool,
           slab: int) -> tuple[np.ndarray, np.ndarray]:
    """Paint, blur (partial volume), add correlated noise and quantise, slab by slab along k."""
    shape, spacing = geometry.shape, geometry.spacing
    tex = _SmoothNoise(tex_rng, shape, spacing, cell_mm=8.0 * max(spec.scale, 0.5))
    grain = _SmoothNoise(tex_rng, shape, spacing, cell_mm=3.0)
    # partial volume: the voxel's own extent (box ~ 0.3 voxel sd) plus a ~0.7 mm scanner PSF
    blur = tuple(math.sqrt(0.09 + (0.7 / s) ** 2) for s in spacing)
    noise_sd = rng.uniform(10, 25)
    grain_vox = 0.8 / spacing[0]  # CT noise is correlated in-plane over about a millimetre
    noise_gain = noise_sd / _gauss_norm(grain_vox) ** 2
    lut = np.zeros(256, dtype=np.uint8)
    for tissue_id, value in spec.labels.items():
        lut[tissue_id] = value
    layers = phantom.all_layers()
    image = np.empty(shape, dtype=np.int16)
    label = np.empty(shape, dtype=np.uint8)
    halo = math.ceil(3 * blur[2]) + 1
    children = noise_seq.spawn(math.ceil(shape[2] / slab))
    for n, k0 in enumerate(range(0, shape[2], slab)):
        k1 = min(k0 + slab, shape[2])
        e0, e1 = max(k0 - halo, 0), min(k1 + halo, shape[2])
        hu, tissue = paint(layers, grid, e0, e1, tex, grain)
        inner = slice(k0 - e0, k1 - e0)
        out = ndimage.gaussian_filter(hu, blur, mode="nearest", truncate=3.0)[:, :, inner]
        noise = np.random.default_rng(children[n]).standard_normal(out.shape, dtype=np.float32)
        noise = ndimage.gaussian_filter(noise, (grain_vox, grain_vox, 0.0))
        out += noise * np.float32(noise_gain)
        np.rint(out, out=out)
        image[:, :, k0:k1] = np.clip(out, -1024, 3071)
        label[:, :, k0:k1] = lut[tissue[:, :, inner]]
    if pad:
        i = np.arange(shape[0])[:, None] - (shape[0] - 1) / 2
        j = np.arange(shape[1])[None, :] - (shape[1] - 1) / 2
        image[(i * i + j * j) > (min(shape[:2]) / 2) ** 2] = PADDING_HU
    return image, label


def _prepare(root: Path) -> set[Path]:
    """Check ``root`` may be written; return the case files of an earlier synthetic dataset there."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder")
    meta = root / "dataset.json"
    if not meta.exists():
        return set()
    try:
        ours = json.loads(meta.read_text(encoding="utf-8")).get("synthetic", {}).get("generator") == GENERATOR
    except (json.JSONDecodeError, AttributeError, OSError):
        ours = False
    if not ours:
        raise FileExistsError(f"{root} holds a dataset.json not written by {GENERATOR}; refusing to overwrite "
                              "it: choose another output folder")
    return {p for sub in ("imagesTr", "labelsTr", "imagesTs") for p in (root / sub).glob("*.nii.gz")}


def synthesize(task: str, cases: int, out: Path | str, seed: int = 0, full_size: bool = False,
               test_cases: int = 2, voxel_mm: float = 2.0) -> Path:
    """Write an MSD-layout dataset to `out` and return `out` as a Path.

    ``out/imagesTr/<task>_NNN.nii.gz`` (int16 HU) with ``out/labelsTr/<task>_NNN.nii.gz`` (uint8, same
    geometry) for ``cases`` training cases, ``out/imagesTs/`` for ``test_cases`` more (numbering continues),
    and ``out/dataset.json``. An earlier synthetic dataset in ``out`` is replaced (its stale case files
    removed); a folder holding any other ``dataset.json`` is refused.

    Raises:
        ValueError: unknown task, ``cases < 1``, ``test_cases < 0``, negative seed or non-positive voxel.
        FileExistsError: ``out`` holds a dataset this generator did not write.
    """
    info = get_task(task)
    if task not in _SPECS:
        raise ValueError(f"no synthetic generator for task {task!r}; available: {', '.join(sorted(_SPECS))}")
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    if test_cases < 0:
        raise ValueError(f"test_cases must be non-negative, got {test_cases}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not voxel_mm > 0:
        raise ValueError(f"voxel_mm must be positive, got {voxel_mm}")
    root = Path(out)
    stale = _prepare(root)
    width = max(3, len(str(cases + test_cases - 1)))
    training, test, lesions, written = [], [], {}, set()
    for n in range(cases + test_cases):
        case = generate_case(task, n, seed=seed, full_size=full_size, voxel_mm=voxel_mm)
        cid = f"{task}_{n:0{width}d}"
        folder = "imagesTr" if n < cases else "imagesTs"
        written.add(write_image(root / folder / f"{cid}.nii.gz", case.image, case.geometry))
        if n < cases:
            written.add(write_image(root / "labelsTr" / f"{cid}.nii.gz", case.label, case.geometry))
            training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        else:
            test.append(f"./imagesTs/{cid}.nii.gz")
        lesions[cid] = list(case.lesions)
        g = case.geometry
        log.info("%s: %s voxels, spacing %s mm, %s, %d lesion(s)", cid, "x".join(map(str, g.shape)),
                 "x".join(f"{s:.2f}" for s in g.spacing), g.orientation, len(case.lesions))
    for path in stale - written:
        path.unlink(missing_ok=True)
    if stale - written:
        log.info("removed %d case files of the previous synthetic dataset in %s", len(stale - written), root)
    meta = {
        "name": f"medsup-synthetic-{task}",
        "description": f"Synthetic CT phantoms: {info.description}",
        "tensorImageSize": "3D",
        "reference": GENERATOR,
        "licence": "CC0",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in sorted(info.labels.items())},
        "numTraining": cases,
        "numTest": test_cases,
        "training": training,
        "test": test,
        "synthetic": {"seed": seed, "generator": GENERATOR, "full_size": full_size, "voxel_mm": voxel_mm,
                      "lesions": lesions},
    }
    _write_text(root / "dataset.json", json.dumps(meta, indent=2) + "\n")
    log.info("wrote %d training and %d test cases of %r to %s", cases, test_cases, task, root)
    return root


def _write_text(path: Path, text: str) -> None:
    """Atomic text write: a crash never leaves a half-written dataset.json."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
