"""Sliding-window validation on whole volumes and per-class Dice.

Two summaries of the same cases, both logged every validation:
- ``val.dice.<class>``: the mean over cases of each case's Dice (nnU-Net's reported convention); a case
  without the class in reference or prediction says nothing (NaN, skipped), and one where only the
  prediction has it scores 0.
- ``val.dice_global.<class>``: 2 sum(TP) / (sum(prediction) + sum(reference)) over all the cases' voxels
  (nnU-Net's "pseudo Dice" during training, here on whole volumes). Small lesions make the per-case mean
  a step function: a 3-voxel nodule scores 0 or close to 1, and a case whose only nodule is that small moves
  the mean by 1/n whatever the rest does; the global Dice weights each lesion by its voxels.
- ``val.lesion_recall.<class>``, ``val.lesion_precision.<class>`` (lesion classes only): ``medsup evaluate``'s
  lesion-wise detection (:func:`medsup.evaluation.metrics.lesion_detection`) on the validation grid, pooled
  over the cases: of the reference lesions, how many were found; of the predicted lesions, how many are real.
  Each is left out while its denominator is 0 (no reference lesion, or nothing predicted).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from medsup.device import autocast, inference_autocast_dtype
from medsup.engine.steps import prepare
from medsup.evaluation.metrics import dice_from_counts, lesion_detection, overlap_counts, pooled_detection

__all__ = ["dice_per_class", "lesion_counts", "overlap_counts", "summarise", "validate"]


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, classes: Sequence[int]) -> list[float]:
    """Dice of each class for one case; NaN when the class is absent from both (it says nothing).

    Args:
        pred, label: integer class maps of the same shape.
    """
    return [dice_from_counts(*counts) for counts in overlap_counts(pred, label, classes)]


def lesion_counts(pred: torch.Tensor, label: torch.Tensor, classes: Sequence[int], lesion_classes: Sequence[int],
                  spacing: Sequence[float], min_overlap: float) -> list[dict[str, int] | None]:
    """Lesion-wise detection counts (``ref_lesions``, ``detected_lesions``, ``pred_lesions``, ``fp_lesions``) of
    each class of ``classes`` that is a lesion class, None for the others.

    Args:
        pred, label: integer class maps of the same shape ``(..., X, Y, Z)`` (leading dims of size 1).
        spacing: voxel size in mm of that grid.
    """
    out: list[dict[str, int] | None] = []
    shape = pred.shape[-3:]
    for c in classes:
        if c not in lesion_classes:
            out.append(None)
            continue
        # compare on the device, copy one byte per voxel (not the int64 class map) to the host
        p, g = ((m == c).reshape(shape).cpu().numpy() for m in (pred, label))
        out.append(lesion_detection(p, g, spacing, min_overlap).counts())
    return out


@torch.inference_mode()
def validate(model: nn.Module, cases: Iterable[dict[str, Any]],
             inferer: Callable[[torch.Tensor, nn.Module], torch.Tensor],
             device: torch.device, classes: Sequence[int], amp: bool = True,
             lesion_classes: Sequence[int] = (), spacing: Sequence[float] = (1.0, 1.0, 1.0),
             min_overlap: float = 0.1) -> list[dict[str, Any]]:
    """Run whole-volume inference on each case and return ``[{"case", "dice": [per class], "counts": [per class
    (TP, predicted, reference) voxels], "lesions": [per class: :func:`lesion_counts` or None]}]``.

    ``inferer(image, model)`` maps ``(1, 1, X, Y, Z)`` to logits ``(1, C, X, Y, Z)`` (a sliding window). The
    classes of ``lesion_classes`` also get lesion-wise detection on this grid, whose voxel size is ``spacing``.
    """
    model.eval()
    dtype = inference_autocast_dtype(device, amp)  # as `medsup infer` predicts: bf16 on a CPU that has it
    results = []
    for batch in cases:
        image, label = prepare(batch, device, channels_last=False)
        with autocast(device, dtype):
            logits = inferer(image, model)
        pred = torch.as_tensor(logits).argmax(dim=1, keepdim=True)
        name = batch["image"].meta.get("filename_or_obj", "?") if hasattr(batch["image"], "meta") else "?"
        name = name[0] if isinstance(name, list) else name
        counts = overlap_counts(pred, label, classes)
        results.append({"case": str(name), "dice": [dice_from_counts(*c) for c in counts], "counts": counts,
                        "lesions": lesion_counts(pred, label, classes, lesion_classes, spacing, min_overlap)})
    return results


def summarise(results: list[dict[str, Any]], class_names: Sequence[str]) -> dict[str, float]:
    """Per-class mean Dice over cases (NaN cases skipped) and their mean: ``val.dice.<name>``, ``val.dice``;
    where the results hold ``counts``, also the global Dice over all cases' voxels: ``val.dice_global.<name>``,
    ``val.dice_global`` (the mean over the classes that have one); where they hold ``lesions``, the pooled
    lesion recall and precision: ``val.lesion_recall.<name>``, ``val.lesion_precision.<name>``."""
    out: dict[str, float] = {}
    means, globals_ = [], []
    for i, name in enumerate(class_names):
        values = [r["dice"][i] for r in results if not math.isnan(r["dice"][i])]
        if values:
            out[f"val.dice.{name}"] = sum(values) / len(values)
            means.append(out[f"val.dice.{name}"])
        if results and all("counts" in r for r in results):
            tp, predicted, reference = (sum(r["counts"][i][k] for r in results) for k in range(3))
            value = dice_from_counts(tp, predicted, reference)
            if not math.isnan(value):
                out[f"val.dice_global.{name}"] = value
                globals_.append(value)
    out["val.dice"] = sum(means) / len(means) if means else float("nan")
    if globals_:
        out["val.dice_global"] = sum(globals_) / len(globals_)
    for i, name in enumerate(class_names):
        pooled = [r["lesions"][i] for r in results if r.get("lesions") and r["lesions"][i] is not None]
        if not pooled:
            continue
        rates = pooled_detection(pooled)
        for key in ("recall", "precision"):
            if not math.isnan(rates[key]):
                out[f"val.lesion_{key}.{name}"] = float(rates[key])
    return out
