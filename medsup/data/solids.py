"""Implicit solids in patient millimetres, and painting them onto a grid (the geometry of :mod:`medsup.data.phantoms`).

A :class:`Solid` is a boolean function of position with a bounding box; a :class:`Layer` paints a tissue id
and an HU value (plus texture) inside one. A :class:`Canvas` paints layers in order onto HU and tissue
arrays (later layers win), touching only each solid's box; :func:`tissue_at` answers the same question for
points. Solids are functions of position in the *patient* frame, never of voxel indices, so one phantom
scanned on any grid (spacing, orientation, rotation, origin) gives images and labels that agree in world
space.

Patient frame: millimetres on LPS axes (x toward the patient's Left, y Posterior, z Superior), origin on the
body axis. Solid functions take three arrays ``x, y, z`` that broadcast together: on a scan slab ``x`` and
``y`` are ``(I, J, 1)`` and ``z`` is ``(1, 1, K)``, so the in-plane part of every formula is evaluated once
per slab rather than once per voxel; for point queries (:func:`tissue_at`) all three are ``(N,)``.
Arithmetic stays in float32: constants are plain Python floats so that NumPy does not promote.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

Fn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Fn2 = Callable[[np.ndarray, np.ndarray], np.ndarray]
Slices = tuple[slice, slice, slice]
BIG = 1e6  # "unbounded" extent of a box, mm


@dataclass(frozen=True)
class Solid:
    """A solid: ``inside(x, y, z)`` is True inside it; it lies within the box ``lo``..``hi`` (mm)."""

    inside: Fn
    lo: np.ndarray
    hi: np.ndarray

    def clipped(self, axis: int, lo: float = -BIG, hi: float = BIG) -> Solid:
        """The part of this solid with ``lo <= coordinate[axis] < hi`` (e.g. the gas above a fluid level)."""

        def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            c = (x, y, z)[axis]
            return self.inside(x, y, z) & (c >= lo) & (c < hi)

        new_lo, new_hi = self.lo.copy(), self.hi.copy()
        new_lo[axis], new_hi[axis] = max(new_lo[axis], lo), min(new_hi[axis], hi)
        return Solid(inside, new_lo, new_hi)


@dataclass
class Layer:
    """One painting step: set ``tissue`` and HU ``hu (+ tex * coarse + grain * fine texture)`` in ``solid``.

    ``inside`` restricts painting to voxels whose current tissue is one of these (e.g. tumours only in liver).
    """

    tissue: int
    solid: Solid
    hu: float | Fn
    tex: float = 0.0
    grain: float = 0.0
    inside: tuple[int, ...] | None = None
    allowed: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.inside is not None:
            self.allowed = np.zeros(256, dtype=bool)
            self.allowed[list(self.inside)] = True


# --------------------------------------------------------------------------------------------- solids


def _box(center: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(center, float) - half, np.asarray(center, float) + half


def rotation(rz: float = 0.0, ry: float = 0.0, rx: float = 0.0) -> np.ndarray:
    """(3, 3) rotation from angles in degrees (about z, then y, then x); columns are the rotated axes."""
    a, b, c = (math.radians(v) for v in (rz, ry, rx))
    z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    y = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    x = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return z @ y @ x


def blob(rng: np.random.Generator, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
         wobble: float = 0.0, wavelength: float = 80.0) -> Solid:
    """Smooth union of ellipsoids ``(center, radii, rotation)`` with a low-frequency surface deformation.

    The surface is displaced by three random plane waves of about ``wavelength`` mm whose amplitudes add up
    to at most ~``2 * wobble`` of the radius, which turns ellipsoids into irregular organ-like blobs.
    """
    cs = [[float(v) for v in np.asarray(c)] for c, _, _ in parts]
    rs = [[float(v) for v in np.asarray(r)] for _, r, _ in parts]
    rots = [np.asarray(m, float) for _, _, m in parts]
    waves: list[tuple[float, float, float, float, float]] = []
    if wobble > 0:
        for _ in range(3):
            k = rng.normal(size=3)
            k *= 2 * math.pi / wavelength * rng.uniform(0.7, 1.3) / np.linalg.norm(k)
            waves.append((float(k[0]), float(k[1]), float(k[2]), float(rng.uniform(0, 2 * math.pi)),
                          float(wobble * rng.uniform(0.3, 0.7))))
    # the smooth union reaches up to ~4% beyond the lobes where two surfaces meet
    grow = (1.0 + sum(w[4] for w in waves)) * (1.04 if len(parts) > 1 else 1.0)

    def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        q2: np.ndarray | None = None
        for c, r, m in zip(cs, rs, rots, strict=True):
            dx, dy, dz = x - c[0], y - c[1], z - c[2]
            acc: np.ndarray | None = None
            for a in range(3):
                u = (float(m[0, a]) * dx + float(m[1, a]) * dy) + float(m[2, a]) * dz
                term = (u * (1.0 / r[a])) ** 2
                acc = term if acc is None else acc + term
            assert acc is not None
            # polynomial smooth minimum: the lobes merge without a crease
            q2 = acc if q2 is None else np.minimum(q2, acc) - np.maximum(0.3 - abs(q2 - acc), 0.0) ** 2 * (1 / 1.2)
        assert q2 is not None
        if not waves:
            return q2 < 1.0
        dx, dy, dz = x - cs[0][0], y - cs[0][1], z - cs[0][2]
        d: np.ndarray | float = 1.0
        for kx, ky, kz, ph, amp in waves:
            d = d + amp * np.sin((kx * dx + ky * dy + ph) + kz * dz)
        return q2 < d * d

    his = []
    for c, r, m in zip(cs, rs, rots, strict=True):
        half = np.sqrt(((m * np.asarray(r)[None, :]) ** 2).sum(axis=1)) * grow
        his.append(_box(np.asarray(c), half))
    lo = np.min([b[0] for b in his], axis=0)
    hi = np.max([b[1] for b in his], axis=0)
    return Solid(inside, lo, hi)


def ellipsoid(center: np.ndarray, radii: np.ndarray, rot: np.ndarray | None = None) -> Solid:
    """A plain ellipsoid (no deformation)."""
    return blob(np.random.default_rng(0), [(center, radii, np.eye(3) if rot is None else rot)])


def capsule(p0: np.ndarray, p1: np.ndarray, r0: float, r1: float | None = None) -> Solid:
    """Segment ``p0``-``p1`` swept by a sphere whose radius goes linearly from ``r0`` to ``r1``: a tube piece."""
    r1 = r0 if r1 is None else r1
    a = [float(v) for v in p0]
    d = [float(v) for v in np.asarray(p1, float) - np.asarray(p0, float)]
    inv_len2 = 1.0 / max(d[0] ** 2 + d[1] ** 2 + d[2] ** 2, 1e-9)
    ra, dr = float(r0), float(r1 - r0)

    def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        wx, wy, wz = x - a[0], y - a[1], z - a[2]
        t = np.clip(((wx * d[0] + wy * d[1]) + wz * d[2]) * inv_len2, 0.0, 1.0)
        e2 = (wx - t * d[0]) ** 2 + (wy - t * d[1]) ** 2 + (wz - t * d[2]) ** 2
        r = ra + t * dr
        return e2 < r * r

    rmax = max(r0, r1)
    lo = np.minimum(p0, p1) - rmax
    hi = np.maximum(p0, p1) + rmax
    return Solid(inside, lo, hi)


def tube(points: Sequence[np.ndarray], radii: Sequence[float]) -> list[Solid]:
    """A tube through ``points`` as consecutive capsules (one solid each, so each gets a tight box)."""
    return [capsule(points[n], points[n + 1], radii[n], radii[n + 1]) for n in range(len(points) - 1)]


def ellipse2(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> Fn2:
    """In-plane ellipse (angle in degrees) as a function of (x, y) -> bool."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = x - cx, y - cy
        return ((c * dx + s * dy) * (1 / rx)) ** 2 + ((c * dy - s * dx) * (1 / ry)) ** 2 < 1.0

    return inside


def segment2(p0: tuple[float, float], p1: tuple[float, float], r: float) -> Fn2:
    """In-plane capsule of radius ``r`` around the segment ``p0``-``p1``."""
    (ax, ay), dx, dy = p0, p1[0] - p0[0], p1[1] - p0[1]
    inv = 1.0 / max(dx * dx + dy * dy, 1e-9)

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        wx, wy = x - ax, y - ay
        t = np.clip((wx * dx + wy * dy) * inv, 0.0, 1.0)
        return (wx - t * dx) ** 2 + (wy - t * dy) ** 2 < r * r

    return inside


def extrude(section: Fn2, lo2: tuple[float, float], hi2: tuple[float, float], zlo: float = -BIG,
            zhi: float = BIG, z_on: Callable[[np.ndarray], np.ndarray] | None = None) -> Solid:
    """A cross-section swept along z between ``zlo`` and ``zhi``; ``z_on(z)`` may switch it off (discs)."""

    def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        m = section(x, y)
        zm = (z >= zlo) & (z < zhi)
        if z_on is not None:
            zm = zm & z_on(z)
        return m & zm

    return Solid(inside, np.array([lo2[0], lo2[1], zlo]), np.array([hi2[0], hi2[1], zhi]))


def periodic(z0: float, period: float, start: float, stop: float) -> Callable[[np.ndarray], np.ndarray]:
    """z -> bool: True where ``(z - z0) mod period`` lies in ``[start, stop) * period`` (vertebrae, discs)."""

    def on(z: np.ndarray) -> np.ndarray:
        phase = np.mod(z - z0, period) * (1 / period)
        return (phase >= start) & (phase < stop)

    return on


@dataclass(frozen=True)
class Outline:
    """Irregular super-elliptic body cross-section whose size breathes slowly along z.

    Inside where ``q(x, y) / f(phi) < g(z)``: ``q`` the super-elliptic radius (exponent ``power``), ``f`` a
    few low-order harmonics of the polar angle, ``g`` a slow sine along z.
    """

    cx: float
    cy: float
    a: float
    b: float
    power: float
    harmonics: tuple[tuple[int, float, float], ...]  # (order, relative amplitude, phase)
    zwave: tuple[float, float, float]  # (relative amplitude, wavelength mm, phase)

    def shrunk(self, mm: float) -> Outline:
        """The outline moved inward by about ``mm`` (fat, muscle layers)."""
        return Outline(self.cx, self.cy, self.a - mm, self.b - mm, self.power, self.harmonics, self.zwave)

    def radius(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ex, ey = (x - self.cx) * (1 / self.a), (y - self.cy) * (1 / self.b)
        q = (np.abs(ex) ** self.power + np.abs(ey) ** self.power) ** (1 / self.power)
        phi = np.arctan2(ey, ex)
        f: np.ndarray | float = 1.0
        for order, amp, ph in self.harmonics:
            f = f + amp * np.cos(order * phi + ph)
        return q / f

    def solid(self, zlo: float = -BIG, zhi: float = BIG) -> Solid:
        amp, wavelength, ph = self.zwave

        def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            g = 1.0 + amp * np.sin(z * (2 * math.pi / wavelength) + ph)
            return (self.radius(x, y) < g) & (z >= zlo) & (z < zhi)

        grow = (1 + amp) * (1 + sum(abs(h[1]) for h in self.harmonics)) * 1.05
        return Solid(inside, np.array([self.cx - self.a * grow, self.cy - self.b * grow, zlo]),
                     np.array([self.cx + self.a * grow, self.cy + self.b * grow, zhi]))


def ribs(ra: float, rb: float, width: float, z_top: float, pitch: float, thick: float, slope: float,
         psi0: float, psi_end: np.ndarray) -> tuple[Solid, Fn]:
    """Ribs as slanted bands on an elliptic ring of half-axes ``ra``, ``rb`` centred on the body axis.

    Rib ``n`` leaves the spine at angle ``psi0`` (radians from the posterior midline), runs around the ring
    dropping ``slope`` mm per mm of arc (ribs descend anteriorly), ``pitch`` mm below rib ``n - 1``, and ends
    at ``psi_end[n]`` (floating ribs end early). Returns the solid and its HU offset (cortical shell).
    """
    count, mean_r = len(psi_end), 0.5 * (ra + rb)
    ends = [float(v) for v in psi_end]
    half_w, half_t = width / 2, thick / 2

    def geometry(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ex, ey = x * (1 / ra), y * (1 / rb)
        radial = (np.sqrt(ex * ex + ey * ey) - 1.0) * mean_r
        psi = np.arctan2(np.abs(ex), ey)  # 0 at the back, pi at the front
        return radial, psi

    def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        radial, psi = geometry(x, y)
        # ribs sag a little between the spine and the side, and rise again toward the front
        s = (z_top - z) - (psi * (slope * mean_r) + (0.06 * mean_r) * np.sin(psi * 1.4))
        n = np.floor(s * (1 / pitch))
        phase = s - n * pitch
        n_idx = np.clip(n, 0, count - 1).astype(np.intp)
        end = np.asarray(ends, dtype=np.float32)[n_idx]
        # elliptic cross-section (radial x along z), so cut ends are rounded, not square
        ellipse = (radial * (1 / half_w)) ** 2 + ((phase - half_t) * (1 / half_t)) ** 2 < 1.0
        return ellipse & (psi > psi0) & (n >= 0) & (n < count) & (psi < end)

    def hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        radial, _ = geometry(x, y)
        return 300.0 + np.float32(350.0) * (np.abs(radial) > half_w - 1.5)

    drop = slope * mean_r * math.pi + pitch * count + thick
    lo = np.array([-ra - width, -rb - width, z_top - drop])
    hi = np.array([ra + width, rb + width, z_top + thick])
    return Solid(inside, lo, hi), hu


def vessel_tree(rng: np.random.Generator, root: np.ndarray, direction: np.ndarray, radius: float,
                length: float, depth: int, spread: float = 35.0) -> list[Solid]:
    """A branching tube: each segment forks into two thinner, shorter children ``depth`` times."""
    solids: list[Solid] = []
    stack = [(np.asarray(root, float), np.asarray(direction, float), radius, length, depth)]
    while stack:
        p, d, r, ln, n = stack.pop()
        d = d + rng.normal(0, 0.15, 3)
        d /= np.linalg.norm(d)
        q = p + ln * d
        solids.append(capsule(p, q, r, r * 0.9))
        if n == 0:
            continue
        perp = np.cross(d, rng.normal(size=3))
        perp /= np.linalg.norm(perp)
        for sign in (1.0, -1.0):
            ang = math.radians(rng.uniform(18, spread))
            child = math.cos(ang) * d + sign * math.sin(ang) * perp
            stack.append((q, child, r * 0.74, ln * rng.uniform(0.7, 0.85), n - 1))
    return solids


# --------------------------------------------------------------------------------------------- painting


@dataclass
class Canvas:
    """HU and tissue arrays being painted, with the patient coordinates of their voxels.

    ``hu`` (float32) and ``tissue`` (uint8) are ``(I, J, K)``; ``x``, ``y`` are ``(I, J, 1)``, ``z`` is
    ``(1, 1, K)``; ``tex`` and ``grain`` are unit-variance smooth noise ``(I, J, K)`` (or None).
    ``locate(lo, hi)`` gives the index slices covering a patient-mm box (None when they miss the canvas).
    """

    hu: np.ndarray
    tissue: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    locate: Callable[[np.ndarray, np.ndarray], Slices | None]
    tex: np.ndarray | None = None
    grain: np.ndarray | None = None

    def paint(self, layer: Layer) -> None:
        """Paint one layer, touching only the voxels in its solid's box."""
        sl = self.locate(layer.solid.lo, layer.solid.hi)
        if sl is None:
            return
        si, sj, sk = sl
        x, y, z = self.x[si, sj], self.y[si, sj], self.z[:, :, sk]
        tissue = self.tissue[sl]
        mask = np.broadcast_to(layer.solid.inside(x, y, z), tissue.shape)
        if layer.allowed is not None:
            mask = mask & layer.allowed[tissue]
        if not mask.any():
            return
        hu = self.hu[sl]
        value = layer.hu(x, y, z) if callable(layer.hu) else np.float32(layer.hu)
        if layer.tex and self.tex is not None:
            value = value + np.float32(layer.tex) * self.tex[sl]
        if layer.grain and self.grain is not None:
            value = value + np.float32(layer.grain) * self.grain[sl]
        np.copyto(hu, value, where=mask, casting="unsafe")
        np.copyto(tissue, np.uint8(layer.tissue), where=mask)


def tissue_at(layers: Sequence[Layer], points: np.ndarray) -> np.ndarray:
    """Tissue ids (uint8, ``(N,)``) that ``layers`` paint at ``points`` (``(N, 3)`` patient mm)."""
    pts = np.asarray(points, dtype=np.float32)
    tissue = np.zeros(len(pts), dtype=np.uint8)
    for layer in layers:
        sel = np.nonzero(np.all((pts >= layer.solid.lo) & (pts <= layer.solid.hi), axis=1))[0]
        if sel.size == 0:
            continue
        p = pts[sel]
        m = np.broadcast_to(layer.solid.inside(p[:, 0], p[:, 1], p[:, 2]), sel.shape)
        if layer.allowed is not None:
            m = m & layer.allowed[tissue[sel]]
        tissue[sel[m]] = layer.tissue
    return tissue
