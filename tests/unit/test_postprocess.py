"""Postprocessing: largest organ component, lesions only inside or touching it, memory-lean helpers."""

from __future__ import annotations

import numpy as np

from medsup.inference.postprocess import bincount_slabs, bounding_box, label_components, postprocess


def test_keeps_the_largest_organ_and_the_lesions_that_touch_it() -> None:
    labels = np.zeros((30, 30, 40), np.uint8)
    labels[2:14, 2:14, 2:20] = 1  # the organ
    labels[5:8, 5:8, 5:8] = 2  # a lesion inside it
    labels[14:16, 5:7, 5:7] = 2  # a lesion touching it from outside
    labels[20:24, 20:24, 30:34] = 1  # a smaller organ island
    labels[27:29, 2:4, 36:38] = 2  # a lesion floating in air
    expected = labels.copy()
    expected[20:24, 20:24, 30:34] = 0
    expected[27:29, 2:4, 36:38] = 0
    out = postprocess(labels, organ_classes=[1], lesion_classes=[2], chunk=7)
    assert out is labels
    np.testing.assert_array_equal(out, expected)


def test_empty_and_organless_maps_are_left_alone() -> None:
    empty = np.zeros((8, 8, 8), np.uint8)
    np.testing.assert_array_equal(postprocess(empty.copy(), [1], [2]), empty)
    lesions = np.zeros((8, 8, 8), np.uint8)
    lesions[1, 1, 1] = lesions[5, 5, 5] = 2
    np.testing.assert_array_equal(postprocess(lesions.copy(), [], [2]), lesions)


def test_bincount_slabs_equals_bincount() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(9, 7, 33), dtype=np.uint8)
    np.testing.assert_array_equal(bincount_slabs(a, 5, chunk=4), np.bincount(a.ravel(), minlength=5))
    np.testing.assert_array_equal(bincount_slabs(a, 3, chunk=4), np.bincount(a.ravel())[:3])


def test_more_components_than_uint16_holds() -> None:
    mask = np.zeros((3, 520, 520), bool)
    mask[::2, ::2, ::2] = True  # isolated voxels: 2 x 260 x 260 components
    ids, n = label_components(mask)
    assert n == 2 * 260 * 260 and ids.dtype == np.int32
    small, m = label_components(mask[:1, :20, :20])
    assert m == 100 and small.dtype == np.uint16


def test_bounding_box() -> None:
    mask = np.zeros((10, 11, 12), bool)
    mask[2, 3, 4] = mask[5, 9, 6] = True
    assert bounding_box(mask) == (slice(2, 6), slice(3, 10), slice(4, 7))
