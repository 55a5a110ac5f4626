"""The streaming sliding window equals MONAI's SlidingWindowInferer and hands out every slice exactly once."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer

import medsup.inference.window as window_module
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


@pytest.mark.parametrize(("tta", "shape"), [(False, (40, 37, 50)), (True, (40, 37, 50)),
                                             (False, (40, 37, 9))])  # z padded with the air value
def test_tiles_of_one_value_are_predicted_once_and_still_equal_monai(tta: bool, shape: tuple[int, int, int]) -> None:
    # a CT's air (or anything below the clip) is one value: here two such regions, -1.5 and 0.25, and tissue
    image = torch.full((1, 1, *shape), -1.5)
    image[..., 24:, :, 30:] = 0.25
    image[..., :12, :14, :8] = torch.randn(12, 14, 8, generator=torch.Generator().manual_seed(4))
    net = _net()
    seen: list[int] = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return net(x)

    window = SlidingWindow((16, 16, 16), 0.5, 3, "gaussian", -1.5, tta=tta)
    tiles = math.prod(len(tile_starts(n, 16, 0.5)) for n in image.shape[2:])
    flips = 8 if tta else 1
    with torch.no_grad():
        reused = sliding_window_logits(image, counted, window)
        assert flips <= sum(seen) <= tiles // 2 * flips  # most tiles hold one value; each value runs once
        seen.clear()
        window.reuse_constant = False
        plain = sliding_window_logits(image, counted, window)
        assert sum(seen) == tiles * flips
        monai = SlidingWindowInferer((16, 16, 16), sw_batch_size=3, overlap=0.5, mode="gaussian", sigma_scale=0.125,
                                     padding_mode="constant", cval=-1.5)
        ref = torch.as_tensor(monai(image, net)) if not tta else plain
    torch.testing.assert_close(reused, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reused, ref, atol=1e-5, rtol=1e-5)


def test_a_case_keeps_the_logits_of_at_most_a_few_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(window_module, "MAX_CONSTANT_TILES", 1)
    image = torch.full((1, 1, 32, 32, 40), -1.5)
    image[..., 16:, :, :] = 0.25  # a second value: predicted every time, as the case keeps one
    image[..., :, :, 30:] = torch.randn(32, 32, 10, generator=torch.Generator().manual_seed(5))
    net = _net()
    seen: list[int] = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return net(x)

    window = SlidingWindow((16, 16, 16), 0.5, 4, "gaussian", -1.5)
    with torch.no_grad():
        reused = sliding_window_logits(image, counted, window)
        calls_reused, seen[:] = sum(seen), []
        window.reuse_constant = False
        plain = sliding_window_logits(image, counted, window)
    starts = [tile_starts(n, 16, 0.5) for n in image.shape[2:]]
    tile_values = [float(t.unique()[0]) if t.unique().numel() == 1 else None
                   for t in (image[..., i:i + 16, j:j + 16, k:k + 16] for i, j, k in itertools.product(*starts))]
    air = tile_values.count(-1.5)
    assert air > 2 and tile_values.count(0.25) > 2 and sum(seen) == len(tile_values)
    assert calls_reused == len(tile_values) - (air - 1)  # every -1.5 tile but the first reuses; 0.25 ones do not
    torch.testing.assert_close(reused, plain, atol=1e-5, rtol=1e-5)


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
