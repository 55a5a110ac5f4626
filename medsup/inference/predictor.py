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

from medsup.data.geometry import Geometry, Volume
from medsup.data.io import ImageReadError, read_image
from medsup.data.resample import SlabResampler, argmax_reduce, push_array
from medsup.data.transforms import background_value, preprocess_volume
from medsup.device import autocast, autotune_convolutions, dtype_name, inference_autocast_dtype
from medsup.evaluation.metrics import voxel_ml
from medsup.hostmem import release_free_heap, tune_host_allocator
from medsup.inference.bundle import Bundle
from medsup.inference.postprocess import PostprocessRules, apply_rules, bincount_slabs, task_rules
from medsup.inference.window import SlidingWindow, TileHook
from medsup.tasks import get_task

log = logging.getLogger(__name__)


class CaseError(ValueError):
    """A case cannot be predicted (unreadable, 2-D/4-D, NaN, ...); the message names the file."""


@dataclass
class Prepared:
    """A case after reading and preprocessing, ready for the network."""

    path: Path
    image: torch.Tensor  # (1, 1, x, y, z) float16 normalised, at the plan spacing, plan orientation
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
    """Predict cases with one bundle on one device. Preprocessing is the bundle's, not the current config's.

    Host memory per case stays near the raw volume: the input is read in its own pixel type and resampled
    and normalised slab by slab into a float16 network input at the plan spacing; logits are stitched in a
    one-patch-deep rolling buffer and each finished slab is resampled onto the input grid and argmax'ed at
    once, so only the uint8 label map of the full grid is ever held (``bench/infer_memory.py``).
    """

    def __init__(self, bundle: Bundle, device: torch.device, options: PredictOptions) -> None:
        # for the Python API and the MLflow pyfunc model too, not only `medsup infer`: the sliding window and
        # export free and reallocate the same large blocks for every tile and slab (bench/host_alloc.py)
        tune_host_allocator()
        self.bundle, self.device, self.options = bundle, device, options
        self.network = bundle.network(device)  # in the inference layout: channels-last on a CPU
        autotune_convolutions(device, bundle.cfg.train.deterministic)  # a reproducible model stays reproducible
        #: the network's autocast dtype (None: float32): bf16 on CUDA and on a CPU with native bf16, if ``amp``
        self.dtype = inference_autocast_dtype(device, options.amp)
        log.info("network on %s in %s", device, self.network_dtype)
        if options.exit_level is not None and not 0 <= options.exit_level < self.network.num_heads:
            raise ValueError(f"--exit-level must be in 0..{self.network.num_heads - 1} for this model "
                             f"(0 = full resolution), got {options.exit_level}")
        self.task = get_task(bundle.cfg.task)
        self.window = SlidingWindow(bundle.plan.patch_size, options.overlap, options.sw_batch_size, options.blend,
                                    background_value(bundle.plan.normalization), options.tta)
        # rules fitted at the end of training were chosen on the full-resolution head's output; an early exit
        # gets the task rule
        fitted = bundle.postprocessing if not options.exit_level else None
        self.rules: PostprocessRules | None = None
        if options.postprocess:
            self.rules = fitted or task_rules(self.task.organ_classes)
            log.info("postprocessing (%s): %s", "fitted on the validation cases" if fitted else "the task rule",
                     self.rules.describe(bundle.labels))

    @property
    def network_dtype(self) -> str:
        """The dtype the network computes in: ``bfloat16``, ``float16`` or ``float32`` (the batch report's)."""
        return dtype_name(self.dtype)

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
            volume = read_image(path)
        except ImageReadError as err:  # the message names the file
            raise CaseError(str(err)) from None
        bad = nonfinite_count(volume.array)
        if bad:
            raise CaseError(f"{path}: {bad} NaN/Inf voxels; refusing to segment a corrupt image")
        t1 = time.perf_counter()
        # float16 holds a z-scored, clipped CT with ~1e-3 relative precision (bf16 autocast is coarser) at half
        # the memory of float32; tiles go to the network as float32
        image = preprocess_volume(volume, self.bundle.plan, image=True, dtype=np.float16)
        affine = np.asarray(image.affine, dtype=np.float64)
        return Prepared(path, image.as_tensor()[None], affine, volume.geometry,
                        {"read": t1 - t0, "preprocess": time.perf_counter() - t1})

    @torch.inference_mode()
    def predict(self, prepared: Prepared, on_tiles: TileHook | None = None) -> Prediction:
        """Network and export (resampling onto the input grid, argmax) streamed slab by slab, then postprocessing.

        ``on_tiles(done, total)`` reports sliding-window progress (a per-case progress bar).
        """
        opts, dev = self.options, self.device
        t0 = time.perf_counter()
        level = opts.exit_level
        dtype = self.dtype

        def network(x: torch.Tensor) -> torch.Tensor:
            # autocast around the network only: the resampling in the sink needs float32 coordinates
            with autocast(dev, dtype):
                return self.network(x, exit_level=level) if level is not None else self.network(x)

        streamed = None
        try:
            streamed = self._stream(prepared, self._image_on(dev, prepared), network, dev, on_tiles)
        except torch.cuda.OutOfMemoryError:
            # the volume's stitch buffers do not fit beside the network: stitch and resample on the host
            log.warning("%s: stitching on the GPU ran out of memory; stitching on the CPU instead", prepared.path)
        if streamed is None:  # out of the handler: its traceback no longer holds the failed try's GPU buffers
            torch.cuda.empty_cache()
            streamed = self._stream(prepared, prepared.image, network, torch.device("cpu"), on_tiles)
        labels, export, logits = streamed
        # the tiles' and slabs' freed memory, kept in the heap for the next tile, would otherwise lie beneath
        # postprocessing's whole-volume arrays: the case's peak (bench/infer_memory.py)
        release_free_heap()
        t1 = time.perf_counter()
        if self.rules is not None:
            labels = apply_rules(labels, self.rules, self.task.organ_classes, self.task.lesion_classes,
                                 prepared.geometry.spacing)
        volumes = label_volumes_ml(labels, prepared.geometry.spacing, self.bundle.labels)
        t2 = time.perf_counter()
        probability = None
        if logits is not None:
            kept = logits

            def probability(channel: int) -> np.ndarray:
                out, resampler = self._onto_input_grid(prepared, partial(_softmax_channel, channel=channel),
                                                       np.float32, kept.device)
                push_array(resampler, kept)
                resampler.close()
                return out

        seconds = {**prepared.seconds, "network": t1 - t0 - export, "export": export + t2 - t1}
        return Prediction(prepared.path, labels, prepared.geometry, seconds, volumes, level, probability)

    @staticmethod
    def _image_on(device: torch.device, prepared: Prepared) -> torch.Tensor:
        """The case's image where the network runs: on a GPU one copy of the whole float16 volume (what training's
        validation does too) instead of a copy from the host for every batch of tiles, each of which would
        first be gathered on the host and then wait for its transfer; left on the host if the GPU has no room."""
        if device.type != "cuda":
            return prepared.image
        try:
            return prepared.image.to(device)
        except torch.cuda.OutOfMemoryError:
            log.info("%s: no room for the image on the GPU; its tiles are copied over batch by batch", prepared.path)
            return prepared.image

    def _stream(self, prepared: Prepared, image: torch.Tensor, network: Callable[[torch.Tensor], torch.Tensor],
                stitch: torch.device, on_tiles: TileHook | None = None
                ) -> tuple[np.ndarray, float, torch.Tensor | None]:
        """Sliding window over ``image`` (``prepared.image`` or its copy on the network's device) whose finished
        slabs go straight onto the input grid; returns ``(labels, seconds spent resampling, the whole logits
        when probabilities are asked for else None)``."""
        labels, resampler = self._onto_input_grid(prepared, argmax_reduce, np.uint8, stitch)
        kept: list[torch.Tensor] = []
        export = 0.0

        def sink(slab: torch.Tensor) -> None:
            nonlocal export
            t = time.perf_counter()
            resampler.push(slab)
            if self.options.probabilities:
                kept.append(slab.cpu())
            export += time.perf_counter() - t

        self.window.run(image, network, sink, self.device, stitch, on_tiles)
        resampler.close()
        return labels, export, torch.cat(kept, dim=3) if kept else None

    def _onto_input_grid(self, prepared: Prepared, reduce: Callable[[torch.Tensor], torch.Tensor],
                         dtype: type[np.generic], device: torch.device) -> tuple[np.ndarray, SlabResampler]:
        """An output array with exactly the input file's shape, and a resampler filling it from network-grid
        slabs. The resampler writes through a view of the array in the plan orientation (flips and axis
        swaps only), so no reorientation copy is made; Fortran order makes the writer's ``(k, j, i)`` view
        contiguous."""
        geometry = prepared.geometry
        out = np.empty(geometry.shape, dtype=dtype, order="F")
        oriented = Volume(out, geometry).reoriented(self.bundle.plan.orientation)
        src = prepared.image.shape[2:]
        resampler = SlabResampler((int(src[0]), int(src[1]), int(src[2])), prepared.affine,
                                  oriented.geometry.affine(), oriented.array, reduce, device=device)
        return out, resampler


def _softmax_channel(x: torch.Tensor, channel: int) -> torch.Tensor:
    return torch.softmax(x, 0)[channel]


def nonfinite_count(array: np.ndarray, chunk: int = 16) -> int:
    """NaN/Inf voxels in an ``(I, J, K)`` array, counted slab by slab (no full-size temporary)."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return sum(int((~np.isfinite(array[..., k:k + chunk])).sum()) for k in range(0, array.shape[2], chunk))


def label_volumes_ml(labels: np.ndarray, spacing: tuple[float, float, float], names: dict[int, str]
                     ) -> dict[str, float]:
    """Volume in mL of each named foreground class of an ``(I, J, K)`` label map."""
    counts = bincount_slabs(labels, max(names) + 1)
    voxel = voxel_ml(spacing)
    return {name: float(counts[c]) * voxel for c, name in names.items() if c != 0}
