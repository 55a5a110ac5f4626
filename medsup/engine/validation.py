"""Sliding-window validation on whole volumes and per-class Dice."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from medsup.device import autocast, autocast_dtype
from medsup.engine.steps import prepare


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, classes: Sequence[int]) -> list[float]:
    """Dice of each class for one case; NaN when the class is absent from both (it says nothing).

    Args:
        pred, label: integer class maps of the same shape.
    """
    out = []
    for c in classes:
        p, g = pred == c, label == c
        denom = int(p.sum()) + int(g.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & g).sum()) / denom)
    return out


@torch.inference_mode()
def validate(model: nn.Module, cases: Iterable[dict[str, Any]],
             inferer: Callable[[torch.Tensor, nn.Module], torch.Tensor],
             device: torch.device, classes: Sequence[int], amp: bool = True) -> list[dict[str, Any]]:
    """Run whole-volume inference on each case and return ``[{"case", "dice": [per class]}]``.

    ``inferer(image, model)`` maps ``(1, 1, X, Y, Z)`` to logits ``(1, C, X, Y, Z)`` (a sliding window).
    """
    model.eval()
    dtype = autocast_dtype(device, amp)
    results = []
    for batch in cases:
        image, label = prepare(batch, device, channels_last=False)
        with autocast(device, dtype):
            logits = inferer(image, model)
        pred = torch.as_tensor(logits).argmax(dim=1, keepdim=True)
        name = batch["image"].meta.get("filename_or_obj", "?") if hasattr(batch["image"], "meta") else "?"
        name = name[0] if isinstance(name, list) else name
        results.append({"case": str(name), "dice": dice_per_class(pred, label, classes)})
    return results


def summarise(results: list[dict[str, Any]], class_names: Sequence[str]) -> dict[str, float]:
    """Per-class mean Dice over cases (NaN cases skipped) and their mean: ``val.dice.<name>``, ``val.dice``."""
    out: dict[str, float] = {}
    means = []
    for i, name in enumerate(class_names):
        values = [r["dice"][i] for r in results if not math.isnan(r["dice"][i])]
        if values:
            out[f"val.dice.{name}"] = sum(values) / len(values)
            means.append(out[f"val.dice.{name}"])
    out["val.dice"] = sum(means) / len(means) if means else float("nan")
    return out
