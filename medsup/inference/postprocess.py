"""Task postprocessing: the organ keeps its largest connected component; lesions must touch it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    components, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax())


def postprocess(labels: np.ndarray, organ_classes: Sequence[int], lesion_classes: Sequence[int]) -> np.ndarray:
    """Keep the largest connected component of organ-or-lesion; drop voxels of it that fell outside.

    Lesions are kept only where they are part of that component, i.e. inside the organ or touching it
    (nnU-Net's "largest component of foreground" rule, which is what it selects for LiTS). Modifies and
    returns ``labels`` (uint8 ``(X, Y, Z)``).
    """
    if not organ_classes:
        return labels
    region = np.isin(labels, [*organ_classes, *lesion_classes])
    if not region.any():
        return labels
    keep = largest_component(region)
    labels[region & ~keep] = 0
    return labels
