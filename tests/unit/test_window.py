"""The streaming sliding window equals MONAI's SlidingWindowInferer and hands out every slice exactly once."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer

from medsup.data.resample import SlabResampler, argmax_reduce, resample_argmax
from medsup.inference.window import SlidingWindow, mirror_axes, sliding_window_logits, tile_starts


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 3, 1)).eval()


@pytest.mark.parametrize(("shape", "overlap", "blend"), [
    ((40, 37, 50), 0.5, "gaussian"),
    ((20, 33, 9), 0.25, "constant"),  # z smaller than the patch: padded, then cropped
    ((16, 16, 16), 0.5, "gaussian"),  # exactly one tile
])
def test_equals_monai_sliding_window(shape: tuple[int, int, int], overlap: float, blend: str) -> None:
    image = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    net = _net()
    monai = SlidingWindowInferer((16, 16, 16), sw_batch_size=3, overlap=overlap, mode=blend, sigma_scale=0.125,
                                 padding_mode="constant", cval=-1.5)
    with torch.no_grad():
        ref = monai(image, net)
        ours = sliding_window_logits(image, net, SlidingWindow((16, 16, 16), overlap, 3, blend, -1.5))
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, torch.as_tensor(ref), atol=1e-5, rtol=1e-5)


def test_slabs_cover_every_slice_once_in_order() -> None:
    seen: list[int] = []
    window = SlidingWindow((8, 8, 8), 0.5, 4, "gaussian", 0.0)
    window.run(torch.zeros(1, 1, 9, 10, 29), lambda x: x.repeat(1, 2, 1, 1, 1), lambda s: seen.append(s.shape[3]),
               torch.device("cpu"))
    assert sum(seen) == 29 and all(n > 0 for n in seen) and len(seen) > 3


def test_tile_starts_cover_the_axis() -> None:
    for size, patch in [(100, 32), (33, 32), (32, 32), (7, 32)]:
        starts = tile_starts(max(size, patch), patch, 0.5)
        assert starts[0] == 0 and starts[-1] + patch == max(size, patch)
        assert all(b - a <= patch for a, b in itertools.pairwise(starts))


def test_tta_is_the_mean_over_eight_mirrorings() -> None:
    image = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    net = _net()
    with torch.no_grad():
        tta = sliding_window_logits(image, net, SlidingWindow((16, 16, 16), 0.5, 2, "gaussian", 0.0, tta=True))
        manual = sum(torch.flip(net(torch.flip(image, d)), d) for d in mirror_axes(True)) / 8
    torch.testing.assert_close(tta, manual, atol=1e-5, rtol=1e-5)


def test_streamed_resampling_equals_one_push() -> None:
    """Slabs pushed as the window finishes them give the same labels as resampling the whole logits."""
    logits = torch.randn(3, 12, 10, 17, generator=torch.Generator().manual_seed(3))
    src = np.diag([2.0, 2.0, 2.5, 1.0])
    dst = np.diag([0.8, 0.9, 1.0, 1.0])
    dst[:3, 3] = [0.3, -0.2, 0.1]
    shape = (30, 22, 42)
    whole = resample_argmax(logits, src, dst, shape)
    out = np.zeros(shape, np.uint8)
    resampler = SlabResampler((12, 10, 17), src, dst, out, argmax_reduce, slab=5)
    for k0, k1 in [(0, 3), (3, 4), (4, 11), (11, 17)]:
        resampler.push(logits[..., k0:k1])
    resampler.close()
    np.testing.assert_array_equal(out, whole)


def test_streamed_resampling_refuses_a_rotated_grid() -> None:
    rot = np.eye(4)
    rot[:3, :3] = [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    with pytest.raises(ValueError, match="last axis"):
        SlabResampler((4, 4, 4), np.eye(4), rot, np.zeros((4, 4, 4), np.uint8), argmax_reduce)
