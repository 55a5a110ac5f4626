"""Task postprocessing: the organ keeps its largest connected component; lesions must touch it.

Written for full-size CT on the host: work happens inside the bounding box of the region, component ids are
uint16 when they fit, and everything else goes slab by slab, so the peak is the label map, one boolean map
and one component map (``np.bincount`` or ``==`` on whole arrays would add int64 and boolean copies).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def bincount_slabs(array: np.ndarray, length: int, chunk: int = 16) -> np.ndarray:
    """``np.bincount`` of a non-negative integer ``(I, J, K)`` array, slab by slab along K (``np.bincount``
    copies its input to int64 first: 8x a uint8 map). Values ``>= length`` are not counted."""
    counts = np.zeros(length, dtype=np.int64)
    for k in range(0, array.shape[2], chunk):
        counts += np.bincount(array[..., k:k + chunk].ravel(), minlength=length)[:length]
    return counts


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a boolean mask: ``(ids, count)``, ids uint16 when they fit, else int32."""
    structure = np.ones((3, 3, 3), bool)
    try:
        ids, n = ndimage.label(mask, structure=structure, output=np.uint16)
    except RuntimeError:  # more than 65535 components (noise): scipy refuses the narrow type
        ids, n = ndimage.label(mask, structure=structure, output=np.int32)
    return ids, int(n)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    ids, n = label_components(mask)
    if n <= 1:
        return mask
    sizes = bincount_slabs(ids, n + 1)
    sizes[0] = 0
    return np.asarray(ids == int(sizes.argmax()))


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (one slice per axis) holding every True voxel of a non-empty ``mask``."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def postprocess(labels: np.ndarray, organ_classes: Sequence[int], lesion_classes: Sequence[int],
                chunk: int = 16) -> np.ndarray:
    """Keep the largest connected component of organ-or-lesion; drop voxels of it that fell outside.

    Lesions are kept only where they are part of that component, i.e. inside the organ or touching it
    (nnU-Net's "largest component of foreground" rule, which is what it selects for LiTS). Modifies and
    returns ``labels`` (uint8 ``(X, Y, Z)``).
    """
    if not organ_classes:
        return labels
    region = np.zeros(labels.shape, dtype=bool)
    for c in (*organ_classes, *lesion_classes):
        region |= labels == c
    if not region.any():
        return labels
    box = bounding_box(region)
    ids, n = label_components(region[box])
    del region  # ids != 0 is the region from here on
    if n <= 1:
        return labels
    sizes = bincount_slabs(ids, n + 1, chunk)
    sizes[0] = 0
    keep = int(sizes.argmax())
    inside = labels[box]  # a view: assignments land in ``labels``
    for k in range(0, ids.shape[2], chunk):
        part = ids[..., k:k + chunk]
        inside[..., k:k + chunk][(part != 0) & (part != keep)] = 0
    return labels
