"""Postprocessing of predicted label maps: the task rule (the organ keeps its largest connected component;
lesions must touch it) and the rules a training fits on its validation cases (:class:`PostprocessRules`,
chosen by :mod:`medsup.inference.postprocess_fit`; a model bundle carries them as ``postprocessing.json``).

Written for full-size CT on the host: work happens inside the bounding box of the region, component ids are
uint16 when they fit, and everything else goes slab by slab, so the peak is the label map, one boolean map
and one component map (``np.bincount`` or ``==`` on whole arrays would add int64 and boolean copies); where
the region is every foreground class (liver + tumour) the label map itself is labelled and the boolean map
is not made either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from medsup.evaluation.metrics import voxel_ml


def bincount_slabs(array: np.ndarray, length: int, chunk: int = 16) -> np.ndarray:
    """``np.bincount`` of a non-negative integer ``(I, J, K)`` array, slab by slab along K (``np.bincount``
    copies its input to int64 first: 8x a uint8 map). Values ``>= length`` are not counted."""
    counts = np.zeros(length, dtype=np.int64)
    for k in range(0, array.shape[2], chunk):
        counts += np.bincount(array[..., k:k + chunk].ravel(), minlength=length)[:length]
    return counts


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a mask (boolean, or any integer array: non-zero is foreground):
    ``(ids, count)``, ids uint16 when they fit, else int32."""
    structure = np.ones((3, 3, 3), bool)
    try:
        ids, n = ndimage.label(mask, structure=structure, output=np.uint16)
    except RuntimeError:  # more than 65535 components (noise): scipy refuses the narrow type
        ids, n = ndimage.label(mask, structure=structure, output=np.int32)
    return ids, int(n)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    ids, n = label_components(mask)
    if n <= 1:
        return mask
    sizes = bincount_slabs(ids, n + 1)
    sizes[0] = 0
    return np.asarray(ids == int(sizes.argmax()))


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (one slice per axis) holding every True (non-zero) voxel of a non-empty ``mask``."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def postprocess(labels: np.ndarray, organ_classes: Sequence[int], lesion_classes: Sequence[int],
                chunk: int = 16) -> np.ndarray:
    """Keep the largest connected component of organ-or-lesion; drop voxels of it that fell outside.

    Lesions are kept only where they are part of that component, i.e. inside the organ or touching it
    (nnU-Net's "largest component of foreground" rule, which is what it selects for LiTS). Modifies and
    returns ``labels`` (uint8 ``(X, Y, Z)``).
    """
    if not organ_classes:
        return labels
    classes = {*organ_classes, *lesion_classes}
    top = int(labels.max())
    if top == 0:
        return labels
    if classes >= set(range(1, top + 1)):
        # every foreground class is in the region (liver: organ + tumour): ``ndimage.label`` takes the uint8
        # map itself (non-zero = feature) and no boolean copy of the volume is made
        region = labels
    else:
        region = np.empty(labels.shape, dtype=bool)
        for k in range(0, labels.shape[2], chunk):  # slab by slab: ``labels == c`` would add a full boolean map
            part, out = labels[..., k:k + chunk], region[..., k:k + chunk]
            np.equal(part, organ_classes[0], out=out)
            for c in (*organ_classes[1:], *lesion_classes):
                out |= part == c
        if not region.any():
            return labels
    box = bounding_box(region)
    ids, n = label_components(region[box])
    del region  # ids != 0 is the region from here on
    if n <= 1:
        return labels
    sizes = bincount_slabs(ids, n + 1, chunk)
    sizes[0] = 0
    keep = int(sizes.argmax())
    inside = labels[box]  # a view: assignments land in ``labels``
    for k in range(0, ids.shape[2], chunk):
        part = ids[..., k:k + chunk]
        inside[..., k:k + chunk][(part != 0) & (part != keep)] = 0
    return labels


#: the file a model bundle carries its fitted rules in
RULES_FILE = "postprocessing.json"

KeepRule = Literal["all", "largest", "min_volume"]


@dataclass(frozen=True)
class LesionRule:
    """Which connected components of one lesion class survive: every one (``all``), the largest
    (``largest``, nnU-Net's per-class rule), or those of at least ``min_ml`` mL (``min_volume``; the floor
    is chosen as the volume of a sphere of ``min_diameter_mm``)."""

    keep: KeepRule = "all"
    min_ml: float = 0.0
    min_diameter_mm: float = 0.0

    def describe(self) -> str:
        """A short phrase for logs and reports."""
        if self.keep == "largest":
            return "largest component only"
        if self.keep == "min_volume":
            sphere = f" ({self.min_diameter_mm:g} mm sphere)" if self.min_diameter_mm else ""
            return f"components >= {self.min_ml:.3g} mL{sphere}"
        return "every component"


@dataclass(frozen=True)
class PostprocessRules:
    """What postprocessing does to one model's predictions.

    ``organ_component``: the task rule (organ-or-lesion keeps its largest component, see :func:`postprocess`).
    ``lesions``: a :class:`LesionRule` per lesion class value, applied after it; removed voxels become
    background. ``fit`` holds what the rules were chosen from (cases, Dice before and after) for reports.
    """

    organ_component: bool
    lesions: dict[int, LesionRule] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)

    def describe(self, names: dict[int, str]) -> str:
        """One line: ``organ component: yes; tumour: components >= 0.065 mL (5 mm sphere)``."""
        parts = [f"organ component: {'yes' if self.organ_component else 'no'}"]
        parts += [f"{names.get(c, c)}: {rule.describe()}" for c, rule in sorted(self.lesions.items())]
        return "; ".join(parts)

    def to_json(self, names: dict[int, str]) -> dict[str, Any]:
        """JSON form, lesion rules keyed by class name (``postprocessing.json``)."""
        return {"organ_component": self.organ_component,
                "lesions": {names[c]: {"keep": r.keep, "min_ml": r.min_ml, "min_diameter_mm": r.min_diameter_mm}
                            for c, r in sorted(self.lesions.items())},
                "fit": self.fit}

    @classmethod
    def from_json(cls, data: dict[str, Any], names: dict[int, str]) -> PostprocessRules:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: an unknown class name or rule, a negative floor, a missing key.
        """
        values = {name: value for value, name in names.items()}
        lesions = {}
        try:
            for name, rule in dict(data.get("lesions", {})).items():
                if name not in values:
                    raise ValueError(f"unknown class {name!r} (classes: {', '.join(values)})")
                keep, min_ml = str(rule["keep"]), float(rule.get("min_ml", 0.0))
                if keep not in ("all", "largest", "min_volume") or min_ml < 0:
                    raise ValueError(f"class {name!r}: unknown rule {keep!r} or negative min_ml {min_ml}")
                lesions[values[name]] = LesionRule(keep, min_ml, float(rule.get("min_diameter_mm", 0.0)))  # type: ignore[arg-type]
            return cls(bool(data["organ_component"]), lesions, dict(data.get("fit", {})))
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"malformed postprocessing rules ({type(err).__name__}: {err})") from None


def task_rules(organ_classes: Sequence[int]) -> PostprocessRules:
    """The rules of a model without fitted ones: the task rule when the task has an organ class."""
    return PostprocessRules(organ_component=bool(organ_classes))


def keep_components(labels: np.ndarray, value: int, rule: LesionRule, voxel: float,
                    chunk: int = 16) -> np.ndarray:
    """Apply one :class:`LesionRule` to class ``value`` of a uint8 ``(X, Y, Z)`` label map with ``voxel`` mL
    per voxel: the components it does not keep become background. Modifies and returns ``labels``."""
    if rule.keep == "all":
        return labels
    mask = labels == value
    if not mask.any():
        return labels
    box = bounding_box(mask)
    ids, n = label_components(mask[box])
    del mask
    sizes = bincount_slabs(ids, n + 1, chunk)[1:]
    kept = np.zeros(n, dtype=bool)
    if rule.keep == "largest":
        kept[int(sizes.argmax())] = True
    else:
        kept = sizes * voxel >= rule.min_ml
    if kept.all():
        return labels
    drop = np.concatenate([[False], ~kept])  # indexed by component id; id 0 is not this class
    inside = labels[box]  # a view: assignments land in ``labels``
    for k in range(0, ids.shape[2], chunk):
        inside[..., k:k + chunk][drop[ids[..., k:k + chunk]]] = 0
    return labels


def apply_rules(labels: np.ndarray, rules: PostprocessRules, organ_classes: Sequence[int],
                lesion_classes: Sequence[int], spacing: Sequence[float], chunk: int = 16) -> np.ndarray:
    """``rules`` on a uint8 ``(X, Y, Z)`` label map of voxel size ``spacing`` (mm): the organ rule first,
    then each lesion class's rule. Modifies and returns ``labels``."""
    if rules.organ_component:
        labels = postprocess(labels, organ_classes, lesion_classes, chunk)
    voxel = voxel_ml(spacing)
    for value, rule in sorted(rules.lesions.items()):
        labels = keep_components(labels, value, rule, voxel, chunk)
    return labels
