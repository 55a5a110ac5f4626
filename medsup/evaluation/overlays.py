"""CT overlays: axial, coronal and sagittal slices through the largest lesion, reference and prediction.

Every array here is a 3-D ``(I, J, K)`` volume reoriented to RAS (``I`` toward the patient's right, ``J``
anterior, ``K`` superior). Slices are shown the radiological way: axial seen from the feet (patient's right
on the image's left, anterior up), coronal seen from the front (right on the left, superior up), sagittal
seen from the patient's left (anterior on the left, superior up); pixels keep their physical aspect.

The slice position (:func:`focus_point`): the largest connected lesion of the reference, each plane at
the slice where that lesion's cross-section is largest; without a lesion, the organ's centroid; without
either, the centre of the volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsup.data.files import strip_suffix
from medsup.data.geometry import Geometry, Volume
from medsup.data.io import read_image
from medsup.evaluation.figures import pyplot, save_figure

Point = tuple[int, int, int]
#: (width, level) in HU: the abdominal soft-tissue window
ABDOMEN_WINDOW = (400.0, 40.0)
#: plane name -> the array axis it cuts, the display-axis letters (left, right, top, bottom)
PLANES: dict[str, tuple[int, str]] = {"axial": (2, "RLAP"), "coronal": (1, "RLSI"), "sagittal": (0, "APSI")}
_ORGAN_COLORS = ("#2ecc40", "#39cccc", "#01ff70")
_LESION_COLORS = ("#ff4136", "#f012be", "#ff851b")
_OTHER_COLORS = ("#0074d9", "#ffdc00", "#b10dc9", "#7fdbff")


@dataclass
class CaseView:
    """One case ready for :func:`overlay_figure`: RAS arrays of equal shape and their voxel spacing (mm)."""

    title: str
    ct: np.ndarray  # HU
    reference: np.ndarray  # integer classes
    prediction: np.ndarray  # integer classes
    spacing: tuple[float, float, float]
    dice: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {a.shape for a in (self.ct, self.reference, self.prediction)}
        if len(shapes) != 1 or self.ct.ndim != 3:
            raise ValueError(f"{self.title}: CT, reference and prediction need one 3-D shape, got "
                             f"{[list(a.shape) for a in (self.ct, self.reference, self.prediction)]}")


def to_ras(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``array`` on ``geometry`` reoriented exactly to RAS, and its spacing along the new axes."""
    volume = Volume(array, geometry).reoriented("RAS")
    return volume.array, volume.geometry.spacing


def case_view(title: str, ct: Volume, reference: Volume, prediction: Volume, labels: dict[int, str]) -> CaseView:
    """A :class:`CaseView` from three volumes on one grid; Dice per foreground class of ``labels``.

    Raises:
        ValueError: the grids differ (the message lists how).
    """
    for name, other in (("reference", reference), ("prediction", prediction)):
        problems = ct.geometry.mismatches(other.geometry)
        if problems:
            raise ValueError(f"{title}: the {name} is not on the image's grid: {'; '.join(problems)}")
    arr, spacing = to_ras(ct.array, ct.geometry)
    ref = to_ras(reference.array, reference.geometry)[0]
    pred = to_ras(prediction.array, prediction.geometry)[0]
    return CaseView(title, arr, ref, pred, spacing, dice_by_class(ref, pred, labels))


def dice_by_class(reference: np.ndarray, prediction: np.ndarray, labels: dict[int, str]) -> dict[str, float]:
    """Dice of every foreground class; NaN where the class is absent from both."""
    out = {}
    for value, name in sorted(labels.items()):
        if value == 0:
            continue
        r, p = reference == value, prediction == value
        denom = int(r.sum()) + int(p.sum())
        out[name] = 2.0 * int((r & p).sum()) / denom if denom else math.nan
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 26-connected component of ``mask`` (same shape), or None when ``mask`` is empty."""
    from scipy import ndimage

    if not mask.any():
        return None
    # label only inside the bounding box: a full-size CT's int32 component map would cost 4 bytes per voxel
    bounds = []
    for ax in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        bounds.append(slice(int(hits[0]), int(hits[-1]) + 1))
    box = tuple(bounds)
    components, _count = ndimage.label(mask[box], structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel())[1:]
    out = np.zeros(mask.shape, dtype=bool)
    out[box] = components == int(np.argmax(sizes)) + 1
    return out


def focus_point(label: np.ndarray, lesion_classes: Sequence[int], organ_classes: Sequence[int]) -> tuple[Point, str]:
    """The voxel the three planes go through, and why.

    Largest 26-connected component of ``lesion_classes``: along each axis, the slice where its cross-section
    is largest (so every plane cuts the lesion at its widest). Else the centroid of ``organ_classes`` (of any
    foreground when no organ class is given), else the volume's centre.
    """
    lesion = _largest_component(np.isin(label, list(lesion_classes))) if lesion_classes else None
    if lesion is not None:
        point = tuple(int(np.argmax(lesion.sum(axis=tuple(a for a in range(3) if a != ax)))) for ax in range(3))
        size = int(lesion.sum())
        return (point[0], point[1], point[2]), f"largest lesion ({size} voxel{'s' if size != 1 else ''})"
    organ = np.isin(label, list(organ_classes)) if organ_classes else label > 0
    if organ.any():
        centre = np.rint(np.argwhere(organ).mean(axis=0)).astype(int)
        what = "organ centroid, no lesion" if organ_classes else "foreground centroid"
        return (int(centre[0]), int(centre[1]), int(centre[2])), what
    return (label.shape[0] // 2, label.shape[1] // 2, label.shape[2] // 2), "volume centre, no foreground"


def plane(array: np.ndarray, name: str, index: int) -> np.ndarray:
    """The 2-D display image of plane ``name`` at ``index`` of a RAS array (rows top to bottom)."""
    axis = PLANES[name][0]
    return np.take(array, index, axis=axis).T[::-1, ::-1]


def plane_extent(shape: tuple[int, ...], spacing: Sequence[float], name: str) -> tuple[float, float, float, float]:
    """``imshow`` extent in mm (left, right, bottom, top) of plane ``name``: physical pixel aspect."""
    rows_axis, cols_axis = [a for a in range(3) if a != PLANES[name][0]][::-1]
    return (0.0, shape[cols_axis] * spacing[cols_axis], shape[rows_axis] * spacing[rows_axis], 0.0)


def class_colors(labels: dict[int, str], lesion_classes: Sequence[int] = (),
                 organ_classes: Sequence[int] = ()) -> dict[int, str]:
    """A colour per foreground class: organs green/teal, lesions red/magenta, anything else blue/yellow."""
    out: dict[int, str] = {}
    counters = {"organ": 0, "lesion": 0, "other": 0}
    for value in sorted(v for v in labels if v != 0):
        kind = "lesion" if value in lesion_classes else "organ" if value in organ_classes else "other"
        palette = {"organ": _ORGAN_COLORS, "lesion": _LESION_COLORS, "other": _OTHER_COLORS}[kind]
        out[value] = palette[counters[kind] % len(palette)]
        counters[kind] += 1
    return out


def draw_labels(ax: Any, labels2d: np.ndarray, extent: Sequence[float], colors: dict[int, str], *,
                fill: bool = True, contour: bool = False, dashed: bool = False, alpha: float = 0.4) -> None:
    """Filled translucent classes and/or class contours of a 2-D label slice on ``ax``."""
    from matplotlib.colors import to_rgba

    if fill:
        rgba = np.zeros((*labels2d.shape, 4), dtype=np.float32)
        for value, color in colors.items():
            rgba[labels2d == value] = to_rgba(color, alpha)
        ax.imshow(rgba, extent=tuple(extent), interpolation="nearest")
    if contour:
        for value, color in colors.items():
            mask = (labels2d == value).astype(np.float32)
            if mask.any() and not mask.all():
                ax.contour(mask, levels=[0.5], colors=[color], linewidths=1.3, linestyles="--" if dashed else "-",
                           extent=tuple(extent), origin="upper")


def show_ct(ax: Any, ct2d: np.ndarray, extent: Sequence[float], window: tuple[float, float]) -> Any:
    """Grey CT slice in the ``(width, level)`` HU window; returns the image (for a colorbar)."""
    width, level = window
    return ax.imshow(ct2d, cmap="gray", vmin=level - width / 2, vmax=level + width / 2, extent=tuple(extent),
                     interpolation="bilinear")


def _orient_letters(ax: Any, letters: str) -> None:
    left, right, top, bottom = tuple(letters)
    style = {"color": "yellow", "fontsize": 8, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.01, 0.5, left, ha="left", va="center", **style)
    ax.text(0.99, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.99, top, ha="center", va="top", **style)
    ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)


def _dice_text(dice: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" if not math.isnan(v) else f"{k} n/a" for k, v in dice.items())


def overlay_figure(cases: Sequence[CaseView], path: Path, *, labels: dict[int, str],
                   lesion_classes: Sequence[int] = (), organ_classes: Sequence[int] = (),
                   window: tuple[float, float] = ABDOMEN_WINDOW, title: str | None = None) -> Path:
    """Axial, coronal and sagittal CT slices (windowed) through each case's :func:`focus_point`: one row with
    the reference filled and outlined, one with the prediction filled and the reference dashed on top.

    Size: 1260 px wide, ``2 * len(cases) * 360 + 120`` px high. Returns ``path``.
    """
    if not cases:
        raise ValueError("overlay_figure needs at least one case")
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    colors = class_colors(labels, lesion_classes, organ_classes)
    rows = 2 * len(cases)
    fig, axes = plt.subplots(rows, 3, figsize=(12.6, 3.6 * rows + 1.2), layout="constrained", squeeze=False)
    image = None
    for c, case in enumerate(cases):
        focus_from = case.reference if case.reference.any() else case.prediction
        point, why = focus_point(focus_from, lesion_classes, organ_classes)
        for col, name in enumerate(PLANES):
            axis, letters = PLANES[name]
            extent = plane_extent(case.ct.shape, case.spacing, name)
            ct2d = plane(case.ct, name, point[axis])
            ref2d, pred2d = plane(case.reference, name, point[axis]), plane(case.prediction, name, point[axis])
            for r, (labels2d, kind) in enumerate(((ref2d, "reference"), (pred2d, "prediction"))):
                ax = axes[2 * c + r, col]
                image = show_ct(ax, ct2d, extent, window)
                draw_labels(ax, labels2d, extent, colors, fill=True, contour=kind == "reference")
                if kind == "prediction":
                    draw_labels(ax, ref2d, extent, colors, fill=False, contour=True, dashed=True)
                ax.set(xticks=[], yticks=[])
                _orient_letters(ax, letters)
                if r == 0:
                    ax.set_title(f"{name} ({'ijk'[axis]} = {point[axis]})", fontsize=10)
            if col == 0:
                axes[2 * c, 0].set_ylabel(f"{case.title}\nreference\n[{why}]", fontsize=9)
                axes[2 * c + 1, 0].set_ylabel(f"prediction\nDice: {_dice_text(case.dice)}", fontsize=9)
    handles: list[Any] = [Patch(facecolor=colors[v], alpha=0.6, label=labels[v]) for v in colors]
    handles += [Line2D([], [], color="grey", lw=1.3, label="reference contour"),
                Line2D([], [], color="grey", lw=1.3, ls="--", label="reference contour (over prediction)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)
    if image is not None:
        width, level = window
        fig.colorbar(image, ax=axes, shrink=0.5, pad=0.01, label=f"HU (window W{width:g}/L{level:g})")
    fig.suptitle(title or "CT overlays: reference and prediction")
    return save_figure(fig, path)


def overlay_files(image: Path, reference: Path, prediction: Path, path: Path, *, labels: dict[int, str],
                  lesion_classes: Sequence[int] = (), organ_classes: Sequence[int] = (),
                  window: tuple[float, float] = ABDOMEN_WINDOW) -> Path:
    """:func:`overlay_figure` for one case given as files on one grid (any format :func:`read_image` reads).

    Raises:
        ImageReadError: a file cannot be read.
        ValueError: the label files are not on the image's grid.
    """
    ct = read_image(image)
    ref, pred = read_image(reference), read_image(prediction)
    to_int = lambda v: Volume(np.rint(v.array).astype(np.int16), v.geometry)  # noqa: E731
    view = case_view(strip_suffix(Path(image)), ct, to_int(ref), to_int(pred), labels)
    return overlay_figure([view], path, labels=labels, lesion_classes=lesion_classes, organ_classes=organ_classes,
                          window=window, title=f"{view.title}: reference {_short(reference)}, "
                                               f"prediction {_short(prediction)}")


def _short(path: Path) -> str:
    """``folder/file`` (enough to tell a reference from a prediction of the same case name)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name
