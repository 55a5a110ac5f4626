"""Resampling between voxel grids by their affines, one slab of output slices at a time.

Used both ways: preprocessing resamples a scan onto the plan spacing (MONAI's ``Spacingd`` builds a full
coordinate grid, ~7x the input in memory; slabs need a fraction), and inference maps network-resolution
logits back onto the input's exact grid (nnU-Net resamples full probability maps on the CPU, which
dominates its inference time and memory; here logits stay on the compute device and each slab is reduced,
e.g. argmax'ed, at once, so only a uint8 label map of the full grid is ever held).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.nn.functional import grid_sample


def resample_slabs(logits: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray,
                   dst_shape: tuple[int, int, int], reduce: Callable[[torch.Tensor], torch.Tensor],
                   dtype: type[np.generic], slab: int = 8, mode: str = "bilinear") -> np.ndarray:
    """Resample ``logits`` ``(C, x, y, z)`` (voxel->world ``src_affine``; trilinear or ``nearest``) onto the grid
    ``dst_shape`` / ``dst_affine``, reducing each resampled slab ``(C, X, Y, s)`` to ``(X, Y, s)`` with
    ``reduce`` (argmax, one softmax channel, ...). Returns an ``(X, Y, Z)`` array of ``dtype``.

    Output voxels outside the source grid take the nearest border value.
    """
    dev = logits.device
    to_src = torch.as_tensor(np.linalg.inv(src_affine) @ dst_affine, dtype=torch.float32, device=dev)
    src_shape = torch.tensor(logits.shape[1:], dtype=torch.float32, device=dev)
    volume = logits.float()[None]  # (1, C, x, y, z)
    out = np.empty(dst_shape, dtype=dtype)
    ii, jj = torch.meshgrid(torch.arange(dst_shape[0], device=dev, dtype=torch.float32),
                            torch.arange(dst_shape[1], device=dev, dtype=torch.float32), indexing="ij")
    for k0 in range(0, dst_shape[2], slab):
        k1 = min(dst_shape[2], k0 + slab)
        n = k1 - k0
        kk = torch.arange(k0, k1, device=dev, dtype=torch.float32).expand(dst_shape[0], dst_shape[1], n)
        idx = torch.stack([ii[..., None].expand(-1, -1, n), jj[..., None].expand(-1, -1, n), kk,
                           torch.ones_like(kk)], dim=-1)
        src = idx @ to_src.T  # (X, Y, s, 4) continuous source voxel indices
        # grid_sample wants coordinates in [-1, 1] (align_corners: -1 and 1 are the first and last voxel
        # centres), ordered (z, y, x) for an input laid out (D=x, H=y, W=z)
        norm = 2 * src[..., :3] / (src_shape - 1).clamp(min=1) - 1
        sampled = grid_sample(volume, norm.flip(-1)[None], mode=mode, padding_mode="border", align_corners=True)
        out[:, :, k0:k1] = reduce(sampled[0]).cpu().numpy().astype(dtype, copy=False)
    return out


def resample_argmax(logits: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray,
                    dst_shape: tuple[int, int, int]) -> np.ndarray:
    """Labels (``uint8``) on the destination grid: argmax of the resampled logits."""
    return resample_slabs(logits, src_affine, dst_affine, dst_shape,
                          lambda x: x.argmax(0).to(torch.uint8), np.uint8)


def resample_probability(logits: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray,
                         dst_shape: tuple[int, int, int], channel: int) -> np.ndarray:
    """Softmax probability of ``channel`` (``float32``) on the destination grid."""
    return resample_slabs(logits, src_affine, dst_affine, dst_shape,
                          lambda x: torch.softmax(x, 0)[channel], np.float32)


def spacing_grid(affine: np.ndarray, shape: tuple[int, ...], spacing: tuple[float, float, float]
                 ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The grid with voxel 0 and the axis directions of ``affine`` but ``spacing`` mm between voxels, covering
    the same span of voxel centres (MONAI ``Spacing``'s convention). Returns ``(affine, shape)``."""
    current = np.linalg.norm(affine[:3, :3], axis=0)
    target = np.asarray(spacing, dtype=np.float64)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] / current * target
    n = [max(1, round((s - 1) * c / t) + 1) for s, c, t in zip(shape, current, target, strict=True)]
    return out, (n[0], n[1], n[2])


def resample_to_spacing(volume: torch.Tensor, affine: np.ndarray, spacing: tuple[float, float, float],
                        mode: str = "bilinear") -> tuple[torch.Tensor, np.ndarray]:
    """``volume`` ``(C, x, y, z)`` onto ``spacing`` (see :func:`spacing_grid`); ``mode`` ``nearest`` for labels.

    Returns the resampled ``(C, X, Y, Z)`` float32 tensor (on ``volume``'s device) and its affine.
    """
    dst_affine, dst_shape = spacing_grid(affine, tuple(volume.shape[1:]), spacing)
    if dst_shape == tuple(volume.shape[1:]) and np.allclose(dst_affine, affine):
        return volume.float(), affine
    out = torch.empty((volume.shape[0], *dst_shape), dtype=torch.float32)
    for c in range(volume.shape[0]):  # one channel at a time: CT has one, so no stacking copy
        out[c] = torch.from_numpy(resample_slabs(volume[c:c + 1], affine, dst_affine, dst_shape, lambda x: x[0],
                                                 np.float32, mode=mode))
    return out.to(volume.device), dst_affine
