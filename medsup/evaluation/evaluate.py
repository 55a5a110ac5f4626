"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Pairing. Files pair by case name, the rule the datalist uses: the image suffix is removed and so is a
``_NNNN`` channel suffix (``case7_0000.nii.gz`` and ``case7.nrrd`` are both case ``case7``; ``medsup infer``
names its outputs ``case7.nii.gz``). A reference without a prediction is a *missing* case (a failure); a
prediction without a reference is listed and ignored; probability maps written by ``medsup infer
--probabilities`` (``<case>_prob_<class>``) are skipped.

Per case. Both files are read with their exact geometry and reoriented identically (``data.orientation``,
axis permutations and flips only). Geometry that still differs (shape, spacing, origin, direction beyond
``data.geometry_tolerance``) is an *error* for that case naming the mismatch, never a resample. Then, per
foreground class of the task, :func:`medsup.evaluation.metrics.class_metrics` (Dice, HD95, NSD, volumes),
inside the bounding box of everything labelled in either map; per lesion class of the task (tumours, nodules),
lesion-wise detection too (:func:`medsup.evaluation.metrics.lesion_detection`: connected components, a hit
when ``evaluate.lesion_min_overlap`` of a lesion's voxels are covered by the other map's lesions).

Aggregates per class, over the cases evaluated without error (missing and failed cases are counted, not
scored): mean, median, population std (ddof=0) and n over the non-NaN values, and the pooled ("global")
Dice ``2 sum(TP) / (sum|P| + sum|R|)`` over all evaluated cases, which is a different number from the mean of
per-case Dice; for lesion classes the pooled lesion recall, precision, F1 and false positives per case, and the
recall by lesion size. :data:`CONVENTIONS` states it all; it is written into ``summary.json``.

Outputs (atomic): ``OUT/metrics.csv`` (one row per case and class) and ``OUT/summary.json``.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from medsup.config import Config
from medsup.data.datalist import LABEL_DIRS, case_id_of
from medsup.data.files import atomic_path, finite_or_none, write_json
from medsup.data.io import ImageReadError, is_image_path, read_image
from medsup.evaluation.metrics import (
    HD_PERCENTILE,
    ClassMetrics,
    LesionDetection,
    bounding_box,
    class_metrics,
    dice_from_counts,
    lesion_detection,
    pooled_detection,
    size_bin,
    size_bins,
)
from medsup.tasks import get_task

log = logging.getLogger(__name__)

METRICS = ("dice", "hd95_mm", "nsd", "volume_diff_ml", "volume_abs_diff_ml", "volume_rel_diff")
CSV_COLUMNS = ("case", "class", "label", "status", "dice", "hd95_mm", "nsd", "nsd_tolerance_mm",
               "volume_pred_ml", "volume_ref_ml", "volume_diff_ml", "volume_abs_diff_ml", "volume_rel_diff",
               "tp_voxels", "pred_voxels", "ref_voxels", "ref_lesions", "detected_lesions", "pred_lesions",
               "fp_lesions", "prediction", "reference", "error")

CONVENTIONS: dict[str, str] = {
    "dice": "per case 2|P∩R|/(|P|+|R|); reference and prediction both empty -> NaN (null), excluded from the "
            "aggregates (nnU-Net); reference empty but prediction not (or the reverse) -> 0",
    "dice.global": "pooled over all evaluated cases: 2*sum(TP)/(sum|P|+sum|R|); NOT the mean of per-case Dice",
    "hd95_mm": "symmetric 95th-percentile Hausdorff distance in mm (max of the two directed 95th percentiles, "
               "as MONAI) between surface voxels (mask minus its 6-connected erosion), physical spacing; either "
               "side empty -> NaN (null), counted in n_undefined",
    "nsd": "normalised surface Dice: fraction of both surfaces' voxels within the class tolerance (mm) of the "
           "other surface; exactly one side empty -> 0; both empty -> NaN (null)",
    "volume": "mL; volume_diff_ml = pred - ref (signed), volume_abs_diff_ml = |pred - ref|, "
              "volume_rel_diff = (pred - ref)/ref (NaN when the reference is empty)",
    "lesions": "lesion classes only: 26-connected components of each map; a predicted lesion is a false positive "
               "when the reference covers < lesion_min_overlap of its voxels, a reference lesion is detected when "
               "the predicted lesions that are not false positives cover >= lesion_min_overlap of its voxels; "
               "pooled over the ok cases: recall = "
               "detected / reference lesions, precision = (predicted - false positives) / predicted lesions, "
               "F1 of the two, fp_per_case; recall by equivalent-sphere diameter (6V/pi)^(1/3); NaN (null) "
               "where a denominator is 0",
    "aggregates": "per class over cases with status ok: mean, median, std (population, ddof=0) and n over "
                  "non-NaN values; n_nan counts the NaN ones; missing and error cases are counted, not scored",
    "json": "NaN is written as null",
}

_PROB_MAP = re.compile(r"^(?P<case>.+)_prob_(?P<name>[^_]+)$")


@dataclass
class CaseResult:
    """One case: its files, status (``ok``, ``missing`` or ``error``) and per-class metrics."""

    case: str
    status: str
    prediction: str | None = None
    reference: str | None = None
    error: str | None = None
    classes: dict[str, ClassMetrics] = field(default_factory=dict)
    lesions: dict[str, LesionDetection] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    spacing: list[float] | None = None
    shape: list[int] | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN -> None)."""
        return {
            "case": self.case, "status": self.status, "prediction": self.prediction, "reference": self.reference,
            "error": self.error, "warnings": self.warnings, "shape": self.shape, "spacing": self.spacing,
            "seconds": round(self.seconds, 4),
            "classes": {name: finite_or_none(m.as_dict()) for name, m in self.classes.items()},
            "lesions": {name: _lesion_dict(d) for name, d in self.lesions.items()},
        }


def _lesion_dict(d: LesionDetection) -> dict[str, Any]:
    """Counts, the reference lesions one by one, and the false positives' total volume (a noisy prediction may
    hold thousands of specks: they are counted, not listed)."""
    return {**d.counts(), "min_overlap": d.min_overlap,
            "fp_volume_ml": sum(les.volume_ml for les in d.predicted if not les.hit),
            "reference": [{"volume_ml": les.volume_ml, "diameter_mm": les.diameter_mm, "covered": les.covered,
                           "detected": les.hit} for les in d.reference]}


@dataclass
class EvaluationResult:
    """Everything ``medsup evaluate`` produced: per-case results, the summary and the files written."""

    cases: list[CaseResult]
    summary: dict[str, Any]
    metrics_csv: Path
    summary_json: Path

    @property
    def failed(self) -> list[CaseResult]:
        """Cases that are missing or could not be evaluated."""
        return [c for c in self.cases if c.status != "ok"]

    def flat_metrics(self) -> dict[str, float]:
        """Aggregates as ``{"eval.dice.liver.mean": x, "eval.dice.liver.global": y, ...}`` (finite values only)."""
        out: dict[str, float] = {}
        for name, block in self.summary["classes"].items():
            for metric, stats in block.items():
                if not isinstance(stats, dict):
                    continue
                short = metric.removesuffix("_mm")
                for stat, value in stats.items():
                    if stat == "min_overlap":  # a setting (summary.json's settings), not a result
                        continue
                    if isinstance(value, int | float) and math.isfinite(value):
                        out[f"eval.{short}.{name}.{stat}"] = float(value)
        for key, value in self.summary["counts"].items():
            out[f"eval.cases.{key}"] = float(value)
        return out


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_image_path(p))


def reference_folder(ref: Path) -> Path:
    """``ref`` itself, or its label folder (``labelsTr``, ``labels`` ...) when ``ref`` is a dataset root."""
    ref = Path(ref)
    if not ref.is_dir():
        raise FileNotFoundError(f"{ref}: reference folder does not exist")
    if not _files(ref):
        for name in LABEL_DIRS:
            if (ref / name).is_dir():
                log.info("references: using %s", ref / name)
                return ref / name
    return ref


def pair_files(pred_dir: Path, ref_dir: Path, class_names: set[str]) -> tuple[list[CaseResult], list[str]]:
    """Pair predictions and references by case name.

    Returns:
        ``(cases, unmatched)``: one pending (status ``"pending"``), ``"missing"`` or ``"error"`` (two files for
        one case) :class:`CaseResult` per reference case, sorted by case name; and the prediction files that have
        no reference.
    """
    preds: dict[str, list[Path]] = {}
    all_preds = _files(pred_dir)
    names = {case_id_of(p)[0] for p in all_preds}
    for path in all_preds:
        case = case_id_of(path)[0]
        prob = _PROB_MAP.match(case)
        if prob and prob["name"] in class_names and prob["case"] in names:
            log.debug("%s: probability map, skipped", path)
            continue
        preds.setdefault(case, []).append(path)
    refs: dict[str, list[Path]] = {}
    for path in _files(ref_dir):
        refs.setdefault(case_id_of(path)[0], []).append(path)
    cases = []
    for case in sorted(refs):
        found = preds.get(case, [])
        ref_paths = refs[case]
        result = CaseResult(case, "pending", prediction=str(found[0]) if found else None, reference=str(ref_paths[0]))
        if len(ref_paths) > 1 or len(found) > 1:
            result.status = "error"
            result.error = f"{case}: more than one file for this case: {', '.join(str(p) for p in ref_paths + found)}"
        elif not found:
            result.status = "missing"
            result.error = f"{case}: no prediction in {pred_dir} for reference {ref_paths[0]}"
        cases.append(result)
    unmatched = [str(p) for case in sorted(preds) if case not in refs for p in preds[case]]
    return cases, unmatched


def _labels(array: np.ndarray, path: str) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return array
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.rint(array)):
        raise ValueError(f"{path}: not a label map (voxel values are not whole numbers)")
    return array.astype(np.int64)


def evaluate_case(case: CaseResult, cfg: Config) -> CaseResult:
    """Read one pair and fill in its per-class metrics (``status`` becomes ``ok`` or ``error``)."""
    task = get_task(cfg.task)
    started = time.perf_counter()
    if case.prediction is None or case.reference is None:
        raise ValueError(f"{case.case}: needs both a prediction and a reference file")
    try:
        pred = read_image(case.prediction, cfg.data.orientation)
        ref = read_image(case.reference, cfg.data.orientation)
        problems = pred.geometry.mismatches(ref.geometry, cfg.data.geometry_tolerance)
        if problems:
            raise ValueError(f"{case.case}: prediction and reference grids differ (prediction vs reference: "
                             f"{'; '.join(problems)}); "
                             "no resampling is done: write predictions on the reference grid")
        pred_labels, ref_labels = _labels(pred.array, case.prediction), _labels(ref.array, case.reference)
    except (ImageReadError, ValueError) as err:
        case.status, case.error = "error", str(err)
        case.seconds = time.perf_counter() - started
        log.error("%s", case.error)
        return case
    spacing = ref.geometry.spacing
    case.spacing, case.shape = list(spacing), list(ref.geometry.shape)
    # everything below happens inside the box holding every labelled voxel of either map (plus 1 voxel)
    box = bounding_box(pred_labels != 0, ref_labels != 0)
    if box is not None:
        pred_labels, ref_labels = pred_labels[box], ref_labels[box]
    for what, labels in (("prediction", pred_labels), ("reference", ref_labels)):
        unknown = sorted(set(np.unique(labels).tolist()) - set(task.labels))
        if unknown:
            case.warnings.append(f"{what} holds label values {unknown} unknown to task {task.name}; ignored")
            log.warning("%s: %s", case.case, case.warnings[-1])
    for value in task.foreground:
        name = task.labels[value]
        pred_mask, ref_mask = pred_labels == value, ref_labels == value
        case.classes[name] = class_metrics(pred_mask, ref_mask, spacing, cfg.evaluate.nsd_tolerance_mm[name])
        if value in task.lesion_classes:
            case.lesions[name] = lesion_detection(pred_mask, ref_mask, spacing, cfg.evaluate.lesion_min_overlap)
    case.status = "ok"
    case.seconds = time.perf_counter() - started
    return case


def _stats(values: list[float]) -> dict[str, float | int]:
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if finite.size == 0:
        return {"mean": math.nan, "median": math.nan, "std": math.nan, "n": 0, "n_nan": len(values)}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)), "std": float(finite.std()),
            "n": int(finite.size), "n_nan": len(values) - int(finite.size)}


def aggregate(cases: list[CaseResult], class_names: list[str]) -> dict[str, dict[str, Any]]:
    """Per-class aggregates over the ``ok`` cases (see :data:`CONVENTIONS`)."""
    out: dict[str, dict[str, Any]] = {}
    done = [c for c in cases if c.status == "ok"]
    for name in class_names:
        rows = [c.classes[name] for c in done]
        block: dict[str, Any] = {metric: _stats([getattr(r, metric) for r in rows]) for metric in METRICS}
        block["dice"]["global"] = dice_from_counts(sum(r.tp_voxels for r in rows), sum(r.pred_voxels for r in rows),
                                                   sum(r.ref_voxels for r in rows))
        block["hd95_mm"]["n_undefined"] = block["hd95_mm"].pop("n_nan")
        block["nsd_tolerance_mm"] = rows[0].nsd_tolerance_mm if rows else None
        detections = [c.lesions[name] for c in done if name in c.lesions]
        if detections:
            block["lesions"] = _lesion_aggregate(detections)
        out[name] = block
    return out


def _lesion_aggregate(detections: list[LesionDetection]) -> dict[str, Any]:
    """Pooled lesion-wise detection over cases (see :data:`CONVENTIONS` ``lesions``)."""
    by_size: dict[str, dict[str, float | int]] = {}
    for b in size_bins():
        lesions = [les for d in detections for les in d.reference if size_bin(les.diameter_mm) == b]
        hits = sum(les.hit for les in lesions)
        by_size[b] = {"reference": len(lesions), "detected": hits,
                      "recall": hits / len(lesions) if lesions else math.nan}
    pooled = pooled_detection(d.counts() for d in detections)
    return {**pooled, "fp_per_case": pooled["false_positives"] / len(detections),
            "min_overlap": detections[0].min_overlap, "by_size": by_size}


def _fmt(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return repr(value) if isinstance(value, float) else str(value)


def write_csv(path: Path, cases: list[CaseResult], task_labels: dict[str, int]) -> Path:
    """One row per case and class (cases that were not scored get empty metric cells); written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for case in cases:
            for name, label in task_labels.items():
                row: dict[str, str] = {"case": case.case, "class": name, "label": str(label), "status": case.status,
                                       "prediction": case.prediction or "", "reference": case.reference or "",
                                       "error": case.error or ""}
                if name in case.classes:
                    row.update({k: _fmt(v) for k, v in case.classes[name].as_dict().items()})
                if name in case.lesions:
                    row.update({k: str(v) for k, v in case.lesions[name].counts().items()})
                writer.writerow(row)
    return path


def evaluate_folders(pred_dir: Path, ref_dir: Path, cfg: Config, out_dir: Path,
                     progress: Callable[[CaseResult], None] | None = None) -> EvaluationResult:
    """Pair, evaluate every case, aggregate and write ``metrics.csv`` + ``summary.json`` under ``out_dir``.

    A missing prediction or a failing case does not stop the others; :attr:`EvaluationResult.failed` lists them.

    Raises:
        FileNotFoundError: a folder is missing, or the reference folder holds no label files.
    """
    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: prediction folder does not exist")
    ref_dir = reference_folder(ref_dir)
    task = get_task(cfg.task)
    cases, unmatched = pair_files(pred_dir, ref_dir, set(task.labels.values()))
    if not cases:
        raise FileNotFoundError(f"{ref_dir}: no reference label files")
    for path in unmatched:
        log.warning("%s: prediction without a reference in %s; ignored", path, ref_dir)
    for case in cases:
        if case.status == "pending":
            evaluate_case(case, cfg)
            if case.status == "ok":
                log.info("%s: evaluated in %.2f s", case.case, case.seconds)
        elif case.status == "missing":
            log.error("%s", case.error)
        if progress is not None:
            progress(case)
    class_labels = {task.labels[v]: v for v in task.foreground}
    counts = {"cases": len(cases), "ok": sum(c.status == "ok" for c in cases),
              "missing": sum(c.status == "missing" for c in cases), "error": sum(c.status == "error" for c in cases),
              "unmatched_predictions": len(unmatched)}
    summary: dict[str, Any] = {
        "task": task.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prediction_dir": str(pred_dir),
        "reference_dir": str(ref_dir),
        "settings": {"orientation": cfg.data.orientation, "geometry_tolerance": cfg.data.geometry_tolerance,
                     "nsd_tolerance_mm": {n: cfg.evaluate.nsd_tolerance_mm[n] for n in class_labels},
                     "lesion_min_overlap": cfg.evaluate.lesion_min_overlap,
                     "lesion_classes": [task.labels[v] for v in task.lesion_classes],
                     "hd_percentile": HD_PERCENTILE},
        "conventions": CONVENTIONS,
        "labels": class_labels,
        "counts": counts,
        "classes": aggregate(cases, list(class_labels)),
        "cases": [c.as_dict() for c in cases],
        "unmatched_predictions": unmatched,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(out_dir / "metrics.csv", cases, class_labels)
    json_path = write_json(out_dir / "summary.json", summary)
    return EvaluationResult(cases, finite_or_none(summary), csv_path, json_path)
