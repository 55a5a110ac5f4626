"""Per-case, per-class segmentation metrics in plain numpy/scipy: Dice, HD95, normalised surface Dice, volumes.

Every function takes boolean masks of one class, ``pred`` and ``ref``, of the same shape ``(I, J, K)``, and the
voxel ``spacing`` in mm along ``(I, J, K)`` (anisotropic spacing is honoured everywhere distances appear).

Surfaces and distances. A mask's surface is the mask minus its 3-D erosion (scipy's default 6-connected
structuring element, voxels outside the array counting as background): the voxels of the mask that touch the
background. Distances go from every surface voxel of one mask to the nearest surface voxel of the other, in mm,
with an exact Euclidean distance transform (``distance_transform_edt(sampling=spacing)``). Both are computed
inside the union bounding box of ``pred`` and ``ref`` padded by one voxel, which holds both surfaces, so the
distances are exact and the memory is that of the box, not of the scan. This is MONAI's
``get_mask_edges`` + ``get_surface_distance`` definition (voxel surfaces, not DeepMind's sub-voxel surfels).

Empty masks, following nnU-Net and MONAI:

- Dice: both empty -> NaN (nothing to find, nothing found: excluded from means); only one empty -> 0.
- HD95: either side empty -> NaN (a distance to nothing is undefined; callers count these).
- NSD: only one side empty -> 0; both empty -> NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

Spacing = Sequence[float]

#: the percentile of the symmetric Hausdorff distance reported as ``hd95``
HD_PERCENTILE = 95.0
#: NSD counts a distance d as within tolerance when d <= tolerance + this (floating-point ties)
TIE_SLACK_MM = 1e-6


def _check(pred: np.ndarray, ref: np.ndarray, spacing: Spacing | None = None) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    if pred.ndim != 3:
        raise ValueError(f"expected 3-D masks (I, J, K), got {pred.ndim}-D")
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ValueError(f"spacing must be 3 positive values in mm, got {list(spacing)}")


def _check_tolerance(tolerance_mm: float) -> None:
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"NSD tolerance must be a finite value >= 0 mm, got {tolerance_mm}")


def bounding_box(*masks: np.ndarray, pad: int = 1) -> tuple[slice, ...] | None:
    """Slices of the union bounding box of ``masks`` (same shape), grown by ``pad`` voxels within the array.

    Returns:
        One slice per axis, or None when every mask is empty.
    """
    union = masks[0].astype(bool, copy=True)
    for mask in masks[1:]:
        union |= mask
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - pad, 0), min(int(hits[-1]) + pad + 1, union.shape[axis])))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of a boolean mask ``(I, J, K)``: the mask minus its 6-connected erosion."""
    mask = mask.astype(bool, copy=False)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of one mask to the nearest surface voxel of the other.

    Args:
        pred, ref: boolean masks ``(I, J, K)``, both non-empty.
        spacing: voxel size in mm along ``(I, J, K)``.

    Returns:
        ``(pred_to_ref, ref_to_pred)``: 1-D float64 arrays with one entry per surface voxel of ``pred`` and of
        ``ref`` respectively.

    Raises:
        ValueError: a mask is empty (no surface to measure from or to), or shapes/spacing are wrong.
    """
    _check(pred, ref, spacing)
    box = bounding_box(pred, ref)
    if box is None or not pred.any() or not ref.any():
        raise ValueError("surface distances need two non-empty masks")
    surf_pred, surf_ref = surface(pred[box]), surface(ref[box])
    sampling = tuple(float(s) for s in spacing)
    # distance of every voxel to the nearest surface voxel of the other mask (EDT measures to zeros)
    to_ref = ndimage.distance_transform_edt(~surf_ref, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=sampling)
    return np.asarray(to_ref[surf_pred], dtype=np.float64), np.asarray(to_pred[surf_ref], dtype=np.float64)


def dice_from_counts(tp: int, predicted: int, reference: int) -> float:
    """Dice ``2 TP / (predicted + reference)`` from voxel counts; NaN when both are empty (it says nothing).
    Summed counts of several cases give the global (pooled) Dice."""
    total = predicted + reference
    return math.nan if total == 0 else 2.0 * tp / total


def overlap_counts(pred: Any, label: Any, classes: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(true positives, predicted, reference)`` voxels of each class for one case.

    Args:
        pred, label: integer class maps of the same shape, both numpy arrays or both torch tensors (validation
            counts on the device, the postprocessing fit on the host).
    """
    out = []
    for c in classes:
        p, g = pred == c, label == c
        out.append((int((p & g).sum()), int(p.sum()), int(g.sum())))
    return out


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice ``2|P∩R| / (|P|+|R|)`` of two boolean masks; NaN when both are empty, 0 when only one is."""
    _check(pred, ref)
    return dice_from_counts(int(np.count_nonzero(pred & ref)), int(np.count_nonzero(pred)), int(np.count_nonzero(ref)))


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Spacing) -> float:
    """95th-percentile symmetric Hausdorff distance in mm; NaN when either mask is empty.

    Each direction's distances (pred surface -> ref surface, ref surface -> pred surface) get their own 95th
    percentile (linear interpolation); the larger of the two is returned, as MONAI's
    ``compute_hausdorff_distance(percentile=95)`` does.
    """
    _check(pred, ref, spacing)
    if not pred.any() or not ref.any():
        return math.nan
    return _hd(*surface_distances(pred, ref, spacing))


def normalized_surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Spacing, tolerance_mm: float) -> float:
    """Normalised surface Dice at ``tolerance_mm``: the fraction of both surfaces within tolerance of the other.

    ``(|{p in S_P: d(p, S_R) <= tol}| + |{r in S_R: d(r, S_P) <= tol}|) / (|S_P| + |S_R|)``, counting surface
    voxels (MONAI ``compute_surface_dice(use_subvoxels=False)``). 0 when only one mask is empty, NaN when both are.
    """
    _check(pred, ref, spacing)
    _check_tolerance(tolerance_mm)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return math.nan
    if not has_pred or not has_ref:
        return 0.0
    return _nsd(*surface_distances(pred, ref, spacing), tolerance_mm)


def voxel_ml(spacing: Spacing) -> float:
    """Volume of one voxel in mL (mm^3 / 1000)."""
    return float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0


def volume_ml(mask: np.ndarray, spacing: Spacing) -> float:
    """Volume of a boolean mask in mL (voxels times the voxel volume)."""
    return int(np.count_nonzero(mask)) * voxel_ml(spacing)


def _hd(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray) -> float:
    return float(max(np.percentile(pred_to_ref, HD_PERCENTILE), np.percentile(ref_to_pred, HD_PERCENTILE)))


def _nsd(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray, tolerance_mm: float) -> float:
    # a distance of exactly n voxels may come out of the EDT one rounding step above n * spacing (3 * 1.6 mm =
    # 4.800000000000001): a 1e-6 mm slack keeps such ties inside, as the formula means
    tolerance_mm += TIE_SLACK_MM
    within = int(np.count_nonzero(pred_to_ref <= tolerance_mm)) + int(np.count_nonzero(ref_to_pred <= tolerance_mm))
    return within / (pred_to_ref.size + ref_to_pred.size)


@dataclass(frozen=True)
class ClassMetrics:
    """All metrics of one class in one case.

    Attributes:
        tp_voxels, pred_voxels, ref_voxels: ``|P∩R|``, ``|P|``, ``|R|`` in voxels (for the pooled Dice).
        dice: per-case Dice (NaN when both masks are empty).
        hd95_mm: symmetric 95th-percentile Hausdorff distance in mm (NaN when either mask is empty).
        nsd: normalised surface Dice at ``nsd_tolerance_mm`` (0 with one side empty, NaN with both).
        volume_pred_ml, volume_ref_ml: volumes in mL.
        volume_diff_ml: ``pred - ref`` in mL (signed; positive = over-segmentation).
        volume_abs_diff_ml: ``|pred - ref|`` in mL.
        volume_rel_diff: ``(pred - ref) / ref`` (signed; NaN when the reference is empty).
    """

    tp_voxels: int
    pred_voxels: int
    ref_voxels: int
    dice: float
    hd95_mm: float
    nsd: float
    nsd_tolerance_mm: float
    volume_pred_ml: float
    volume_ref_ml: float
    volume_diff_ml: float
    volume_abs_diff_ml: float
    volume_rel_diff: float

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict (NaN kept as float NaN)."""
        return asdict(self)


def class_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Spacing, tolerance_mm: float) -> ClassMetrics:
    """Every metric of one class: Dice, HD95, NSD, volumes; surface distances computed once for HD95 and NSD.

    Args:
        pred, ref: boolean masks ``(I, J, K)`` of one class.
        spacing: voxel size in mm along ``(I, J, K)``.
        tolerance_mm: NSD tolerance in mm.
    """
    _check(pred, ref, spacing)
    _check_tolerance(tolerance_mm)
    box = bounding_box(pred, ref)
    if box is not None:  # everything below only needs the union box (plus its 1-voxel border)
        pred, ref = pred[box], ref[box]
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    tp = int(np.count_nonzero(pred & ref))
    voxel = voxel_ml(spacing)
    if n_pred and n_ref:
        pred_to_ref, ref_to_pred = surface_distances(pred, ref, spacing)
        hd, nsd = _hd(pred_to_ref, ref_to_pred), _nsd(pred_to_ref, ref_to_pred, tolerance_mm)
    else:
        hd = math.nan
        nsd = math.nan if not n_pred and not n_ref else 0.0
    vol_pred, vol_ref = n_pred * voxel, n_ref * voxel
    return ClassMetrics(
        tp_voxels=tp,
        pred_voxels=n_pred,
        ref_voxels=n_ref,
        dice=dice_from_counts(tp, n_pred, n_ref),
        hd95_mm=hd,
        nsd=nsd,
        nsd_tolerance_mm=float(tolerance_mm),
        volume_pred_ml=vol_pred,
        volume_ref_ml=vol_ref,
        volume_diff_ml=vol_pred - vol_ref,
        volume_abs_diff_ml=abs(vol_pred - vol_ref),
        volume_rel_diff=(vol_pred - vol_ref) / vol_ref if n_ref else math.nan,
    )


#: size bins of lesion-wise recall, by equivalent-sphere diameter in mm (upper bounds; the last is open)
LESION_SIZE_BINS_MM = (5.0, 10.0, 20.0)


@dataclass(frozen=True)
class Lesion:
    """One connected component: its volume, equivalent-sphere diameter and the fraction of its voxels that the
    other map labels (``covered``; for a reference lesion, counting only predicted lesions that are not false
    positives); ``hit`` when that fraction reaches the detection threshold."""

    volume_ml: float
    diameter_mm: float
    covered: float
    hit: bool


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise detection of one class in one case (connected components, 26-connectivity).

    A predicted lesion is a *false positive* when the reference covers less than ``min_overlap`` of its voxels.
    A reference lesion is *detected* when the predicted lesions that are not false positives cover at least
    ``min_overlap`` of its voxels: a prediction that floods the organ is one false positive and finds nothing
    (it would otherwise "find" every lesion it spills over). One prediction spanning two lesions finds both but
    is one predicted lesion; a lesion predicted in two pieces is found once and costs no false positive.
    """

    min_overlap: float
    reference: tuple[Lesion, ...]
    predicted: tuple[Lesion, ...]

    @property
    def detected(self) -> int:
        return sum(les.hit for les in self.reference)

    @property
    def false_positives(self) -> int:
        return sum(not les.hit for les in self.predicted)

    def counts(self) -> dict[str, int]:
        """``{"ref_lesions", "detected_lesions", "pred_lesions", "fp_lesions"}``."""
        return {"ref_lesions": len(self.reference), "detected_lesions": self.detected,
                "pred_lesions": len(self.predicted), "fp_lesions": self.false_positives}


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected component labels of ``mask`` and each component's voxel count (index 0: component 1)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return labels, np.bincount(labels.ravel(), minlength=n + 1)[1:]


def _lesions(labels: np.ndarray, sizes: np.ndarray, other: np.ndarray, voxel: float,
             min_overlap: float) -> tuple[Lesion, ...]:
    """Each component of ``labels`` with the fraction of its voxels that the boolean map ``other`` covers."""
    inside = np.bincount(labels[other], minlength=sizes.size + 1)[1:]
    out = []
    for size, hit_voxels in zip(sizes.tolist(), inside.tolist(), strict=True):
        volume, covered = size * voxel, hit_voxels / size
        out.append(Lesion(volume, (6.0 * volume * 1000.0 / math.pi) ** (1.0 / 3.0), covered, covered >= min_overlap))
    return tuple(out)


def lesion_detection(pred: np.ndarray, ref: np.ndarray, spacing: Spacing, min_overlap: float) -> LesionDetection:
    """Lesion-wise detection of one class (see :class:`LesionDetection`).

    Args:
        pred, ref: boolean masks ``(I, J, K)`` of one class.
        spacing: voxel size in mm along ``(I, J, K)`` (volumes and diameters).
        min_overlap: in ``(0, 1]``; the fraction of a lesion's voxels the other map must label for a hit.
    """
    _check(pred, ref, spacing)
    if not 0.0 < min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in (0, 1], got {min_overlap}")
    box = bounding_box(pred, ref)
    if box is not None:  # components never cross the union box's empty border
        pred, ref = pred[box], ref[box]
    voxel = voxel_ml(spacing)
    pred_labels, pred_sizes = _components(pred)
    predicted = _lesions(pred_labels, pred_sizes, ref, voxel, min_overlap)
    # only predicted lesions that are not false positives can find a reference lesion
    kept = np.asarray([False] + [les.hit for les in predicted])[pred_labels]
    ref_labels, ref_sizes = _components(ref)
    return LesionDetection(min_overlap, _lesions(ref_labels, ref_sizes, kept, voxel, min_overlap), predicted)


def pooled_detection(counts: Iterable[dict[str, int]]) -> dict[str, float | int]:
    """Lesion-wise detection pooled over cases, from their :meth:`LesionDetection.counts`: the totals
    (``reference``, ``detected``, ``predicted``, ``false_positives``), ``recall`` = detected / reference,
    ``precision`` = (predicted - false positives) / predicted and their ``f1``; NaN where a denominator is 0."""
    rows = list(counts)
    reference, detected = sum(c["ref_lesions"] for c in rows), sum(c["detected_lesions"] for c in rows)
    predicted, false_positives = sum(c["pred_lesions"] for c in rows), sum(c["fp_lesions"] for c in rows)
    recall = detected / reference if reference else math.nan
    precision = (predicted - false_positives) / predicted if predicted else math.nan
    if math.isnan(recall) or math.isnan(precision):
        f1 = math.nan
    else:
        f1 = 2 * recall * precision / (recall + precision) if recall + precision > 0 else 0.0
    return {"reference": reference, "detected": detected, "predicted": predicted, "false_positives": false_positives,
            "recall": recall, "precision": precision, "f1": f1}


def size_bin(diameter_mm: float) -> str:
    """The :data:`LESION_SIZE_BINS_MM` bin of a diameter: ``"<5mm"``, ``"5-10mm"``, ``"10-20mm"``, ``">=20mm"``."""
    low = 0.0
    for high in LESION_SIZE_BINS_MM:
        if diameter_mm < high:
            return f"<{high:g}mm" if low == 0.0 else f"{low:g}-{high:g}mm"
        low = high
    return f">={low:g}mm"


def size_bins() -> list[str]:
    """Every :func:`size_bin` name, smallest first."""
    return [size_bin(0.0)] + [size_bin(edge) for edge in LESION_SIZE_BINS_MM]
