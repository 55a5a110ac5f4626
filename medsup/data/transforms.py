"""MONAI dictionary transforms built from the config and the plan.

Two chains:
- :func:`preprocess` — deterministic: load (medsup reader, exact reorientation) -> resample to the plan
  spacing -> CT normalisation. Shared verbatim by validation and inference, and cached for training so
  epochs after the first decode no NIfTI.
- :func:`train_transforms` — ``preprocess`` + pad to the patch + foreground locations (cached), then the
  random part: foreground-oversampled patch crop and augmentation.

Dictionaries carry ``"image"`` and ``"label"`` paths in, ``(1, X, Y, Z)`` MetaTensors out: image float32 in
normalised units (float16 in the training cache, ``train.cache_dtype``); label uint8 while whole (1 byte a
voxel, not 4); both float32 from the patch crop on (what augmentation, collation and the network expect), unless
the augmentation runs in the training step (``augment.runs_in``): then the crop keeps the cache's types and the
step converts on the device.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandomizableTransform,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
    Transform,
)

from medsup.config import AugmentConfig, Config
from medsup.data.geometry import Volume
from medsup.data.io import read_image
from medsup.data.planning import Normalization, Plan
from medsup.data.resample import resample_to_spacing

IMAGE, LABEL = "image", "label"
FG_LOCATIONS = "fg_locations"


def normalize_ct(x: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """Clip HU to the plan's foreground ``[p0.5, p99.5]`` then z-score with the foreground mean/std."""
    # clamp makes the one copy; the rest is in place
    return x.clamp(norm.clip_low, norm.clip_high).sub_(norm.mean).div_(norm.std)


def label_dtype(plan: Plan) -> type[np.generic]:
    """The type a preprocessed label is kept in: uint8 (a quarter of float32 in the training cache) unless the
    plan has more classes than it holds."""
    return np.uint8 if plan.num_classes <= 256 else np.int16


def preprocess_volume(volume: Volume, plan: Plan, image: bool = True,
                      dtype: type[np.generic] | None = None) -> MetaTensor:
    """Reorient ``volume`` exactly to the plan orientation, resample it onto the plan spacing (trilinear for
    an image, nearest for a label) and, for an image, CT-normalise it: one streamed pass, slab by slab, so a
    full-size int16 CT is never copied to float at its own resolution.

    Returns a ``(1, X, Y, Z)`` MetaTensor of ``dtype`` (default: float32 for an image, uint8 for a label) with
    the RAS affine of the plan grid; the input's own geometry is kept under ``meta["medsup_geometry"]`` so
    outputs can be mapped back exactly.
    """
    if dtype is None:
        dtype = np.float32 if image else label_dtype(plan)
    oriented = volume.reoriented(plan.orientation)  # a view: flips and transposes only
    norm = plan.normalization
    array, affine = resample_to_spacing(
        oriented.array[None], oriented.geometry.affine(), plan.target_spacing,
        mode="bilinear" if image else "nearest", reduce=(lambda x: normalize_ct(x[0], norm)) if image else None,
        dtype=dtype)
    meta = {"medsup_geometry": volume.geometry.as_dict()}
    return MetaTensor(array, affine=torch.as_tensor(affine), meta=meta)


class PreprocessVolumed(MapTransform):
    """Read each key's path with :func:`medsup.data.io.read_image` and :func:`preprocess_volume` it.

    Output: ``(1, X, Y, Z)`` MetaTensors (image ``image_dtype`` in normalised units, label uint8, see
    :func:`label_dtype`) carrying the file name in their meta.
    """

    def __init__(self, keys: Sequence[str], plan: Plan, image_dtype: type[np.generic] = np.float32) -> None:
        super().__init__(keys)
        self.plan = plan
        self.image_dtype = image_dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            image = key == IMAGE
            out = preprocess_volume(read_image(path), self.plan, image=image,
                                    dtype=self.image_dtype if image else None)
            out.meta["filename_or_obj"] = str(path)
            d[key] = out
        return d


def background_value(norm: Normalization) -> float:
    """The normalised value of air / padding (the clip floor): what the image is padded with."""
    return (norm.clip_low - norm.mean) / norm.std


class ForegroundLocationsd(MapTransform):
    """Store up to ``per_class`` seeded voxel coordinates of every foreground class (cached once).

    Output key ``fg_locations``: ``{class: (N, 3) int64 array}`` for the classes present in the label.
    """

    def __init__(self, label_key: str, classes: Sequence[int], per_class: int = 10000, seed: int = 0) -> None:
        super().__init__([label_key])
        self.classes = tuple(classes)
        self.per_class = per_class
        self.seed = seed

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = np.asarray(d[self.keys[0]])[0]
        rng = np.random.default_rng(self.seed)
        found: dict[int, np.ndarray] = {}
        for cls in self.classes:
            where = np.argwhere(label == cls)
            if len(where) > self.per_class:
                where = where[rng.choice(len(where), self.per_class, replace=False)]
            if len(where):
                found[cls] = where.astype(np.int64)
        d[FG_LOCATIONS] = found
        return d


class ForegroundOversampledCropd(RandomizableTransform, MapTransform):
    """nnU-Net's patch sampler: with probability ``fg_prob`` the patch holds a foreground voxel of a class drawn
    uniformly among the classes present (so tumours are seen), else it lies anywhere in the volume.

    ``jitter`` says where that voxel lands: 0 puts it at the patch centre, as nnU-Net and MONAI's
    ``RandCropByPosNegLabeld`` do; 1 anywhere in the patch (uniform offset of up to half the patch from the
    centre per axis). Why not the centre: lesions are then always in the middle of the foreground patches and
    almost never elsewhere, and a small network reads the position from the zero padding of its convolutions:
    it learns "the middle of a patch is tumour" and, in a sliding window, paints false positives at the centre
    of every tile (``bench/position_prior.py``: 17x the tumour probability in the central half of
    lesion-free patches after 1200 iterations on synthetic lung, BENCHMARKS.md).

    The volume must already be at least ``patch`` along every axis (see ``SpatialPadd``). The patch is a copy,
    float32 (``to_float``) or in the input's types: the input volume (the training cache's) is never written to
    or shared with what follows.
    """

    def __init__(self, keys: Sequence[str], patch: Sequence[int], fg_prob: float, jitter: float = 1.0,
                 to_float: bool = True) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys)
        self.patch = tuple(int(p) for p in patch)
        self.fg_prob = fg_prob
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {jitter}")
        self.jitter = jitter
        self.to_float = to_float

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shape = tuple(d[self.keys[0]].shape[1:])
        locations: dict[int, np.ndarray] = d.pop(FG_LOCATIONS, {})
        start = self._start(shape, locations)
        slices = (slice(None), *(slice(s, s + p) for s, p in zip(start, self.patch, strict=True)))
        for key in self.key_iterator(d):
            # a float32 copy of the patch, not a view: the training cache hands its cases over without MONAI's
            # per-sample deep copy of the whole volume, so nothing after the crop may reach the cached arrays;
            # float32 also for the (uint8-cached) label, which interpolating augmentations return as float32
            # anyway, so every sample of a batch has the same type. Without augmentation after it (it runs in the
            # training step) the cache's float16 / uint8 go on: 3 bytes a voxel to collate, pin and copy, not 8
            patch = d[key][slices].clone()  # clone: MetaTensor.to(copy=True) shares the meta dicts
            d[key] = patch.float() if self.to_float else patch
        return d

    def _start(self, shape: tuple[int, ...], locations: dict[int, np.ndarray]) -> list[int]:
        limits = [s - p for s, p in zip(shape, self.patch, strict=True)]
        if min(limits) < 0:
            raise ValueError(f"volume {list(shape)} is smaller than the patch {list(self.patch)}: pad it first")
        if locations and self.R.random() < self.fg_prob:
            cls = list(locations)[self.R.randint(len(locations))]
            voxel = locations[cls][self.R.randint(len(locations[cls]))]
            return [int(np.clip(v - self._offset(p), 0, lim))
                    for v, p, lim in zip(voxel, self.patch, limits, strict=True)]
        return [int(self.R.randint(lim + 1)) for lim in limits]

    def _offset(self, p: int) -> int:
        """Where the chosen voxel lands along an axis of ``p`` voxels: ``p // 2`` moved by up to
        ``jitter * p / 2`` either way, within ``0 .. p - 1``. No draw at jitter 0 (the random stream, and so
        every patch, stays what the centred sampler gave)."""
        reach = int(self.jitter * (p // 2))
        if reach == 0:
            return p // 2
        return p // 2 + int(self.R.randint(-reach, min(reach, p - 1 - p // 2) + 1))


def preprocess(plan: Plan, keys: Sequence[str] = (IMAGE, LABEL),
               image_dtype: type[np.generic] = np.float32) -> list[Transform]:
    """Deterministic load -> reorient -> resample to ``plan.target_spacing`` -> normalise (one transform; what
    inference runs too, through :func:`preprocess_volume`)."""
    return [PreprocessVolumed(list(keys), plan, image_dtype)]


def augment_in_step(cfg: Config, device: torch.device) -> bool:
    """Whether the augmentation after the patch crop runs in the training step (on ``device``, on the finished
    batch: :class:`medsup.data.batch_augment.BatchAugment`) instead of the data loader: ``augment.runs_in``,
    where ``auto`` means on a CUDA device (a GPU augments a batch of patches in milliseconds; a loader worker
    spends ~50 of its ~80 ms per 128^3 sample on it, bench/dataload.py)."""
    where = cfg.augment.runs_in
    return where == "step" or (where == "auto" and device.type == "cuda")


def rand_affine(aug: AugmentConfig, plan: Plan) -> RandAffined | None:
    """The random affine (rotation + scaling) of the training augmentation, or None at ``affine_prob`` 0."""
    if aug.affine_prob <= 0:
        return None
    spacing = plan.target_spacing
    anisotropic = max(spacing) / min(spacing) > 3
    in_plane_rot = math.radians(aug.rotate_deg)
    # with thick slices, rotating out of plane mixes slices that were never sampled: rotate in-plane only
    off_plane_rot = 0.0 if anisotropic else in_plane_rot
    return RandAffined(
        [IMAGE, LABEL], prob=aug.affine_prob, rotate_range=(off_plane_rot, off_plane_rot, in_plane_rot),
        scale_range=(aug.scale_range,) * 3, mode=("bilinear", "nearest"), padding_mode="border",
    )


@dataclass(frozen=True)
class Augmentations:
    """The training augmentation's MONAI transforms by role, None (``flips``: empty) where switched off;
    ``flips`` holds one per spatial axis, in axis order; :meth:`chain` is the loader's order. The training
    step reads their draws (:mod:`medsup.data.batch_augment`)."""

    affine: RandAffined | None
    flips: tuple[RandFlipd, ...]
    rot90: RandRotate90d | None
    scale: RandScaleIntensityd
    shift: RandShiftIntensityd
    gamma: RandAdjustContrastd
    noise: RandGaussianNoised

    def chain(self) -> list[Transform]:
        spatial = [t for t in (self.affine, *self.flips, self.rot90) if t is not None]
        return [*spatial, self.scale, self.shift, self.gamma, self.noise]


def augmentations(aug: AugmentConfig, plan: Plan) -> Augmentations:
    """The augmentation after the patch crop: random affine, flips, 90-degree rotation (in-plane, square patches
    only), intensity scale / shift, gamma, Gaussian noise."""
    keys = [IMAGE, LABEL]
    square = math.isclose(plan.patch_size[0], plan.patch_size[1])
    return Augmentations(
        affine=rand_affine(aug, plan),
        flips=tuple(RandFlipd(keys, prob=aug.flip_prob, spatial_axis=axis) for axis in range(3))
        if aug.flip_prob > 0 else (),
        rot90=RandRotate90d(keys, prob=aug.rot90_prob, spatial_axes=(0, 1)) if aug.rot90_prob > 0 and square else None,
        scale=RandScaleIntensityd([IMAGE], factors=aug.intensity_scale, prob=aug.intensity_scale_prob),
        shift=RandShiftIntensityd([IMAGE], offsets=aug.intensity_shift, prob=aug.intensity_shift_prob),
        gamma=RandAdjustContrastd([IMAGE], prob=aug.gamma_prob, gamma=aug.gamma_range, retain_stats=True),
        noise=RandGaussianNoised([IMAGE], prob=aug.noise_prob, std=aug.noise_std),
    )


def train_cached_transforms(cfg: Config, plan: Plan, fg_classes: Sequence[int]) -> list[Transform]:
    """The deterministic head of the training chain: what the training cache (in memory, or on disk in
    :mod:`medsup.data.preprocessed`) keeps for every case: preprocessed, padded to the patch, with its
    foreground locations."""
    return [
        # the cache keeps what this returns for every training case: float16 images halve it
        *preprocess(plan, image_dtype=np.float16 if cfg.train.cache_dtype == "float16" else np.float32),
        # small volumes: pad the image with air and the label with background so every patch fits
        SpatialPadd([IMAGE], spatial_size=plan.patch_size, mode="constant",
                    value=background_value(plan.normalization)),
        SpatialPadd([LABEL], spatial_size=plan.patch_size, mode="constant", value=0),
        ForegroundLocationsd(LABEL, fg_classes, seed=cfg.seed),
    ]


def train_random_transforms(cfg: Config, plan: Plan, augment: bool = True) -> list[Transform]:
    """The random tail of the training chain, drawn afresh for every sample: the patch crop, then augmentation
    (none where ``augment`` is False: the training step runs it, see :func:`augment_in_step`)."""
    crop = ForegroundOversampledCropd([IMAGE, LABEL], plan.patch_size, cfg.train.foreground_oversample,
                                      cfg.train.foreground_jitter, to_float=augment)
    return [crop, *augmentations(cfg.augment, plan).chain()] if augment else [crop]


def train_transforms(cfg: Config, plan: Plan, fg_classes: Sequence[int], augment: bool = True) -> Compose:
    """The training chain; everything before the patch crop is deterministic and cached by CacheDataset."""
    return Compose([*train_cached_transforms(cfg, plan, fg_classes), *train_random_transforms(cfg, plan, augment)])


def eval_transforms(plan: Plan, with_label: bool = True) -> Compose:
    """Whole-volume validation / inference chain (no padding: the sliding window pads)."""
    return Compose(preprocess(plan, (IMAGE, LABEL) if with_label else (IMAGE,)))
