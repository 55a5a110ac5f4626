"""Map network-resolution logits back onto the input's exact voxel grid, slab by slab.

nnU-Net exports by resampling full probability maps on the CPU, which dominates its inference time and
memory. Here the logits stay on the compute device and are interpolated one slab of output slices at a
time, then argmax'ed, so only a uint8 label map of the full grid is ever held.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.nn.functional import grid_sample


def resample_slabs(logits: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray,
                   dst_shape: tuple[int, int, int], reduce: Callable[[torch.Tensor], torch.Tensor],
                   dtype: type[np.generic], slab: int = 32) -> np.ndarray:
    """Trilinearly resample ``logits`` ``(C, x, y, z)`` (voxel->world ``src_affine``) onto the grid
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
        sampled = grid_sample(volume, norm.flip(-1)[None], mode="bilinear", padding_mode="border",
                              align_corners=True)
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
