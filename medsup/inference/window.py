"""Sliding-window inference: MONAI's inferer with Gaussian blending, optional mirror TTA."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from monai.inferers import SlidingWindowInferer

Network = Callable[[torch.Tensor], torch.Tensor]


def make_inferer(patch: Sequence[int], overlap: float, sw_batch_size: int, blend: str, pad_value: float,
                 device: torch.device | None = None) -> SlidingWindowInferer:
    """Tiles of ``patch`` with ``overlap``, blended with a Gaussian importance map (sigma 1/8 of the patch,
    nnU-Net's) or uniformly. ``device`` is where tiles are stitched (None: the input's device).

    A volume smaller than the patch is padded with ``pad_value``: the normalised value of air that training
    pads with too (padding with 0 would show the network a wall of average-foreground tissue).
    """
    return SlidingWindowInferer(roi_size=list(patch), sw_batch_size=sw_batch_size, overlap=overlap,
                                mode=blend, sigma_scale=0.125, padding_mode="constant", cval=pad_value,
                                progress=False, device=device)


def mirror_axes(tta: bool) -> list[tuple[int, ...]]:
    """Flip combinations of the three spatial dims (2, 3, 4) for mirror TTA: all 8, or just identity."""
    if not tta:
        return [()]
    return [c for n in range(4) for c in itertools.combinations((2, 3, 4), n)]


def sliding_window_logits(image: torch.Tensor, network: Network, inferer: SlidingWindowInferer,
                          tta: bool = False) -> torch.Tensor:
    """Logits ``(1, C, X, Y, Z)`` of ``image`` ``(1, 1, X, Y, Z)``; with ``tta`` the mean over 8 mirrorings."""
    total: torch.Tensor | None = None
    flips = mirror_axes(tta)
    for dims in flips:
        x = torch.flip(image, dims) if dims else image
        logits = torch.as_tensor(inferer(x, network))
        logits = torch.flip(logits, dims) if dims else logits
        total = logits if total is None else total.add_(logits)
    assert total is not None
    return total.div_(len(flips)) if len(flips) > 1 else total
