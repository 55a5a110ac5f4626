"""Postprocessing chosen on the validation cases (nnU-Net's ``determine_postprocessing``, extended to lesions).

A rule is kept only when it raises the validation Dice and finds no fewer lesions, so a model whose raw
output is already clean gets no postprocessing at all:

1. The task rule (organ-or-lesion keeps its largest component), for tasks with an organ class: kept when the
   mean Dice over the foreground classes rises, no class's mean Dice falls (nnU-Net's defensive rule) and
   no lesion class loses a detected lesion.
2. Then per lesion class, on what step 1 left: every component (no rule), only the largest (nnU-Net's
   per-class rule), or only components of at least the volume of a sphere of ``d`` mm for each ``d`` of
   ``postprocess.min_lesion_diameters_mm``. Eligible are the candidates that detect as many of the
   validation lesions as keeping everything does (``medsup evaluate``'s lesion-wise detection,
   ``evaluate.lesion_min_overlap``) and that fit every reference lesion of the validation cases, found or
   not: a floor no larger than the smallest of them, "largest only" when no case holds two. Nodules come
   several to a chest, and "largest only" raises the Dice of a model that sprinkles false positives while
   it throws away every second nodule; and a floor fitted to the big nodules a weak model happens to find
   removes the small ones of the next scan. Of the eligible, the highest mean Dice of that class wins when
   it beats keeping everything; on a tie the gentler one (smaller floor, floors before "largest").
   Removing voxels of one class changes no other class's mask, so the classes are decided independently.

Dice is per case and averaged over the cases that have the class in prediction or reference (nnU-Net's
convention, :func:`medsup.evaluation.metrics.dice_from_counts`). The cases are reduced to counts as they are
predicted (:func:`case_stats`: voxel counts per class and, per lesion class, each predicted component's size
and the voxels it shares with each reference lesion), so every candidate is scored without keeping a single
prediction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsup.evaluation.metrics import bounding_box as union_box
from medsup.evaluation.metrics import dice_from_counts, overlap_counts, pooled_detection, voxel_ml
from medsup.inference.postprocess import (
    RULES_FILE,
    LesionRule,
    PostprocessRules,
    bincount_slabs,
    label_components,
    postprocess,
)
from medsup.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class Components:
    """The predicted components of one lesion class in one case and how they meet the reference lesions.

    ``sizes``, ``overlaps``: ``(n,)`` voxels of each predicted component, and how many of them the reference
    labels; ``reference``: the class's reference voxels; ``ref_sizes``: ``(m,)`` voxels of each reference
    lesion; ``pairs``: ``(k, 3)`` rows (predicted component, reference lesion, voxels they share).
    """

    sizes: np.ndarray
    overlaps: np.ndarray
    reference: int
    ref_sizes: np.ndarray
    pairs: np.ndarray

    def counts(self, kept: np.ndarray) -> tuple[int, int, int]:
        """``(tp, predicted, reference)`` voxels when only the components where ``kept`` (bool ``(n,)``) stay."""
        return int(self.overlaps[kept].sum()), int(self.sizes[kept].sum()), self.reference

    def detection(self, kept: np.ndarray, min_overlap: float) -> dict[str, int]:
        """:meth:`medsup.evaluation.metrics.LesionDetection.counts` when only the ``kept`` components stay: a
        component is a false positive when the reference covers less than ``min_overlap`` of it; a reference
        lesion is detected when kept components that are not false positives cover at least that much of it."""
        hit = self.overlaps / np.maximum(self.sizes, 1) >= min_overlap
        use = (kept & hit)[self.pairs[:, 0]]
        covered = np.bincount(self.pairs[use, 1], weights=self.pairs[use, 2], minlength=self.ref_sizes.size)
        detected = int(np.count_nonzero(covered / np.maximum(self.ref_sizes, 1) >= min_overlap))
        return {"ref_lesions": int(self.ref_sizes.size), "detected_lesions": detected,
                "pred_lesions": int(kept.sum()), "fp_lesions": int((kept & ~hit).sum())}


@dataclass
class CaseStats:
    """What the fit needs of one validation case, for the raw prediction and after the task rule."""

    case: str
    voxel_ml: float
    counts: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)  # variant -> per foreground class
    components: dict[str, dict[int, Components]] = field(default_factory=dict)  # variant -> lesion class ->


def _components(pred: np.ndarray, ref: np.ndarray, value: int) -> Components:
    p, g = pred == value, ref == value
    box = union_box(p, g)  # components never cross the union box's empty border
    if box is None:
        empty = np.zeros(0, np.int64)
        return Components(empty, empty, 0, empty, np.zeros((0, 3), np.int64))
    pid, n = label_components(p[box])
    rid, m = label_components(g[box])
    sizes, ref_sizes = bincount_slabs(pid, n + 1)[1:], bincount_slabs(rid, m + 1)[1:]
    both = (pid != 0) & (rid != 0)
    key, shared = np.unique(pid[both].astype(np.int64) * (m + 1) + rid[both], return_counts=True)
    pairs = np.stack([key // (m + 1) - 1, key % (m + 1) - 1, shared], axis=1).astype(np.int64)
    overlaps = np.bincount(pairs[:, 0], weights=pairs[:, 2], minlength=n).astype(np.int64)
    return Components(sizes, overlaps, int(ref_sizes.sum()), ref_sizes, pairs)


def case_stats(case: str, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], task: Task) -> CaseStats:
    """Reduce one case to the counts the fit scores candidates with.

    Args:
        pred: raw (not postprocessed) uint8 label map ``(X, Y, Z)``; ``ref``: the reference on the same grid.
        spacing: voxel size in mm.
    """
    stats = CaseStats(case, voxel_ml(spacing))
    # everything happens inside the box holding every labelled voxel of either map (plus 1): on a full-size CT
    # the comparisons below then cost the size of the body part, not of the scan
    box = union_box(pred != 0, ref != 0)
    if box is not None:
        pred, ref = pred[box], ref[box]
    variants = {"raw": pred}
    if task.organ_classes:
        variants["organ"] = postprocess(pred.copy(), task.organ_classes, task.lesion_classes)
    for name, labels in variants.items():
        stats.counts[name] = overlap_counts(labels, ref, task.foreground)
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


def _reference_lesions(stats: list[CaseStats], c: int) -> tuple[float, int]:
    """The smallest reference lesion of class ``c`` over the cases in mL (0 when there is none: no floor
    is safe) and the most lesions of that class any one case holds."""
    volumes = [float(s.components["raw"][c].ref_sizes.min()) * s.voxel_ml for s in stats
               if s.components["raw"][c].ref_sizes.size]
    return min(volumes, default=0.0), max(s.components["raw"][c].ref_sizes.size for s in stats)


def _every(components: Components) -> np.ndarray:
    return np.ones(components.sizes.size, dtype=bool)


def _score(stats: list[CaseStats], variant: str, c: int, min_overlap: float,
           rule: LesionRule | None = None) -> dict[str, float]:
    """Mean Dice of lesion class ``c`` and its pooled lesion-wise detection when ``rule`` (None: keep every
    component) is applied to each case's ``variant``."""
    dices, detections = [], []
    for s in stats:
        comp = s.components[variant][c]
        kept = _every(comp) if rule is None else _kept(comp, rule, s.voxel_ml)
        dices.append(dice_from_counts(*comp.counts(kept)))
        detections.append(comp.detection(kept, min_overlap))
    pooled = pooled_detection(detections)
    return {"dice": _mean(dices), "detected": float(pooled["detected"]), "recall": float(pooled["recall"]),
            "precision": float(pooled["precision"]), "fp_per_case": pooled["false_positives"] / len(stats)}


def fit_rules(stats: list[CaseStats], task: Task, diameters_mm: Sequence[float],
              min_overlap: float = 0.1) -> PostprocessRules:
    """Choose the rules (module docstring) from the validation cases' :func:`case_stats`.

    ``min_overlap`` is the lesion-detection threshold (``evaluate.lesion_min_overlap``). The result's ``fit``
    records the cases, every candidate's mean Dice (and, for lesion classes, its lesion recall, precision and
    false positives per case), and each class's mean Dice before (raw) and after the chosen rules.
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
        found = {v: {c: _score(stats, v, c, min_overlap)["detected"] for c in task.lesion_classes}
                 for v in ("raw", "organ")}
        lost = [task.labels[c] for c in task.lesion_classes if found["organ"][c] < found["raw"][c]]
        organ = _better(fg_pp, fg_raw) and not worse and not lost
        fit["candidates"]["organ component"] = {"foreground": fg_pp, "raw foreground": fg_raw,
                                                **dict(zip(names, pp, strict=True)), "lesions lost in": lost}
        if organ:
            variant, after = "organ", pp
    lesions: dict[int, LesionRule] = {}
    for c in task.lesion_classes:
        i = task.foreground.index(c)
        base = _score(stats, variant, c, min_overlap)
        scores = {"every component": base}
        best_label, best_rule, best = "every component", LesionRule("all"), base
        smallest, most = _reference_lesions(stats, c)
        for label, rule in _candidates(diameters_mm):
            scores[label] = score = _score(stats, variant, c, min_overlap, rule)
            # a rule may drop false positives, never a lesion the model found, and it must fit every lesion
            # the validation cases hold, found or not: those the model missed are the ones the next model finds
            fits = rule.min_ml <= smallest if rule.keep == "min_volume" else most <= 1
            if fits and score["detected"] >= base["detected"] and _better(score["dice"], best["dice"]):
                best_label, best_rule, best = label, rule, score
        fit["candidates"][names[i]] = scores
        fit.setdefault("reference_lesions", {})[names[i]] = {"smallest_ml": smallest, "most_per_case": most}
        if best_rule.keep != "all":
            lesions[c] = best_rule
            after[i] = best["dice"]
        log.info("postprocessing fit, %s: %s (mean Dice %.4f -> %.4f, lesion recall %.3f -> %.3f, false positives "
                 "per case %.2f -> %.2f over %d cases)", names[i], best_label, base["dice"], best["dice"],
                 base["recall"], best["recall"], base["fp_per_case"], best["fp_per_case"], len(stats))
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
    import torch

    from medsup.data.files import write_json
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
    rules = fit_rules(stats, task, diameters_mm, bundle.cfg.evaluate.lesion_min_overlap)
    write_json(Path(bundle_dir) / RULES_FILE, rules.to_json(bundle.labels))  # NaN Dice (nothing to score) -> null
    log.info("postprocessing fitted on %d validation case(s): %s", len(stats), rules.describe(bundle.labels))
    return rules


def fit_model(model: Path, data: Path, fold: int | None = None,
              device: str = "auto") -> tuple[PostprocessRules, dict[int, str]]:
    """``medsup postprocess``: fit the rules of the bundle folder ``model`` on the validation cases of its fold
    (``fold`` overrides the bundle's ``data.fold``) of the dataset ``data``, the split ``medsup train`` made
    with the bundle's config, and write them into it. For bundles trained without the fit
    (``postprocess.fit=false``, or before it existed), or to refit on the whole fold when training validated
    on ``train.val_max_cases`` of it.

    Returns:
        The rules and the bundle's label map (class value -> name).

    Raises:
        BundleError: ``model`` is not a bundle folder (a registry model is refused: fit the run's folder).
        FileNotFoundError, ValueError: no dataset at ``data``, no labelled case, an unknown device or fold.
    """
    from medsup.data.splits import fold_cases
    from medsup.device import resolve_device
    from medsup.inference.bundle import BundleError, load_bundle

    bundle = load_bundle(model)
    folder = Path(bundle.source)
    if not (folder.is_dir() and (folder / "weights.pt").is_file()):
        raise BundleError(f"{model}: postprocessing is fitted into a bundle folder (a run's model/), "
                          "not a checkpoint file")
    cfg = bundle.cfg
    if fold is not None:
        if not 0 <= fold < cfg.data.num_folds:
            raise ValueError(f"--fold {fold}: the model was trained with {cfg.data.num_folds} folds")
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"fold": fold})})
    val = fold_cases(data, cfg)["val"]
    if not val:
        raise ValueError(f"{data}: fold {cfg.data.fold} has no validation cases")
    cases = [(Path(c["image"]), Path(c["label"])) for c in val]
    if not cfg.infer.postprocess:
        log.warning("%s was trained with infer.postprocess=false: `medsup infer` applies the fitted rules only "
                    "with --postprocess", folder)
    return fit_bundle(folder, cases, resolve_device(device), cfg.postprocess.min_lesion_diameters_mm), bundle.labels
