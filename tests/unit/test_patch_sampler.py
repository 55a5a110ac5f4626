"""The foreground-oversampled patch sampler: where the chosen foreground voxel lands in the patch, and that its
patch is a copy the training cache can hand over without MONAI's per-sample deep copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medsup.config import load
from medsup.data.datalist import load_datalist
from medsup.data.fingerprint import plan_dataset
from medsup.data.loaders import training_loaders
from medsup.data.splits import make_splits
from medsup.data.transforms import FG_LOCATIONS, ForegroundOversampledCropd

PATCH = (8, 8, 8)
SHAPE = (40, 40, 40)


def draw(jitter: float, voxel: tuple[int, int, int], n: int = 300, seed: int = 0) -> np.ndarray:
    """Position of the single foreground ``voxel`` inside each of ``n`` foreground patches, ``(n, 3)``."""
    crop = ForegroundOversampledCropd(["label"], PATCH, fg_prob=1.0, jitter=jitter)
    crop.set_random_state(seed)
    label = torch.zeros((1, *SHAPE))
    label[(0, *voxel)] = 1
    found = []
    for _ in range(n):
        out = crop({"label": label, FG_LOCATIONS: {1: np.array([voxel])}})["label"][0]
        where = torch.nonzero(out)
        assert len(where) == 1, "the foreground voxel must lie inside every foreground patch"
        found.append(where[0].tolist())
    return np.array(found)


def test_no_jitter_centres_the_voxel_as_nnunet_does() -> None:
    assert (draw(0.0, (20, 20, 20), n=20) == 4).all()  # p // 2


def test_full_jitter_spreads_the_voxel_over_the_whole_patch() -> None:
    positions = draw(1.0, (20, 20, 20))
    for axis in range(3):  # every position 0..7 along each axis, none much more often than uniform
        counts = np.bincount(positions[:, axis], minlength=8)
        assert (counts > 0).all() and counts.max() < 3 * len(positions) / 8, counts


def test_half_jitter_keeps_the_voxel_in_the_middle_half() -> None:
    positions = draw(0.5, (20, 20, 20))
    assert positions.min() == 2 and positions.max() == 6  # 4 -/+ 2


def test_patches_near_the_border_stay_inside_the_volume() -> None:
    # voxels 1 and 2 from the edges: the patch is clipped to the volume (never padded), so they land 0-1 and
    # 6-7 voxels from its own edges whatever the jitter drew
    positions = draw(1.0, (1, 38, 20))
    assert set(positions[:, 0]) == {0, 1} and set(positions[:, 1]) == {6, 7}
    assert len(set(positions[:, 2])) == 8


def test_jitter_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="jitter"):
        ForegroundOversampledCropd(["label"], PATCH, fg_prob=1.0, jitter=1.5)


def test_the_patch_is_a_copy_and_the_volume_stays_untouched() -> None:
    # the training cache hands its volumes to the crop without a deep copy: what follows the crop writes to
    # the patch in place (and MetaTensor slices share their meta dicts), none of which may reach the cache
    image = MetaTensor(torch.arange(float(np.prod(SHAPE))).reshape(1, *SHAPE), meta={"geometry": {"k": [1]}})
    before = image.clone()
    crop = ForegroundOversampledCropd(["image"], PATCH, fg_prob=0.0)
    crop.set_random_state(0)
    patch = crop({"image": image})["image"]
    assert isinstance(patch, MetaTensor) and patch.shape == (1, *PATCH)
    patch.add_(1000)
    patch.meta["geometry"]["k"].append(2)
    assert torch.equal(image.as_tensor(), before.as_tensor())
    assert image.meta["geometry"] == {"k": [1]}
    # a label kept as uint8 comes out float32 with the same values, the type augmentation gives it
    label = MetaTensor(torch.randint(0, 3, (1, *SHAPE), dtype=torch.uint8))
    crop = ForegroundOversampledCropd(["label"], PATCH, fg_prob=0.0)
    crop.set_random_state(0)
    out = crop({"label": label})["label"]
    crop.set_random_state(0)
    assert out.dtype == torch.float32
    assert torch.equal(out.as_tensor(), crop({"label": label.float()})["label"].as_tensor())


def loaders(data: Path, out: Path, *overrides: str) -> tuple[Any, Any]:
    """The training and validation loaders of the tiny task over ``data``, in process, seeded as training
    seeds them."""
    cfg = load("tiny", ["train.num_workers=0", "augment.affine_prob=0.5", *overrides])
    plan = plan_dataset(data, cfg, out / "plan.json")
    cases = {c.case_id: c for c in load_datalist(data).labelled}
    split = make_splits(sorted(cases), cfg.data.num_folds, cfg.seed)[0]
    # without workers MONAI's DataLoader seeds the transforms from the global generator, which training seeds
    torch.manual_seed(cfg.seed)
    return training_loaders(cfg, plan, cases, split, torch.device("cpu"))


def train_loader(data: Path, out: Path, *overrides: str) -> Any:
    """The training loader of :func:`loaders`."""
    return loaders(data, out, *overrides)[0]


def test_training_loader_skips_the_cache_copy_and_draws_the_same_batches(msd_dataset: Path, tmp_path: Path) -> None:
    # MONAI's CacheDataset deep-copies the whole cached case for every sample unless told not to; medsup's
    # loader does not (the crop copies the patch). Same seed: the same batches as with the copy, cache intact.
    ours, monai = (train_loader(msd_dataset, tmp_path) for _ in range(2))
    assert ours.dataset.copy_cache is False
    monai.dataset.copy_cache = True
    cached = [{k: v.as_tensor().clone() for k, v in item.items() if isinstance(v, MetaTensor)}
              for item in ours.dataset._cache]
    assert cached and all({"image", "label"} <= set(c) for c in cached)
    # the cache keeps 3 bytes a voxel: float16 image, uint8 label
    assert {c["image"].dtype for c in ours.dataset._cache} == {torch.float16}
    assert {c["label"].dtype for c in cached} == {torch.uint8}
    batches = list(zip(ours, monai, strict=True))
    assert len(batches) == load("tiny").train.iterations_per_epoch
    for a, b in batches:
        for key in ("image", "label"):
            assert a[key].dtype == torch.float32
            assert torch.equal(a[key].as_tensor(), b[key].as_tensor())
    for item, before in zip(ours.dataset._cache, cached, strict=True):
        for key, value in before.items():
            assert torch.equal(item[key].as_tensor(), value), key
        assert item[FG_LOCATIONS], "the crop pops the foreground locations from its copy of the dict, not the cache"


def test_a_float16_cache_gives_the_float32_cache_batches_to_float16_precision(msd_dataset: Path,
                                                                             tmp_path: Path) -> None:
    batches = {dtype: list(train_loader(msd_dataset, tmp_path, f"train.cache_dtype={dtype}"))
               for dtype in ("float16", "float32")}
    for half, full in zip(batches["float16"], batches["float32"], strict=True):
        assert torch.equal(half["label"].as_tensor(), full["label"].as_tensor())  # same patches, same labels
        image, reference = half["image"].as_tensor(), full["image"].as_tensor()
        assert image.dtype == torch.float32
        # float16 keeps 11 significant bits: normalised CT within a few units is off by < 0.01, but not 0
        assert 0 < float((image - reference).abs().max()) < 1e-2 * max(1.0, float(reference.abs().max()))
