"""Lesions placed in a :class:`~medsup.data.phantoms.Phantom`: liver tumours and lung nodules.

A lesion's centre is drawn until the painted anatomy around it (probed with
:func:`~medsup.data.solids.tissue_at`) is its organ: wholly inside, or touching the organ's edge; lesions do
not overlap. Each lesion is a list of layers painted after the anatomy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from medsup.data.phantoms import Lesion, Phantom, T
from medsup.data.solids import Layer, Solid, blob, ellipsoid, rotation, tissue_at

#: probe directions (unit): 6 axes and 8 diagonals, to test a lesion's surroundings
_DIRS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]
                 + [[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
_DIRS /= np.linalg.norm(_DIRS, axis=1, keepdims=True)


def _place(rng: np.random.Generator, phantom: Phantom, lo: np.ndarray, hi: np.ndarray, radius: float,
           organ: tuple[int, ...], border: bool, taken: list[tuple[np.ndarray, float]]) -> np.ndarray | None:
    """A lesion centre in ``organ`` within ``lo``..``hi``: wholly inside it, or (``border``) touching its edge.

    Candidates are checked against the painted anatomy itself (:func:`tissue_at`), so a centre is never in a
    vessel, the gallbladder or the spine, whatever the organ's shape.
    """
    for _ in range(12):
        cand = rng.uniform(lo, hi, size=(64, 3))
        probes = cand[:, None, :] + _DIRS[None] * (0.8 * radius)
        pts = np.concatenate([cand[:, None, :], probes], axis=1).reshape(-1, 3)
        t = np.isin(tissue_at(phantom.layers, pts), organ).reshape(len(cand), -1)
        frac = t[:, 1:].mean(axis=1)
        ok = t[:, 0] & ((frac >= 0.5) & (frac < 1.0) if border else frac == 1.0)
        for n in np.nonzero(ok)[0]:
            if all(np.linalg.norm(cand[n] - c) > radius + r for c, r in taken):
                return cand[n]
    return None


def _draw(rng: np.random.Generator, phantom: Phantom, lo: np.ndarray, hi: np.ndarray,
          diameters: tuple[float, float], organ: tuple[int, ...], border_prob: float,
          taken: list[tuple[np.ndarray, float]]) -> tuple[np.ndarray, float] | None:
    """One lesion's centre and diameter (log-uniform in ``diameters``), touching the organ's edge with
    probability ``border_prob``; recorded in ``taken``. None when no place was found."""
    diam = float(math.exp(rng.uniform(math.log(diameters[0]), math.log(diameters[1]))))
    c = _place(rng, phantom, lo, hi, diam / 2, organ, border=rng.uniform() < border_prob, taken=taken)
    if c is not None:
        taken.append((c, diam / 2))
    return None if c is None else (c, diam)


def _lesion_blob(rng: np.random.Generator, center: np.ndarray, radius: float, wobble: float) -> Solid:
    radii = radius * rng.uniform(0.8, 1.2, 3)
    return blob(rng, [(center, radii, rotation(*rng.uniform(-90, 90, 3)))], wobble, wavelength=3 * radius)


def liver_tumours(rng: np.random.Generator, phantom: Phantom, zlo: float, zhi: float,
                  diameters: tuple[float, float], counts: Sequence[float]) -> list[Lesion]:
    """0..len(counts)-1 hypodense tumours (20-60 HU below liver) inside the liver, within ``zlo``..``zhi``.

    ``counts[n]`` is the probability of ``n`` tumours; diameters are log-uniform in ``diameters`` (mm).
    Large ones may have a necrotic core or an enhancing rim. All are painted only over liver tissue.
    """
    lo, hi = phantom.roi_lo.copy(), phantom.roi_hi.copy()
    lo[2], hi[2] = max(lo[2], zlo), min(hi[2], zhi)
    n = int(rng.choice(len(counts), p=np.asarray(counts) / sum(counts)))
    liver_hu = phantom.hu["liver"]
    lesions: list[Lesion] = []
    taken: list[tuple[np.ndarray, float]] = []
    organ = (T.LIVER, T.LIVER_VESSEL)
    for _ in range(n):
        placed = _draw(rng, phantom, lo, hi, diameters, organ, 0.2, taken)
        if placed is None:
            continue
        c, diam = placed
        tumour_hu = liver_hu - rng.uniform(20, 60)
        where = (T.LIVER, T.LIVER_VESSEL, T.TUMOUR)
        layers = [Layer(T.TUMOUR, _lesion_blob(rng, c, diam / 2, 0.12), tumour_hu, 8.0, 0.0, where)]
        if diam > 20 and rng.uniform() < 0.5:  # necrotic core
            core = _lesion_blob(rng, c, diam * rng.uniform(0.15, 0.3), 0.15)
            layers.append(Layer(T.TUMOUR, core, tumour_hu - rng.uniform(15, 35), 6.0, 0.0, (T.TUMOUR,)))
        elif diam > 12 and rng.uniform() < 0.3:  # enhancing rim: paint the rim colour, then the inner part
            layers[0].hu = tumour_hu + rng.uniform(20, 40)
            layers.append(Layer(T.TUMOUR, ellipsoid(c, np.full(3, diam * 0.38)), tumour_hu, 8.0, 0.0, (T.TUMOUR,)))
        lesions.append(Lesion("tumour", c, diam, layers))
    return lesions


def lung_nodules(rng: np.random.Generator, phantom: Phantom, zlo: float, zhi: float,
                 diameters: tuple[float, float] = (3.0, 30.0),
                 counts: Sequence[float] = (0.15, 0.35, 0.25, 0.15, 0.1)) -> list[Lesion]:
    """0-4 nodules in the lungs: solid (0-60 HU), part-solid (ground-glass ~-500 HU with a solid core) or
    pure ground-glass; about a third touch the pleura. Painted only over lung tissue."""
    lo, hi = phantom.roi_lo.copy(), phantom.roi_hi.copy()
    lo[2], hi[2] = max(lo[2], zlo), min(hi[2], zhi)
    n = int(rng.choice(len(counts), p=np.asarray(counts) / sum(counts)))
    lesions: list[Lesion] = []
    taken: list[tuple[np.ndarray, float]] = []
    organ = (T.LUNG, T.LUNG_VESSEL)
    where = (T.LUNG, T.LUNG_VESSEL, T.NODULE)
    for _ in range(n):
        placed = _draw(rng, phantom, lo, hi, diameters, organ, 0.35, taken)
        if placed is None:
            continue
        c, diam = placed
        kind = str(rng.choice(["solid", "part-solid", "ground-glass"], p=[0.6, 0.25, 0.15]))
        spiky = 0.25 if rng.uniform() < 0.3 else 0.1
        solid_hu = rng.uniform(0, 60)
        if kind == "solid":
            layers = [Layer(T.NODULE, _lesion_blob(rng, c, diam / 2, spiky), solid_hu, 10.0, 0.0, where)]
        else:
            layers = [Layer(T.NODULE, _lesion_blob(rng, c, diam / 2, 0.1), rng.uniform(-600, -400), 25.0,
                            20.0, where)]
            if kind == "part-solid":
                core = _lesion_blob(rng, c, diam / 2 * rng.uniform(0.3, 0.6), spiky)
                layers.append(Layer(T.NODULE, core, solid_hu, 10.0, 0.0, (T.NODULE,)))
        lesions.append(Lesion(kind, c, diam, layers))
    return lesions
