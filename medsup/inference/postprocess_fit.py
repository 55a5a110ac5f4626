"""Postprocessing chosen on the validation cases (nnU-Net's ``determine_postprocessing``, extended to lesions).

A rule is kept only when it raises the validation Dice, so a model whose raw output is already clean gets
no postprocessing at all:

1. The task rule (organ-or-lesion keeps its largest component), for tasks with an organ class: kept when the
   mean Dice over the foreground classes rises and no class's mean Dice falls (nnU-Net's defensive rule).
2. Then per lesion class, on what step 1 left: every component (no rule), only the largest (nnU-Net's
   per-class rule), or only components of at least the volume of a sphere of ``d`` mm for each ``d`` of
   ``postprocess.min_lesion_diameters_mm``. The candidate with the highest mean Dice of that class wins when
   it beats keeping everything; on a tie the gentler one (smaller floor, floors before "largest").
   Removing voxels of one class changes no other class's mask, so the classes are decided independently.

Dice is per case and averaged over the cases that have the class in prediction or reference (nnU-Net's
convention, :func:`medsup.evaluation.metrics.dice_from_counts`). The cases are reduced to counts as they are
predicted (:func:`case_stats`: voxel counts per class and, per lesion class, each predicted component's size
and overlap with the reference), so every candidate floor is scored without keeping a single prediction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsup.evaluation.metrics import dice_from_counts, voxel_ml
from medsup.inference.postprocess import (
    RULES_FILE,
    LesionRule,
    PostprocessRules,
    bincount_slabs,
    bounding_box,
    label_components,
    postprocess,
)
from medsup.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class Components:
    """The predicted components of one lesion class in one case: voxel count and reference-covered voxel
    count of each (``(n,)`` int64 each), and the class's reference voxel count."""

    sizes: np.ndarray
    overlaps: np.ndarray
    reference: int

    def counts(self, kept: np.ndarray) -> tuple[int, int, int]:
        """``(tp, predicted, reference)`` voxels when only the components where ``kept`` (bool ``(n,)``) stay."""
        return int(self.overlaps[kept].sum()), int(self.sizes[kept].sum()), self.reference


@dataclass
class CaseStats:
    """What the fit needs of one validation case, for the raw prediction and after the task rule."""

    case: str
    voxel_ml: float
    counts: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)  # variant -> per foreground class
    components: dict[str, dict[int, Components]] = field(default_factory=dict)  # variant -> lesion class ->


def _components(pred: np.ndarray, ref: np.ndarray, value: int) -> Components:
    mask = pred == value
    reference = int(np.count_nonzero(ref == value))
    if not mask.any():
        return Components(np.zeros(0, np.int64), np.zeros(0, np.int64), reference)
    box = bounding_box(mask)
    ids, n = label_components(mask[box])
    sizes = bincount_slabs(ids, n + 1)[1:]
    overlaps = np.bincount(ids[ref[box] == value], minlength=n + 1)[1:].astype(np.int64)
    return Components(sizes, overlaps, reference)


def _counts(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int]) -> list[tuple[int, int, int]]:
    out = []
    for c in classes:
        p, g = pred == c, ref == c
        out.append((int(np.count_nonzero(p & g)), int(np.count_nonzero(p)), int(np.count_nonzero(g))))
    return out


def case_stats(case: str, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], task: Task) -> CaseStats:
    """Reduce one case to the counts the fit scores candidates with.

    Args:
        pred: raw (not postprocessed) uint8 label map ``(X, Y, Z)``; ``ref``: the reference on the same grid.
        spacing: voxel size in mm.
    """
    stats = CaseStats(case, voxel_ml(spacing))
    variants = {"raw": pred}
    if task.organ_classes:
        variants["organ"] = postprocess(pred.copy(), task.organ_classes, task.lesion_classes)
    for name, labels in variants.items():
        stats.counts[name] = _counts(labels, ref, task.foreground)
        stats.components[name] = {c: _components(labels, ref, c) for c in task.lesion_classes}
    return stats


def _mean(values: Iterable[float]) -> float:
    """Mean over the defined values (NaN: the class is in neither map); NaN when none is defined."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _class_means(stats: list[CaseStats], variant: str, n_classes: int) -> list[float]:
    return [_mean(dice_from_counts(*s.counts[variant][i]) for s in stats) for i in range(n_classes)]


def _better(new: float, old: float) -> bool:
    """Strictly better by more than rounding; a defined Dice beats an undefined one."""
    if math.isnan(new):
        return False
    return math.isnan(old) or new > old + 1e-9


def _candidates(diameters_mm: Sequence[float]) -> list[tuple[str, LesionRule]]:
    out = []
    for d in sorted(diameters_mm):
        out.append((f"min {d:g} mm", LesionRule("min_volume", math.pi * d ** 3 / 6.0 / 1000.0, float(d))))
    out.append(("largest", LesionRule("largest")))
    return out


def _kept(components: Components, rule: LesionRule, voxel: float) -> np.ndarray:
    if rule.keep == "largest":
        kept = np.zeros(components.sizes.size, dtype=bool)
        if kept.size:
            kept[int(components.sizes.argmax())] = True
        return kept
    return components.sizes * voxel >= rule.min_ml


def fit_rules(stats: list[CaseStats], task: Task, diameters_mm: Sequence[float]) -> PostprocessRules:
    """Choose the rules (module docstring) from the validation cases' :func:`case_stats`.

    The result's ``fit`` records the cases, every candidate's mean Dice, and each class's mean Dice before
    (raw) and after the chosen rules.
    """
    names = [task.labels[c] for c in task.foreground]
    if not stats:
        return PostprocessRules(organ_component=bool(task.organ_classes), fit={"cases": 0})
    raw = _class_means(stats, "raw", len(names))
    organ = False
    variant = "raw"
    after = list(raw)
    fit: dict[str, Any] = {"cases": len(stats), "candidates": {}}
    if task.organ_classes:
        pp = _class_means(stats, "organ", len(names))
        fg_raw, fg_pp = _mean(raw), _mean(pp)
        worse = [n for n, a, b in zip(names, raw, pp, strict=True) if not math.isnan(a) and (math.isnan(b) or b < a)]
        organ = _better(fg_pp, fg_raw) and not worse
        fit["candidates"]["organ component"] = {"foreground": fg_pp, "raw foreground": fg_raw,
                                                **dict(zip(names, pp, strict=True))}
        if organ:
            variant, after = "organ", pp
    lesions: dict[int, LesionRule] = {}
    for c in task.lesion_classes:
        i = task.foreground.index(c)
        base = after[i]
        scores = {}
        best_label, best_rule, best = "every component", LesionRule("all"), base
        for label, rule in _candidates(diameters_mm):
            score = _mean(dice_from_counts(*s.components[variant][c].counts(
                _kept(s.components[variant][c], rule, s.voxel_ml))) for s in stats)
            scores[label] = score
            if _better(score, best):
                best_label, best_rule, best = label, rule, score
        fit["candidates"][names[i]] = {"every component": base, **scores}
        if best_rule.keep != "all":
            lesions[c] = best_rule
            after[i] = best
        log.info("postprocessing fit, %s: %s (mean Dice %.4f -> %.4f over %d cases)", names[i], best_label,
                 base, best, len(stats))
    fit["dice_before"] = dict(zip(names, raw, strict=True))
    fit["dice_after"] = dict(zip(names, after, strict=True))
    return PostprocessRules(organ_component=organ, lesions=lesions, fit=fit)


def fit_bundle(bundle_dir: Path, cases: Sequence[tuple[Path, Path]], device: Any,
               diameters_mm: Sequence[float]) -> PostprocessRules:
    """Predict ``cases`` (``(image, label)`` paths, the validation set) on their own grids with the bundle in
    ``bundle_dir`` exactly as ``medsup infer`` would, but without postprocessing, fit the rules on them and
    write them into the bundle (``postprocessing.json``, atomically). A case that cannot be read or whose
    label grid differs from its image is left out with an error in the log.

    Returns:
        The fitted rules (also when no case could be used: the task rule, ``fit["cases"] == 0``).
    """
    import json

    import torch

    from medsup.data.files import atomic_path
    from medsup.data.io import ImageReadError, read_image
    from medsup.inference.bundle import load_bundle
    from medsup.inference.predictor import CaseError, Predictor
    from medsup.tasks import get_task

    bundle = load_bundle(bundle_dir)
    task = get_task(bundle.cfg.task)
    predictor = Predictor(bundle, torch.device(device), Predictor.options_from(bundle, postprocess=False))
    stats = []
    for image, label in cases:
        try:
            prediction = predictor.predict(predictor.prepare(image))
            ref = read_image(label)
            problems = prediction.geometry.mismatches(ref.geometry, bundle.cfg.data.geometry_tolerance)
            if problems:
                raise CaseError(f"{label}: its grid differs from its image's ({'; '.join(problems)})")
        except (CaseError, ImageReadError) as err:
            log.error("postprocessing fit: %s left out (%s)", image, err)
            continue
        stats.append(case_stats(str(image), prediction.labels, np.asarray(ref.array), ref.geometry.spacing, task))
    rules = fit_rules(stats, task, diameters_mm)
    with atomic_path(Path(bundle_dir) / RULES_FILE) as tmp:
        tmp.write_text(json.dumps(rules.to_json(bundle.labels), indent=2) + "\n", encoding="utf-8")
    log.info("postprocessing fitted on %d validation case(s): %s", len(stats), rules.describe(bundle.labels))
    return rules
