"""A run's four figures under ``<run>/figures/``: drawn at the end of training and by ``medsup figures``.

- ``training_curves.png`` and ``grad_norms.png`` from the per-epoch history;
- ``overlays.png``: the best and the worst case of the last validation (by mean foreground Dice), predicted
  again with the final network (the same network that validation used, so the same predictions), CT slices
  through the largest lesion with reference and prediction;
- ``deep_supervision.png``: every head of that network on a patch of the best case.

A figure that fails is logged and skipped: figures never fail a finished training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsup.config import Config
from medsup.data.geometry import Geometry, Volume
from medsup.data.planning import Plan
from medsup.data.transforms import background_value, eval_transforms, preprocess_volume
from medsup.device import autocast, inference_autocast_dtype
from medsup.evaluation.ds_panel import deep_supervision_panel
from medsup.evaluation.figures import FIGURES, curve_figures
from medsup.evaluation.overlays import case_view, overlay_figure
from medsup.inference.window import SlidingWindow, sliding_window_logits
from medsup.models.unet import DeepSupervisedUNet
from medsup.tasks import get_task

log = logging.getLogger(__name__)


def mean_dice(case: dict[str, Any]) -> float:
    """Mean of a validation case's non-NaN foreground Dice (NaN when every class is absent)."""
    values = [v for v in case["dice"].values() if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def best_and_worst(cases: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``[("best", case), ("worst", case)]`` by :func:`mean_dice` (one entry when they are the same case)."""
    scored = [c for c in cases if not math.isnan(mean_dice(c))]
    if not scored:
        return []
    best, worst = max(scored, key=mean_dice), min(scored, key=mean_dice)
    return [("best", best)] if best is worst else [("best", best), ("worst", worst)]


@dataclass
class PredictedCase:
    """A case on the plan grid: normalised image, reference and prediction ``(X, Y, Z)``, the grid's geometry."""

    image: np.ndarray
    label: np.ndarray
    prediction: np.ndarray
    geometry: Geometry


def predict_case(model: DeepSupervisedUNet, plan: Plan, image: Path, label: Path, window: SlidingWindow,
                 device: torch.device, amp: bool = True) -> PredictedCase:
    """Validation's preprocessing and sliding window for one case (eval mode; the mode is restored)."""
    data = eval_transforms(plan)({"image": str(image), "label": str(label)})
    img = data["image"]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, inference_autocast_dtype(device, amp)):
            logits = sliding_window_logits(img.as_tensor()[None].to(device), model, window)
    finally:
        model.train(was_training)
    array = img.as_tensor()[0].numpy()
    geometry = Geometry.from_affine(np.asarray(img.affine, dtype=np.float64), array.shape)
    return PredictedCase(array, np.rint(data["label"].as_tensor()[0].numpy()).astype(np.int16),
                         logits.argmax(dim=1)[0].cpu().numpy().astype(np.int16), geometry)


def case_figures(model: DeepSupervisedUNet, cfg: Config, plan: Plan, cases: Sequence[dict[str, Any]],
                 out_dir: Path, device: torch.device) -> list[Path]:
    """Overlays of the best and worst of ``cases`` (``validation.json`` rows) and the deep-supervision panel of
    the best, predicted with ``model``; returns the files written."""
    task = get_task(cfg.task)
    picked = best_and_worst(cases)
    if not picked:
        log.warning("no validation case with a foreground Dice: no overlays or deep-supervision panel")
        return []
    norm = plan.normalization
    window = SlidingWindow(plan.patch_size, cfg.infer.overlap, cfg.infer.sw_batch_size, cfg.infer.blend,
                           background_value(norm))
    predicted, views = [], []
    for role, case in picked:
        done = predict_case(model, plan, Path(case["image"]), Path(case["label"]), window, device, cfg.train.amp)
        predicted.append(done)
        views.append(case_view(f"{role}: {case['case']} (mean Dice {mean_dice(case):.3f})",
                               Volume(done.image * norm.std + norm.mean, done.geometry),
                               Volume(done.label, done.geometry), Volume(done.prediction, done.geometry),
                               task.labels))
    written = [overlay_figure(views, out_dir / FIGURES["overlays"], labels=task.labels,
                              lesion_classes=task.lesion_classes, organ_classes=task.organ_classes,
                              window=task.window, title=f"{cfg.task}: best and worst validation case (final network)")]
    best = predicted[0]
    written.append(deep_supervision_panel(
        model, best.image, best.label, out_dir / FIGURES["deep_supervision"], spacing=best.geometry.spacing,
        patch_size=plan.patch_size, labels=task.labels, to_hu=(norm.std, norm.mean), pad_value=background_value(norm),
        orientation=plan.orientation, lesion_classes=task.lesion_classes, organ_classes=task.organ_classes,
        window=task.window, device=device, target_mode=cfg.loss.ds_label_downsample))
    return written


def run_figures(out_dir: Path, history: Sequence[dict[str, float]], *, model: DeepSupervisedUNet | None = None,
                cfg: Config | None = None, plan: Plan | None = None, cases: Sequence[dict[str, Any]] = (),
                device: torch.device | None = None) -> list[Path]:
    """Draw what the inputs allow into ``out_dir``: curves (and gradient norms when recorded) from ``history``;
    with ``model``, ``cfg``, ``plan`` and validation ``cases`` also the overlays and the deep-supervision panel.
    Each figure that fails is logged as a warning and skipped. Returns the files written."""
    written = curve_figures(Path(out_dir), history)
    if model is not None and cfg is not None and plan is not None and cases:
        try:
            written += case_figures(model, cfg, plan, cases, Path(out_dir), device or next(model.parameters()).device)
        except Exception as err:  # a figure must never cost a finished training
            log.warning("case figures not drawn: %s: %s", type(err).__name__, err)
    return written


def ds_panel_files(model_path: Path, image: Path, out: Path, reference: Path | None = None,
                   device: torch.device | None = None) -> Path:
    """The deep-supervision panel of a bundle (or training checkpoint) for one CT file: preprocessed with the
    bundle's plan, the patch centred on the largest lesion of ``reference`` (else the volume centre)."""
    from medsup.data.io import read_image
    from medsup.inference.bundle import load_bundle

    bundle = load_bundle(model_path)
    dev = device or torch.device("cpu")
    model = bundle.network(dev)
    plan, task = bundle.plan, get_task(bundle.cfg.task)
    img = preprocess_volume(read_image(image), plan, image=True)
    array = img.as_tensor()[0].numpy()
    label = (np.rint(preprocess_volume(read_image(reference), plan, image=False).as_tensor()[0].numpy()).astype(
        np.int16) if reference is not None else np.zeros(array.shape, dtype=np.int16))
    if label.shape != array.shape:
        raise ValueError(f"{reference} is not on the grid of {image}: {list(label.shape)} vs {list(array.shape)} "
                         "voxels after resampling")
    norm = plan.normalization
    return deep_supervision_panel(
        model, array, label, out, spacing=plan.target_spacing, patch_size=plan.patch_size,
        to_hu=(norm.std, norm.mean), pad_value=background_value(norm), orientation=plan.orientation,
        labels=bundle.labels, lesion_classes=task.lesion_classes, organ_classes=task.organ_classes,
        window=task.window, device=dev, target_mode=bundle.cfg.loss.ds_label_downsample)
