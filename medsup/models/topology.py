"""Network topology from voxel spacing and patch size (nnU-Net's ``get_pool_and_conv_props`` rule).

Pure Python: planning imports this without torch.

Rule, per encoder stage after the first: an axis is downsampled (stride 2) while its feature map stays at
least ``2 * min_feature_map`` voxels and its current spacing is at most twice the finest current spacing,
so thick-slice axes wait until the in-plane axes have caught up. Kernels are 3 along axes whose current
spacing is at most twice the finest, else 1 (no mixing across 5 mm slices at full resolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """Kernels, strides and channels of every encoder stage.

    ``strides[0]`` is all ones (the first stage keeps full resolution); decoder stage ``s`` mirrors encoder
    stage ``s`` and a segmentation head sits on every decoder scale.
    """

    kernels: tuple[tuple[int, int, int], ...]
    strides: tuple[tuple[int, int, int], ...]
    filters: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        """Encoder stages, the bottleneck included."""
        return len(self.strides)

    @property
    def divisor(self) -> tuple[int, int, int]:
        """Patch sizes must be divisible by this per axis (the product of the strides)."""
        return (
            math.prod(s[0] for s in self.strides),
            math.prod(s[1] for s in self.strides),
            math.prod(s[2] for s in self.strides),
        )

    def scales(self, patch: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        """Feature-map size of each stage for ``patch`` (stage 0 = full resolution)."""
        sizes = []
        current = list(patch)
        for stride in self.strides:
            current = [c // s for c, s in zip(current, stride, strict=True)]
            sizes.append((current[0], current[1], current[2]))
        return sizes

    def check_patch(self, patch: tuple[int, int, int]) -> None:
        """Raise a ValueError naming the axis when ``patch`` is not divisible by :attr:`divisor`."""
        for axis, (p, d) in enumerate(zip(patch, self.divisor, strict=True)):
            if p % d:
                raise ValueError(
                    f"patch size {list(patch)} is not divisible by the stride product {list(self.divisor)} "
                    f"along axis {axis} ({p} % {d} = {p % d}); use a multiple of {d}"
                )

    def as_dict(self) -> dict[str, list[list[int]] | list[int]]:
        """JSON-ready view."""
        return {
            "kernels": [list(k) for k in self.kernels],
            "strides": [list(s) for s in self.strides],
            "filters": list(self.filters),
        }

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> Topology:
        """Inverse of :meth:`as_dict`."""
        kernels = tuple((int(a), int(b), int(c)) for a, b, c in data["kernels"])
        strides = tuple((int(a), int(b), int(c)) for a, b, c in data["strides"])
        filters = tuple(int(f) for f in data["filters"])
        if not (len(kernels) == len(strides) == len(filters)):
            raise ValueError(
                f"topology lists differ in length: {len(kernels)} kernels, {len(strides)} strides, "
                f"{len(filters)} filters"
            )
        if strides and strides[0] != (1, 1, 1):
            raise ValueError(f"the first stage must not downsample, got stride {list(strides[0])}")
        return cls(kernels, strides, filters)


def _kernel(spacing: list[float]) -> tuple[int, int, int]:
    finest = min(spacing)
    k = [3 if s <= 2 * finest else 1 for s in spacing]
    return (k[0], k[1], k[2])


def plan_topology(
    spacing: tuple[float, float, float],
    patch: tuple[int, int, int],
    min_feature_map: int = 4,
    max_stages: int = 6,
    base_filters: int = 32,
    max_filters: int = 320,
) -> Topology:
    """Choose kernels, strides and filters for ``patch`` at ``spacing`` (mm).

    Args:
        spacing: voxel spacing of the training data along ``(i, j, k)``.
        patch: patch size in voxels.
        min_feature_map: coarsest feature map size along a pooled axis.
        max_stages: encoder stages at most, the first (full-resolution) one included.
        base_filters: channels of stage 0, doubled per stage and capped at ``max_filters``.
    """
    if len(spacing) != 3 or len(patch) != 3:
        raise ValueError(f"spacing and patch must have 3 entries, got {spacing} and {patch}")
    if min(spacing) <= 0:
        raise ValueError(f"spacing must be positive, got {list(spacing)}")
    if min(patch) < 1:
        raise ValueError(f"patch sizes must be >= 1, got {list(patch)}")
    current_spacing = [float(s) for s in spacing]
    current_size = [int(p) for p in patch]
    kernels = [_kernel(current_spacing)]
    strides = [(1, 1, 1)]
    while len(strides) < max_stages:
        finest = min(current_spacing)
        stride = [
            2 if size >= 2 * min_feature_map and sp <= 2 * finest else 1
            for size, sp in zip(current_size, current_spacing, strict=True)
        ]
        if stride == [1, 1, 1]:
            break
        current_spacing = [sp * st for sp, st in zip(current_spacing, stride, strict=True)]
        current_size = [sz // st for sz, st in zip(current_size, stride, strict=True)]
        strides.append((stride[0], stride[1], stride[2]))
        kernels.append(_kernel(current_spacing))
    filters = tuple(min(base_filters * 2**i, max_filters) for i in range(len(strides)))
    return Topology(tuple(kernels), tuple(strides), filters)
