"""Analytic anatomy for synthetic CT: ordered layers of implicit solids in patient millimetres.

A :class:`Phantom` is a list of :class:`~medsup.data.solids.Layer` s. Each layer is a solid (a boolean
function of position), a tissue id, an HU value and texture amplitudes. Painting the layers in order onto a
grid (later layers win, :class:`~medsup.data.solids.Canvas`) gives a noise-free HU image and a tissue map;
labels are read from the tissue map. Lesions are placed by :mod:`medsup.data.lesions`. Solids are functions of
position in the *patient* frame, never of voxel indices, so one phantom scanned on any grid (spacing,
orientation, rotation, origin) gives images and labels that agree in world space.

Patient frame: millimetres on LPS axes (x toward the patient's Left, y Posterior, z Superior), origin on the
body axis. Solid functions take three arrays ``x, y, z`` that broadcast together: on a scan slab ``x`` and
``y`` are ``(I, J, 1)`` and ``z`` is ``(1, 1, K)``, so the in-plane part of every formula is evaluated once
per slab rather than once per voxel; for point queries (:func:`tissue_at`) all three are ``(N,)``.
Arithmetic stays in float32: constants are plain Python floats so that NumPy does not promote.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from medsup.data.solids import (
    Fn,
    Layer,
    Outline,
    Solid,
    blob,
    ellipse2,
    ellipsoid,
    extrude,
    periodic,
    ribs,
    rotation,
    segment2,
    tube,
    vessel_tree,
)


class Tissue(IntEnum):
    """Tissue ids of the tissue map (uint8). Labels are a lookup on these."""

    AIR = 0
    FAT = 1  # subcutaneous fat
    MUSCLE = 2
    CAVITY = 3  # visceral / mediastinal fat filling the body cavity
    BONE = 4
    SOFT = 5  # other soft tissue: disc, pancreas, bowel wall, diaphragm, ...
    FLUID = 6  # bile, urine, CSF, bowel fluid
    GAS = 7  # bowel gas, airway lumen
    TABLE = 8
    LUNG = 9
    LUNG_VESSEL = 10
    NODULE = 11
    VESSEL = 12
    HEART = 13
    LIVER = 14
    LIVER_VESSEL = 15
    TUMOUR = 16
    SPLEEN = 17
    KIDNEY = 18


T = Tissue
#: everything an abdominal or thoracic organ may displace: organs stay inside the body cavity
VISCERA = (T.CAVITY, T.SOFT, T.FLUID, T.GAS, T.LUNG, T.LUNG_VESSEL, T.VESSEL, T.HEART, T.SPLEEN, T.KIDNEY)


# --------------------------------------------------------------------------------------------- anatomy


@dataclass
class Lesion:
    """A placed lesion: kind (``"tumour"``, ``"solid"``, ``"part-solid"``, ``"ground-glass"``), centre
    (patient mm), diameter (mm), and the layers that paint it."""

    kind: str
    center: np.ndarray
    diameter: float
    layers: list[Layer]


@dataclass
class Phantom:
    """A patient: layers in painting order, the body's half-width / half-depth (mm) for the scan field of
    view, the box (patient mm) of the organ the scan is centred on, and per-patient HU values."""

    layers: list[Layer]
    half_width: float
    half_depth: float
    roi_lo: np.ndarray
    roi_hi: np.ndarray
    hu: dict[str, float]
    lesions: list[Lesion] = field(default_factory=list)

    def all_layers(self) -> list[Layer]:
        """Anatomy then lesions (lesions last, so nothing later can cover them)."""
        return self.layers + [layer for lesion in self.lesions for layer in lesion.layers]


class _Patient:
    """Maps a reference patient (abdomen 310 x 230 mm) to this one: stretch, jitter, and collects layers."""

    def __init__(self, rng: np.random.Generator, sx: float, sy: float, sz: float, jitter: float) -> None:
        self.rng, self.sx, self.sy, self.sz, self.jitter = rng, sx, sy, sz, jitter
        self.rs = math.sqrt(sx * sy)
        self.layers: list[Layer] = []

    def p(self, x: float, y: float, z: float, jitter: float = 1.0) -> np.ndarray:
        """A reference position mapped onto this patient, with a little random displacement."""
        return np.array([x * self.sx, y * self.sy, z * self.sz]) + self.rng.normal(0, self.jitter * jitter, 3)

    def r(self, *radii: float, var: float = 0.12) -> np.ndarray:
        """Reference radii scaled to this patient, each varied by up to ``var``."""
        return np.array(radii) * self.rs * self.rng.uniform(1 - var, 1 + var, len(radii))

    def add(self, tissue: int, solids: Solid | Sequence[Solid], hu: float | Fn, tex: float = 0.0,
            grain: float = 0.0, inside: tuple[int, ...] | None = VISCERA) -> None:
        for s in [solids] if isinstance(solids, Solid) else solids:
            self.layers.append(Layer(tissue, s, hu, tex, grain, inside))

    def organ(self, tissue: int, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], hu: float,
              tex: float, wobble: float = 0.08, inside: tuple[int, ...] | None = VISCERA,
              grain: float = 0.0) -> Solid:
        solid = blob(self.rng, parts, wobble, wavelength=110 * self.rs)
        self.add(tissue, solid, hu, tex=tex, grain=grain, inside=inside)
        return solid

    def body(self, a: float, b: float, fat: float, wall: float, hu: dict[str, float]) -> Outline:
        """Skin, subcutaneous fat, muscle wall, cavity and the scanner table; returns the cavity outline."""
        rng = self.rng
        harm = tuple((n, float(rng.uniform(0, 0.05) / n ** 0.5), float(rng.uniform(0, 2 * math.pi)))
                     for n in range(2, 6))
        zwave = (float(rng.uniform(0.01, 0.04)), float(rng.uniform(150, 400) * self.sz),
                 float(rng.uniform(0, 2 * math.pi)))
        skin = Outline(0.0, 0.0, a, b, float(rng.uniform(2.1, 2.6)), harm, zwave)
        cavity = skin.shrunk(fat + wall)
        self.add(T.FAT, skin.solid(), hu["fat"], tex=8, inside=None)
        self.add(T.MUSCLE, skin.shrunk(fat).solid(), hu["muscle"], tex=5, inside=None)
        self.add(T.CAVITY, cavity.solid(), hu["cavity"], tex=12, grain=8, inside=None)
        # scanner table: a curved plate with a dense shell and a foam core just behind the back
        top, thick, half, curve = b * 1.06 + 3 * self.rs, 10 * self.rs, a * rng.uniform(0.8, 1.0), 0.3 / a

        def plate(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            d = y - (top - curve * x * x)
            return (d > 0) & (d < thick) & (np.abs(x) < half)

        def plate_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            d = y - (top - curve * x * x)
            return -500.0 + np.float32(650.0) * ((d < 1.5 * self.rs) | (d > thick - 1.5 * self.rs))

        self.add(T.TABLE, extrude(plate, (-half, top - curve * half * half), (half, top + thick)),
                 plate_hu, inside=None)
        return cavity

    def spine(self, yv: float, body_r: tuple[float, float], period: float, hu: dict[str, float],
              transverse: float) -> None:
        """Vertebral bodies (cancellous bone with a cortical shell, HU varying per vertebra), discs, canal,
        neural arches, spinous and transverse processes; positions in patient mm."""
        rng, rs = self.rng, self.rs
        z0, disc = float(rng.uniform(0, period)), 0.22
        rx, ry = body_r
        table = (hu["bone"] + rng.normal(0, 35, 64)).astype(np.float32)
        cortex = hu["cortex"] - hu["bone"]

        def vert_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            n = np.floor((z - z0) * (1 / period)).astype(np.intp) % 64
            shell = ((x * (1 / rx)) ** 2 + ((y - yv) * (1 / ry)) ** 2) > 0.72
            return table[n] + np.float32(cortex) * shell

        box = ((-rx, yv - ry), (rx, yv + ry))
        self.add(T.BONE, extrude(ellipse2(0, yv, rx, ry), *box, z_on=periodic(z0, period, disc, 1)),
                 vert_hu, tex=25, inside=None)
        self.add(T.SOFT, extrude(ellipse2(0, yv, rx, ry), *box, z_on=periodic(z0, period, 0, disc)),
                 hu["disc"], tex=5, inside=None)
        yc, rc = yv + ry + 10 * rs, 9 * rs
        arch = periodic(z0, period, disc + 0.05, 0.9)
        ra, tr, w = rc + 6 * rs, transverse, 5 * rs  # arch outer radius, transverse reach, process radius
        for section, lo, hi in (
            (ellipse2(0, yc, ra, ra - rs), (-ra, yc - ra), (ra, yc + ra)),  # neural arch (canal painted later)
            (segment2((0, yc), (0, yc + 38 * rs), w), (-w, yc - w), (w, yc + 38 * rs + w)),  # spinous process
            (segment2((-6 * rs, yc - 4 * rs), (-tr, yc), w), (-tr - w, yc - 4 * rs - w), (0, yc + w)),
            (segment2((6 * rs, yc - 4 * rs), (tr, yc), w), (0, yc - 4 * rs - w), (tr + w, yc + w)),
        ):
            self.add(T.BONE, extrude(section, lo, hi, z_on=arch), hu["cortex"] - 150, tex=30, inside=None)
        self.add(T.FLUID, extrude(ellipse2(0, yc, rc, rc * 0.9), (-rc, yc - rc), (rc, yc + rc)), hu["csf"],
                 tex=3, inside=None)

    def ribcage(self, cavity: Outline, wall: float, z_top: float, count: int, ends: np.ndarray,
                slope: float) -> None:
        ra, rb = cavity.a + 0.45 * wall, cavity.b + 0.45 * wall
        solid, hu = ribs(ra, rb, width=min(9 * self.rs, 0.9 * wall + 3 * self.rs), z_top=z_top,
                         pitch=27 * self.sz, thick=10 * self.sz, slope=slope, psi0=0.35, psi_end=ends)
        self.add(T.BONE, solid, hu, tex=30, inside=(T.FAT, T.MUSCLE, T.CAVITY))


def _hu_common(rng: np.random.Generator) -> dict[str, float]:
    u = rng.uniform
    return {"fat": u(-115, -90), "muscle": u(40, 55), "cavity": u(-100, -75), "bone": u(250, 400),
            "cortex": u(650, 850), "disc": u(70, 110), "csf": u(5, 20), "lung": u(-880, -830)}


def abdomen(rng: np.random.Generator, scale: float = 1.0) -> Phantom:
    """Portal-venous abdominal CT patient centred on the liver (``scale`` < 1 shrinks every length).

    Liver 60-140 HU among spleen (90-130), kidneys (120-180), pancreas, stomach, bowel, gallbladder and
    enhanced vessels (150-200), so the liver cannot be found by thresholding; lung bases and heart at the top.
    """
    u = rng.uniform
    a = u(140, 175) * scale
    b = a * u(0.68, 0.8)
    fat, wall = u(8, 35) * scale, u(8, 14) * scale
    P = _Patient(rng, a / 155, b / 115, scale * u(0.9, 1.1), jitter=4 * scale)
    hu = _hu_common(rng)
    vessel = u(150, 200)
    hu.update(liver=u(65, 135), spleen=u(90, 130), kidney=u(120, 180), vessel=vessel, pancreas=u(80, 110),
              wall=u(40, 70), gall=u(0, 20), heart=u(110, 150))
    cavity = P.body(a, b, fat, wall, hu)
    rs = P.rs

    # lung bases and the bottom of the heart, above the diaphragm (the liver painted later carves the dome)
    for side in (-1, 1):
        lung = blob(rng, [(P.p(side * 70, 10, 80), P.r(115, 130, 150), rotation(u(-8, 8)))], 0.04, 150 * rs)
        P.add(T.LUNG, lung.clipped(0, lo=0.0) if side > 0 else lung.clipped(0, hi=0.0), hu["lung"], tex=15,
              grain=15, inside=(T.CAVITY,))
        root = P.p(side * 40, 15, 70)
        P.add(T.LUNG_VESSEL, vessel_tree(rng, root, np.array([side * 0.8, 0.3, -0.6]), 4 * rs, 30 * rs, 3),
              hu["vessel"] - 20, tex=5, inside=(T.LUNG, T.LUNG_VESSEL))
    P.organ(T.CAVITY, [(P.p(0, 10, 100), P.r(30, 85, 200), np.eye(3))], hu["cavity"], tex=10, wobble=0.05)
    heart_c = P.p(20, -35, 60)
    P.organ(T.CAVITY, [(heart_c, P.r(72, 57, 62), rotation(25))], hu["cavity"], tex=10)
    P.organ(T.HEART, [(heart_c, P.r(64, 50, 55), rotation(25))], hu["heart"], tex=8, wobble=0.04)

    # bowel: colon frame and small-bowel loops, wall then lumen (gas, fluid or mottled stool)
    colon = [P.p(-95, 25, -300), P.p(-95, 15, -170), P.p(-80, -35, -140), P.p(0, -60, -150),
             P.p(80, -35, -120), P.p(95, 10, -105), P.p(95, 30, -180), P.p(90, 20, -300)]
    colon_r = [float(v) for v in P.r(*([21.0] * len(colon)), var=0.25)]
    P.add(T.SOFT, tube(colon, colon_r), hu["wall"], tex=5, inside=(T.CAVITY,))
    P.add(T.GAS, tube(colon, [r - 3 * rs for r in colon_r]), -350.0, tex=60, grain=250, inside=(T.SOFT,))
    for _ in range(int(u(7, 13))):
        pts = [P.p(u(-80, 80), u(-70, 10), u(-290, -140), jitter=0)]
        for _ in range(3):
            pts.append(pts[-1] + rng.normal(0, 25 * rs, 3))
        r = float(u(9, 14) * rs)
        kind = int(rng.choice(3, p=[0.5, 0.3, 0.2]))
        content, content_hu = ((T.FLUID, u(0, 30)), (T.GAS, -950.0), (T.SOFT, u(20, 60)))[kind]
        P.add(T.SOFT, tube(pts, [r] * 4), hu["wall"], tex=5, inside=(T.CAVITY,))
        P.add(content, tube(pts, [r - 2.5 * rs] * 4), content_hu, tex=8, inside=(T.SOFT,))

    # stomach: wall, then food/fluid, then gas above the level (supine: gas is anterior, i.e. low y)
    st_c, st_r = P.p(50, -30, -55), P.r(45, 38, 55)
    st_rot = rotation(u(10, 30))
    P.organ(T.SOFT, [(st_c, st_r, st_rot)], hu["wall"], tex=5, wobble=0.1)
    lumen = P.organ(T.FLUID, [(st_c, st_r - 4 * rs, st_rot)], u(10, 40), tex=15, wobble=0.0, inside=(T.SOFT,))
    level = float(st_c[1] - st_r[1] * u(0.2, 0.7))
    P.add(T.GAS, lumen.clipped(1, hi=level), -980.0, tex=5, inside=(T.FLUID,))

    P.organ(T.SPLEEN, [(P.p(88, 48, -50), P.r(24, 52, 55), rotation(u(-45, -25), u(-10, 10)))],
            hu["spleen"], tex=8, wobble=0.1)
    liver_parts = [
        (P.p(-72, 5, -78), P.r(62, 70, 80), rotation(u(-10, 10), u(8, 22))),
        (P.p(0, -42, -42), P.r(55, 28, 38), rotation(u(-25, -5))),
        (P.p(-20, 22, -55), P.r(20, 16, 28), np.eye(3)),
    ]
    liver = P.organ(T.LIVER, liver_parts, hu["liver"], tex=7, wobble=0.09)
    vhu = hu["vessel"] - u(0, 25)
    in_liver = (T.LIVER, T.LIVER_VESSEL)
    porta, hv = P.p(-35, 5, -95), P.p(-20, 20, -12)
    for root, d, rad in ((porta, (-1, 0, 0.3), 5.5), (porta, (1, -0.8, 0.6), 4.5), (hv, (-1, 0.1, -0.4), 5.0),
                         (hv, (-0.4, -1, -0.3), 4.5), (hv, (0.4, -1, -0.2), 4.5)):
        P.add(T.LIVER_VESSEL, vessel_tree(rng, root, np.array(d, float), rad * rs, 32 * rs, 4), vhu, tex=4,
              inside=in_liver)
    if u() < 0.8:
        P.organ(T.FLUID, [(P.p(-45, -55, -105), P.r(14, 14, 35), rotation(0, 20, -25))], hu["gall"], tex=3,
                wobble=0.05)

    for side, z in ((-1, -130.0), (1, -115.0)):
        kc, krot = P.p(side * 68, 52, z), rotation(side * u(20, 40), side * u(-12, 12))
        P.organ(T.KIDNEY, [(kc, P.r(26, 24, 55), krot)], hu["kidney"], tex=10, wobble=0.05)
        P.add(T.CAVITY, ellipsoid(kc + krot @ np.array([-side * 12 * rs, -6 * rs, 0]), P.r(10, 9, 28), krot),
              hu["cavity"] + 20, tex=10, inside=(T.KIDNEY,))
        P.add(T.FLUID, ellipsoid(kc + krot @ np.array([-side * 20 * rs, -8 * rs, 0]), P.r(7, 6, 10), krot),
              u(0, 20), tex=3)

    P.add(T.SOFT, tube([P.p(-25, -5, -135), P.p(0, -15, -122), P.p(35, -5, -112), P.p(70, 30, -100)],
                       [14 * rs, 10 * rs, 10 * rs, 8 * rs]), hu["pancreas"], tex=8)
    # great vessels (labelled background even where they run through the liver)
    conf = P.p(-2, 5, -128)
    vessels = [
        ([P.p(14, 0, 150), P.p(14, 0, -320)], [11.0, 10.0], 0.0),  # aorta
        ([P.p(-22, 8, -320), P.p(-24, 10, -60), P.p(-18, 18, 15)], [11.0, 13.0, 13.0], -u(0, 30)),  # IVC
        ([conf, P.p(-38, 5, -98)], [7.0, 7.0], -u(0, 15)),  # portal vein
        ([conf, P.p(40, 20, -110), P.p(80, 40, -80)], [4.5, 4.5, 4.0], -u(0, 15)),  # splenic vein
        ([conf, P.p(-5, -15, -240)], [5.5, 5.0], -u(0, 15)),  # superior mesenteric vein
        ([P.p(60, 45, -115), P.p(14, -14, -118), P.p(-22, 8, -120)], [5.0, 4.5, 5.0], -u(0, 20)),  # L renal v.
        ([P.p(-60, 45, -128), P.p(-22, 8, -125)], [5.0, 5.0], -u(0, 20)),  # right renal vein
    ]
    for pts, radii, dhu in vessels:
        P.add(T.VESSEL, tube(pts, [r * rs for r in radii]), vessel + dhu, tex=4)
    for way in ((0.6, -1.0, -0.6), (-0.6, -1.0, -0.6), (1.0, -0.3, -0.8), (-1.0, -0.3, -0.8)):  # mesenteric
        P.add(T.VESSEL, vessel_tree(rng, P.p(-3, -12, -150), np.array(way), 3.0 * rs, 28 * rs, 3), vessel - 20,
              tex=4, inside=(T.CAVITY,))

    # muscles and spine are painted last: nothing may overlap the skeleton
    for side in (-1, 1):
        P.add(T.MUSCLE, tube([P.p(side * 28, 28, -115), P.p(side * 45, 20, -330)], [4 * rs, 24 * rs]),
              hu["muscle"], tex=5)
        c = P.p(side * 33, 72, 0)
        P.add(T.MUSCLE, extrude(ellipse2(float(c[0]), float(c[1]), 28 * rs, 20 * rs),
                                (float(c[0]) - 28 * rs, float(c[1]) - 20 * rs),
                                (float(c[0]) + 28 * rs, float(c[1]) + 20 * rs)), hu["muscle"], tex=5, inside=None)
    P.spine(28 * P.sy, (22 * rs, 17 * rs), 35 * P.sz, hu, transverse=40 * rs)
    ends = np.concatenate([u(2.5, 2.9, 6), u(2.1, 2.6, 4), u(1.3, 1.8, 2)])
    P.ribcage(cavity, wall, z_top=(-120 + 11 * 27) * P.sz, count=12, ends=ends, slope=0.3)
    return Phantom(P.layers, a, b, liver.lo, liver.hi, hu)


def chest(rng: np.random.Generator, scale: float = 1.0) -> Phantom:
    """Non-contrast chest CT patient centred on the lungs: aerated lungs (~-850 HU, denser posteriorly) with
    branching vessels, heart and mediastinum, airways, ribs, sternum, scapulae, spine, upper abdomen below."""
    u = rng.uniform
    a = u(150, 185) * scale
    b = a * u(0.62, 0.74)
    fat, wall = u(5, 25) * scale, u(10, 16) * scale
    P = _Patient(rng, a / 165, b / 115, scale * u(0.9, 1.1), jitter=4 * scale)
    hu = _hu_common(rng)
    hu.update(heart=u(30, 50), vessel=u(30, 50), lung_vessel=u(0, 50), soft=u(40, 60))
    cavity = P.body(a, b, fat, wall, hu)
    rs = P.rs
    for side in (-1, 1):  # pectoral muscles replace anterior subcutaneous fat in the upper chest
        P.add(T.MUSCLE, ellipsoid(np.array([side * 65 * P.sx, -(b - fat * 0.6), 140 * P.sz]),
                                  P.r(60, 14, 70)), hu["muscle"], tex=5, inside=(T.FAT, T.MUSCLE))

    lungs: list[Solid] = []
    for side, (x, z, rx) in ((-1, (70.0, 85.0, 120.0)), (1, (72.0, 80.0, 115.0))):
        yc = 8 * P.sy
        grad = float(u(0.25, 0.5))  # dependent (posterior) lung is denser
        base = hu["lung"]

        def lung_hu(xx: np.ndarray, yy: np.ndarray, zz: np.ndarray, base: float = base, grad: float = grad,
                    yc: float = yc) -> np.ndarray:
            return base + grad * (yy - yc)

        solid = blob(rng, [(P.p(side * x, 5, z), P.r(rx, 140, 175), rotation(u(-8, 8)))], 0.04, 150 * rs)
        solid = solid.clipped(0, lo=0.0) if side > 0 else solid.clipped(0, hi=0.0)
        lungs.append(solid)
        P.add(T.LUNG, solid, lung_hu, tex=18, grain=22, inside=(T.CAVITY,))
        hilum = P.p(side * 45, 12, 108)
        # lobar trunks fan out from the hilum: up, down, and a ring of lateral ones (roughly a dozen per lung)
        ways = [(side * 0.3, 0.0, 1.0), (side * 0.4, 0.4, -1.0), (side * 0.4, -0.5, -1.0)]
        ways += [(side * 1.0, math.sin(t), math.cos(t) * 0.8) for t in np.linspace(0, 2 * math.pi, 9)[:-1]]
        for d in ways:
            P.add(T.LUNG_VESSEL, vessel_tree(rng, hilum, np.array(d), u(4.0, 6.5) * rs, 30 * rs, 5, spread=40),
                  hu["lung_vessel"], tex=5, inside=(T.LUNG, T.LUNG_VESSEL))

    P.organ(T.CAVITY, [(P.p(0, -5, 120), P.r(30, 85, 260), np.eye(3))], hu["cavity"], tex=10, wobble=0.05)
    heart_c, heart_rot = P.p(18, -28, 35), rotation(u(15, 35))
    P.organ(T.CAVITY, [(heart_c, P.r(68, 56, 62), heart_rot)], hu["cavity"], tex=10, wobble=0.04)
    P.organ(T.HEART, [(heart_c, P.r(60, 50, 55), heart_rot)], hu["heart"], tex=6, wobble=0.04)
    big = [
        ([P.p(5, -15, 50), P.p(5, -20, 150), P.p(15, 10, 178), P.p(22, 32, 158), P.p(20, 30, -100)],
         [15, 14, 13, 12, 11]),  # aorta: ascending, arch, descending
        ([P.p(10, -30, 70), P.p(8, -10, 120)], [13, 13]),  # pulmonary trunk
        ([P.p(8, -10, 120), P.p(45, 10, 112)], [10, 9]),  # left pulmonary artery
        ([P.p(8, -10, 120), P.p(-45, 10, 108)], [10, 9]),  # right pulmonary artery
        ([P.p(-25, -10, 240), P.p(-22, -15, 80)], [10, 10]),  # superior vena cava
        ([P.p(5, 25, 270), P.p(15, 25, -40)], [8, 8]),  # oesophagus
    ]
    for pts, radii in big:
        P.add(T.VESSEL, tube(pts, [r * rs for r in radii]), hu["vessel"], tex=5)
    carina = P.p(0, 10, 140)
    airway = [[P.p(0, 0, 290), carina], [carina, P.p(-45, 15, 115)], [carina, P.p(45, 15, 108)]]
    for pts, r in zip(airway, (9.0, 7.0, 6.5), strict=True):
        P.add(T.SOFT, tube(pts, [(r + 2) * rs] * 2), hu["soft"], tex=5)
    for pts, r in zip(airway, (9.0, 7.0, 6.5), strict=True):
        P.add(T.GAS, tube(pts, [r * rs] * 2), -990.0, tex=5, inside=(T.SOFT,))

    # upper abdomen under the diaphragm domes (right: liver; left: spleen/stomach with a gas bubble)
    P.organ(T.SOFT, [(P.p(-60, 0, -100), P.r(110, 105, 105), np.eye(3))], hu["soft"] + 10, tex=7, wobble=0.04)
    P.organ(T.SOFT, [(P.p(60, 0, -115), P.r(105, 105, 105), np.eye(3))], hu["soft"], tex=7, wobble=0.04)
    P.add(T.GAS, ellipsoid(P.p(55, -15, -30), P.r(30, 25, 18)), -980.0, tex=5, inside=(T.SOFT,))

    for side in (-1, 1):
        # erector spinae: behind the ribs, beside the spinous processes
        c = np.array([side * 30 * P.sx, cavity.b + 0.2 * wall, 0.0])
        P.add(T.MUSCLE, extrude(ellipse2(float(c[0]), float(c[1]), 25 * rs, 18 * rs),
                                (float(c[0]) - 25 * rs, float(c[1]) - 18 * rs),
                                (float(c[0]) + 25 * rs, float(c[1]) + 18 * rs)), hu["muscle"], tex=5, inside=None)
        sc = (side * a * 0.55, b * 0.68)
        ang = -side * u(20, 35)
        P.add(T.BONE, extrude(ellipse2(sc[0], sc[1], 45 * rs, 4 * rs, ang), (sc[0] - 46 * rs, sc[1] - 46 * rs),
                              (sc[0] + 46 * rs, sc[1] + 46 * rs), zlo=110 * P.sz, zhi=260 * P.sz),
              u(350, 550), tex=30, inside=(T.FAT, T.MUSCLE))
    ys = -(cavity.b + wall * 0.5)
    P.add(T.BONE, extrude(ellipse2(0, ys, 14 * rs, 6 * rs), (-14 * rs, ys - 6 * rs), (14 * rs, ys + 6 * rs),
                          zlo=-20 * P.sz, zhi=190 * P.sz), u(300, 500), tex=30, inside=None)
    P.spine(45 * P.sy, (18 * rs, 15 * rs), 27 * P.sz, hu, transverse=32 * rs)
    ends = np.concatenate([u(2.6, 2.9, 7), u(2.2, 2.6, 3), u(1.4, 1.8, 2)])
    P.ribcage(cavity, wall, z_top=255 * P.sz, count=12, ends=ends, slope=0.35)
    lo = np.min([s.lo for s in lungs], axis=0)
    hi = np.max([s.hi for s in lungs], axis=0)
    return Phantom(P.layers, a, b, lo, hi, hu)
