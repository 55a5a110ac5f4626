"""The foreground-oversampled patch sampler: where the chosen foreground voxel lands in the patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
