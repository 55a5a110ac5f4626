"""Per-case prediction: read -> orient -> resample -> normalise -> sliding window (+TTA) -> back onto the
input grid -> argmax -> postprocess. The output has exactly the input's shape, spacing, origin, direction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsup.data.io import Geometry, Volume
from medsup.data.resample import resample_argmax, resample_probability
from medsup.data.transforms import IMAGE, LoadVolumed, background_value, eval_transforms
from medsup.device import autocast, autocast_dtype
from medsup.inference.bundle import Bundle
from medsup.inference.postprocess import postprocess
from medsup.inference.window import make_inferer, sliding_window_logits
from medsup.tasks import get_task

log = logging.getLogger(__name__)


class CaseError(ValueError):
    """A case cannot be predicted (unreadable, 2-D/4-D, NaN, ...); the message names the file."""


@dataclass
class Prepared:
    """A case after reading and preprocessing, ready for the network."""

    path: Path
    image: torch.Tensor  # (1, 1, x, y, z) normalised, at the plan spacing, plan orientation
    affine: np.ndarray  # (4, 4) RAS affine of ``image``'s grid
    geometry: Geometry  # the input file's own grid (what the output must match)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Prediction:
    """Labels on the input grid, plus what the report needs."""

    path: Path
    labels: np.ndarray  # (I, J, K) uint8, the input file's array order
    geometry: Geometry
    seconds: dict[str, float]
    volumes_ml: dict[str, float]
    exit_level: int | None = None
    #: softmax of one class on the input grid (only with ``probabilities``); one map at a time keeps memory low
    probability: Callable[[int], np.ndarray] | None = None


@dataclass(frozen=True)
class PredictOptions:
    """Inference settings (defaults from the bundle's config)."""

    overlap: float = 0.5
    sw_batch_size: int = 2
    blend: str = "gaussian"
    tta: bool = False
    postprocess: bool = True
    exit_level: int | None = None
    amp: bool = True
    probabilities: bool = False


class Predictor:
    """Predict cases with one bundle on one device. Preprocessing is the bundle's, not the current config's."""

    def __init__(self, bundle: Bundle, device: torch.device, options: PredictOptions) -> None:
        self.bundle, self.device, self.options = bundle, device, options
        self.network = bundle.network(device)
        if options.exit_level is not None and not 0 <= options.exit_level < self.network.num_heads:
            raise ValueError(f"--exit-level must be in 0..{self.network.num_heads - 1} for this model "
                             f"(0 = full resolution), got {options.exit_level}")
        self.loader = LoadVolumed([IMAGE], bundle.plan.orientation)
        self.rest = eval_transforms(bundle.plan, with_label=False).transforms[1:]  # all but loading
        self.task = get_task(bundle.cfg.task)
        self.pad_value = background_value(bundle.plan.normalization)

    @classmethod
    def options_from(cls, bundle: Bundle, **overrides: Any) -> PredictOptions:
        """The bundle's inference settings with non-None ``overrides`` applied."""
        i = bundle.cfg.infer
        base: dict[str, Any] = {"overlap": i.overlap, "sw_batch_size": i.sw_batch_size, "blend": i.blend, "tta": i.tta,
                "postprocess": i.postprocess, "amp": bundle.cfg.train.amp}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return PredictOptions(**base)

    def prepare(self, path: Path) -> Prepared:
        """Read and preprocess one case (CPU; runs in the prefetch thread)."""
        t0 = time.perf_counter()
        try:
            data = self.loader({IMAGE: str(path)})
        except ValueError as err:  # ImageReadError is a ValueError naming the file
            raise CaseError(str(err)) from None
        image = data[IMAGE]
        if not bool(torch.isfinite(image).all()):
            bad = int((~torch.isfinite(image)).sum())
            raise CaseError(f"{path}: {bad} NaN/Inf voxels; refusing to segment a corrupt image")
        geometry = Geometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in
                               image.meta["medsup_geometry"].items() if k != "orientation"})
        t1 = time.perf_counter()
        for transform in self.rest:
            data = transform(data)
        image = data[IMAGE]
        affine = np.asarray(image.affine, dtype=np.float64)
        tensor = image.as_tensor()[None].contiguous()
        return Prepared(path, tensor, affine, geometry,
                        {"read": t1 - t0, "preprocess": time.perf_counter() - t1})

    @torch.inference_mode()
    def predict(self, prepared: Prepared) -> Prediction:
        """Network, then labels on the input grid."""
        opts, dev = self.options, self.device
        t0 = time.perf_counter()
        image = prepared.image.to(dev, non_blocking=True)
        level = opts.exit_level

        def network(x: torch.Tensor) -> torch.Tensor:
            return self.network(x, exit_level=level) if level is not None else self.network(x)

        with autocast(dev, autocast_dtype(dev, opts.amp)):
            logits = self._window(image, network)
        logits = logits[0].float()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t1 = time.perf_counter()
        labels = self._to_input_grid(logits, prepared, resample_argmax)
        probability = None
        if opts.probabilities:
            def probability(channel: int) -> np.ndarray:
                return self._to_input_grid(logits, prepared, partial(resample_probability, channel=channel))
        if opts.postprocess:
            labels = postprocess(labels, self.task.organ_classes, self.task.lesion_classes)
        t2 = time.perf_counter()
        voxel_ml = float(np.prod(prepared.geometry.spacing)) / 1000.0
        counts = np.bincount(labels.ravel(), minlength=self.bundle.plan.num_classes)
        volumes = {name: float(counts[c]) * voxel_ml for c, name in self.bundle.labels.items() if c != 0}
        seconds = {**prepared.seconds, "network": t1 - t0, "export": t2 - t1}
        return Prediction(prepared.path, labels, prepared.geometry, seconds, volumes, level, probability)

    def _window(self, image: torch.Tensor, network: Any) -> torch.Tensor:
        opts = self.options
        inferer = make_inferer(self.bundle.plan.patch_size, opts.overlap, opts.sw_batch_size, opts.blend,
                               self.pad_value)
        try:
            return sliding_window_logits(image, network, inferer, opts.tta)
        except torch.cuda.OutOfMemoryError:
            # the stitched output of a huge volume does not fit next to the tiles: stitch on the host
            log.warning("%s: stitching on the GPU ran out of memory; stitching on the CPU instead",
                        image.shape)
            torch.cuda.empty_cache()
            cpu = make_inferer(self.bundle.plan.patch_size, opts.overlap, opts.sw_batch_size, opts.blend,
                               self.pad_value, device=torch.device("cpu"))
            return sliding_window_logits(image, network, cpu, opts.tta)

    def _to_input_grid(self, logits: torch.Tensor, prepared: Prepared,
                       resample: Callable[..., np.ndarray]) -> np.ndarray:
        """Resample onto the input grid in the plan orientation, then undo the reorientation exactly."""
        geometry = prepared.geometry
        # the input grid as the loader saw it (reoriented): same voxels, permuted/flipped axes
        dummy = np.broadcast_to(np.uint8(0), geometry.shape)
        oriented = Volume(dummy, geometry).reoriented(self.bundle.plan.orientation).geometry
        values = resample(logits, prepared.affine, oriented.affine(), oriented.shape)
        back = Volume(values, oriented).reoriented(geometry.orientation)
        if back.array.shape != geometry.shape:
            raise RuntimeError(f"{prepared.path}: output {back.array.shape} != input {geometry.shape}")
        return np.ascontiguousarray(back.array)
