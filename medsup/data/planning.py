"""Experiment planning, nnU-Net style: target spacing, patch, batch and topology from a dataset fingerprint.

The plan is everything training and inference must agree on; it is stored with every run and model bundle
so inference never depends on the current ``configs/``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from medsup.config import Config
from medsup.models.topology import Topology, plan_topology
from medsup.tasks import get_task

log = logging.getLogger(__name__)

#: activation bytes per (voxel x channel) per stage, summed over encoder and decoder, calibrated so that
#: nnU-Net's 3d_fullres liver plan (128^3, batch 2, 32..320 filters, 6 stages, AMP) estimates ~7 GB,
#: under its 8 GB target, as nnU-Net's own estimate puts it.
_BYTES_PER_ACTIVATION = 40.0

@dataclass(frozen=True)
class _Reference:
    spacing: tuple[float, float, float]
    median_shape: tuple[int, int, int]
    normalization: tuple[float, float, float, float]  # clip_low, clip_high, mean, std


#: what `medsup model` assumes for a task when no dataset has been planned: nnU-Net's published plans
#: (MSD Task03 liver, Task06 lung), spacing in (i, j, k) = (x, y, z) order after RAS reorientation.
_UNPLANNED = {
    "liver": _Reference((0.77, 0.77, 1.0), (512, 512, 432), (-17.0, 201.0, 99.4, 39.4)),
    "lung": _Reference((0.79, 0.79, 1.24), (512, 512, 252), (-1024.0, 325.0, -158.0, 324.0)),
    "tiny": _Reference((2.0, 2.0, 2.0), (40, 40, 32), (-50.0, 250.0, 100.0, 60.0)),
}


class Normalization(BaseModel):
    """CT normalisation: clip HU to ``[clip_low, clip_high]`` then z-score with foreground mean/std."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    clip_low: float
    clip_high: float
    mean: float
    std: float


class Plan(BaseModel):
    """The resolved experiment plan (``plan.json``). Spatial tuples are in ``(i, j, k)`` order."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    task: str
    orientation: str
    target_spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    batch_size: int
    kernels: tuple[tuple[int, int, int], ...]
    strides: tuple[tuple[int, int, int], ...]
    filters: tuple[int, ...]
    num_classes: int
    in_channels: int = 1
    normalization: Normalization
    median_shape: tuple[int, int, int]
    memory_estimate_gb: float
    fingerprint_hash: str = ""
    num_cases: int = 0
    source: str = "dataset"

    @property
    def topology(self) -> Topology:
        """The network topology described by the plan."""
        return Topology(self.kernels, self.strides, self.filters)

    def save(self, path: Path | str) -> Path:
        """Write ``plan.json`` atomically."""
        from medsup.data.files import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path | str) -> Plan:
        """Read a ``plan.json``; a malformed file raises a ValueError naming it."""
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a valid medsup plan ({err})") from None


def estimate_memory_gb(topology: Topology, patch: tuple[int, int, int], batch_size: int,
                       num_classes: int) -> float:
    """Rough training activation memory (GB) of the U-Net for ``patch`` x ``batch_size``.

    Sums voxels x channels over stages (encoder and mirrored decoder) plus the heads' logits; the constant
    is calibrated on nnU-Net's liver plan, so the number ranks plans rather than predicting a profiler.
    """
    total = 0.0
    for size, filters in zip(topology.scales(patch), topology.filters, strict=True):
        voxels = math.prod(size)
        total += voxels * filters * _BYTES_PER_ACTIVATION + voxels * num_classes * 8
    return batch_size * total / 1e9


def target_spacing(spacings: np.ndarray, shapes: np.ndarray, anisotropy_threshold: float = 3.0) -> np.ndarray:
    """nnU-Net's rule: median spacing, but a thick axis takes the 10th percentile of its spacings.

    An axis is thick when its median spacing exceeds ``anisotropy_threshold`` times the coarsest other axis
    and its median size in voxels is that many times smaller than the other axes'.

    Args:
        spacings: (N, 3) spacing of every case.
        shapes: (N, 3) shape of every case.
    """
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > anisotropy_threshold * max(target[a] for a in others)
    aniso_voxels = target_size[worst] * anisotropy_threshold < min(target_size[a] for a in others)
    if aniso_spacing and aniso_voxels:
        thick = float(np.percentile(spacings[:, worst], 10))
        # never finer than the other axes: that would invent resolution along the thick axis
        target[worst] = max(thick, max(target[a] for a in others) + 1e-5)
    return target


def _round_to(patch: list[int], divisor: tuple[int, int, int]) -> list[int]:
    return [max(d, round(p / d) * d) for p, d in zip(patch, divisor, strict=True)]


def plan_patch(cfg: Config, spacing: tuple[float, float, float], median_shape: tuple[int, int, int],
               num_classes: int, dataset_voxels: float) -> tuple[tuple[int, int, int], int, Topology, float]:
    """Patch, batch size, topology and memory estimate that fit ``cfg.plan.memory_budget_gb``.

    Starts from an isotropic-in-mm patch of ``max_patch_voxels`` clipped to the median image, then shrinks
    the axis with the largest patch/image ratio by its stride divisor until the estimate fits (nnU-Net).
    """
    p = cfg.plan

    def topo(patch: tuple[int, int, int]) -> Topology:
        return plan_topology(spacing, patch, p.min_feature_map, p.max_stages, p.base_filters, p.max_filters)

    if p.patch_size is not None:
        patch = tuple(p.patch_size)
        topology = topo(patch)  # type: ignore[arg-type]
        topology.check_patch(patch)  # type: ignore[arg-type]
    else:
        inv = 1.0 / np.asarray(spacing)
        start = inv * (p.max_patch_voxels / np.prod(inv)) ** (1 / 3)
        patch_l = [round(min(s, m)) for s, m in zip(start, median_shape, strict=True)]
        patch_l = [max(1, v) for v in patch_l]
        for _ in range(10):  # the topology depends on the patch and the rounding on the topology
            topology = topo(tuple(patch_l))
            rounded = _round_to(patch_l, topology.divisor)
            if rounded == patch_l:
                break
            patch_l = rounded
        while estimate_memory_gb(topology, tuple(patch_l), 2, num_classes) > p.memory_budget_gb:
            ratios = [pv / m for pv, m in zip(patch_l, median_shape, strict=True)]
            order = np.argsort(ratios)[::-1]
            axis = next((int(a) for a in order if patch_l[a] > topology.divisor[a]), None)
            if axis is None:
                break
            patch_l[axis] -= topology.divisor[axis]
            topology = topo(tuple(patch_l))
            patch_l = _round_to(patch_l, topology.divisor)
        patch = tuple(patch_l)
    patch3: tuple[int, int, int] = (int(patch[0]), int(patch[1]), int(patch[2]))
    per_sample = estimate_memory_gb(topology, patch3, 1, num_classes)
    if p.batch_size is not None:
        batch = p.batch_size
    else:
        batch = max(2, int(p.memory_budget_gb // per_sample)) if per_sample > 0 else 2
        # nnU-Net: a batch never covers more than 5% of the dataset's voxels (overfitting on tiny sets)
        cap = int(p.batch_dataset_fraction * dataset_voxels / math.prod(patch3))
        batch = max(2, min(batch, p.max_batch_size, cap))
    return patch3, batch, topology, per_sample * batch


def _assemble(cfg: Config, spacing: tuple[float, float, float], median_shape: tuple[int, int, int],
              dataset_voxels: float, normalization: Normalization, **extra: Any) -> Plan:
    """Plan the patch, batch and topology at ``spacing`` and put the whole plan together."""
    task = get_task(cfg.task)
    patch, batch, topology, mem = plan_patch(cfg, spacing, median_shape, task.num_classes, dataset_voxels)
    log.info("plan: spacing %s, patch %s, batch %d, %d stages, ~%.2f GB", _fmt(spacing), list(patch), batch,
             topology.num_stages, mem)
    return Plan(
        task=cfg.task, orientation=cfg.data.orientation, target_spacing=spacing, patch_size=patch,
        batch_size=batch, kernels=topology.kernels, strides=topology.strides, filters=topology.filters,
        num_classes=task.num_classes, normalization=normalization, median_shape=median_shape,
        memory_estimate_gb=round(mem, 3), **extra,
    )


def make_plan(cfg: Config, fingerprint: dict[str, Any]) -> Plan:
    """Plan training for ``cfg.task`` from a dataset fingerprint (see :mod:`medsup.data.fingerprint`)."""
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    shapes = np.asarray(fingerprint["shapes"], dtype=np.float64)
    if spacings.ndim != 2 or spacings.shape[1] != 3 or len(spacings) == 0:
        raise ValueError("fingerprint holds no case spacings: is the dataset empty?")
    if cfg.plan.target_spacing is not None:
        spacing = np.asarray(cfg.plan.target_spacing, dtype=np.float64)
    else:
        spacing = target_spacing(spacings, shapes, cfg.plan.anisotropy_threshold)
    resampled = shapes * spacings / spacing[None, :]
    m = [round(v) for v in np.median(resampled, axis=0).tolist()]
    fg = fingerprint["foreground"]
    norm = Normalization(clip_low=fg["p0.5"], clip_high=fg["p99.5"], mean=fg["mean"], std=max(fg["std"], 1e-3))
    return _assemble(cfg, (float(spacing[0]), float(spacing[1]), float(spacing[2])), (m[0], m[1], m[2]),
                     float(np.prod(resampled, axis=1).sum()), norm,
                     fingerprint_hash=str(fingerprint.get("hash", "")), num_cases=len(spacings))


def default_plan(cfg: Config) -> Plan:
    """A plan without a dataset (for ``medsup model`` and tests): nnU-Net's published figures per task.

    ``cfg.plan.target_spacing`` / ``patch_size`` still override. Marked ``source="unplanned"``.
    """
    ref = _UNPLANNED.get(cfg.task, _UNPLANNED["tiny"])
    spacing = cfg.plan.target_spacing or ref.spacing
    m = [max(1, round(n * r / s)) for n, r, s in zip(ref.median_shape, ref.spacing, spacing, strict=True)]
    lo, hi, mean, std = ref.normalization
    return _assemble(cfg, spacing, (m[0], m[1], m[2]), float(np.prod(m)) * 100,
                     Normalization(clip_low=lo, clip_high=hi, mean=mean, std=std), source="unplanned")


def _fmt(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"
