"""Evaluation metrics against hand-computed values, the empty-mask conventions and MONAI's implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from medsup.evaluation.evaluate import CaseResult, aggregate
from medsup.evaluation.metrics import (
    bounding_box,
    class_metrics,
    dice,
    hd95,
    lesion_detection,
    normalized_surface_dice,
    size_bin,
    surface,
    surface_distances,
    volume_ml,
)


def planes(shape: tuple[int, int, int], axis: int, first: int, second: int) -> tuple[np.ndarray, np.ndarray]:
    """Two single-voxel-thick planes perpendicular to ``axis`` at indices ``first`` and ``second``."""
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    index: list[slice | int] = [slice(None)] * 3
    index[axis] = first
    a[tuple(index)] = True
    index[axis] = second
    b[tuple(index)] = True
    return a, b


def blob(seed: int, shape: tuple[int, int, int] = (24, 20, 16), level: float = 0.3) -> np.ndarray:
    """A smooth random blob (thresholded Gaussian-filtered noise)."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma=2.5)
    return noise > level * noise.std()


def test_dice_by_hand() -> None:
    pred, ref = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    pred[0, 0, :2] = True  # 2 voxels
    ref[0, 0, 1:4] = True  # 3 voxels, 1 shared
    assert dice(pred, ref) == pytest.approx(2 * 1 / 5)
    assert dice(ref, ref) == 1.0


@pytest.mark.parametrize(("axis", "spacing", "expected_mm"),
                         [(2, (1.0, 1.0, 2.5), 7.5), (0, (0.7, 1.0, 3.0), 2.1), (1, (0.5, 1.6, 0.9), 4.8)])
def test_planes_at_known_distance_with_anisotropic_spacing(axis: int, spacing: tuple[float, float, float],
                                                           expected_mm: float) -> None:
    pred, ref = planes((8, 8, 8), axis, 2, 5)  # 3 voxels apart along `axis`
    assert np.array_equal(surface(pred), pred)  # a one-voxel-thick plane is all surface
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    assert to_ref.size == to_pred.size == 64
    np.testing.assert_allclose(to_ref, expected_mm)
    np.testing.assert_allclose(to_pred, expected_mm)
    assert hd95(pred, ref, spacing) == pytest.approx(expected_mm)
    assert normalized_surface_dice(pred, ref, spacing, expected_mm) == 1.0  # d <= tolerance counts
    assert normalized_surface_dice(pred, ref, spacing, expected_mm - 0.01) == 0.0
    assert dice(pred, ref) == 0.0


def test_hd95_is_the_larger_directed_percentile() -> None:
    # ref: a plane at k=0; pred: the same plane plus one stray voxel 6 voxels away (2 mm each along k)
    spacing = (1.0, 1.0, 2.0)
    ref = np.zeros((10, 10, 8), bool)
    ref[:, :, 0] = True
    pred = ref.copy()
    pred[5, 5, 6] = True
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    assert sorted(set(to_pred.tolist())) == [0.0]  # every ref voxel is on pred's surface
    assert to_ref.max() == pytest.approx(12.0)  # the stray voxel is 6 * 2 mm from the plane
    expected = max(np.percentile(to_ref, 95), np.percentile(to_pred, 95))
    assert hd95(pred, ref, spacing) == pytest.approx(expected)
    # 100 plane voxels at 0 and 1 at 12 mm: the 95th percentile ignores the outlier, the maximum would not
    assert hd95(pred, ref, spacing) == 0.0


def test_nsd_by_hand() -> None:
    # pred plane k=2, ref plane k=3 over half of its extent and k=6 over the other half; spacing 1 mm
    pred = np.zeros((4, 4, 8), bool)
    pred[:, :, 2] = True
    ref = np.zeros((4, 4, 8), bool)
    ref[:2, :, 3] = True
    ref[2:, :, 6] = True
    # ref -> pred: the 8 voxels at k=3 are 1 mm away (in), the 8 at k=6 are 4 mm away (out)
    # pred -> ref: rows i=0,1 are 1 mm from k=3 (8 in); row i=2 is sqrt(1 + 1) = 1.41 mm from (1, j, 3) (4 in);
    # row i=3 is sqrt(4 + 1) = 2.24 mm from (1, j, 3) and 4 mm from (3, j, 6) (4 out)
    assert normalized_surface_dice(pred, ref, (1.0, 1.0, 1.0), 1.5) == pytest.approx((8 + 4 + 8) / 32)


def test_volume_in_ml() -> None:
    mask = np.zeros((5, 5, 5), bool)
    mask[0, 0, :] = True
    mask[1, 0, :] = True  # 10 voxels of 1 x 2 x 3 mm = 60 mm^3
    assert volume_ml(mask, (1.0, 2.0, 3.0)) == pytest.approx(0.06)
    m = class_metrics(mask, np.zeros_like(mask), (1.0, 2.0, 3.0), 2.0)
    assert m.volume_pred_ml == pytest.approx(0.06) and m.volume_ref_ml == 0.0
    assert m.volume_diff_ml == pytest.approx(0.06) and m.volume_abs_diff_ml == pytest.approx(0.06)
    assert math.isnan(m.volume_rel_diff)
    half = mask.copy()
    half[1] = False
    m = class_metrics(half, mask, (1.0, 2.0, 3.0), 2.0)
    assert m.volume_diff_ml == pytest.approx(-0.03) and m.volume_rel_diff == pytest.approx(-0.5)


def test_empty_mask_conventions() -> None:
    empty = np.zeros((6, 6, 6), bool)
    full = empty.copy()
    full[2:4, 2:4, 2:4] = True
    spacing = (1.0, 1.0, 1.0)
    # both empty: Dice NaN (excluded from means), HD95 NaN, NSD NaN
    both = class_metrics(empty, empty, spacing, 1.0)
    assert math.isnan(both.dice) and math.isnan(both.hd95_mm) and math.isnan(both.nsd)
    assert math.isnan(dice(empty, empty)) and math.isnan(hd95(empty, empty, spacing))
    assert math.isnan(normalized_surface_dice(empty, empty, spacing, 1.0))
    # reference empty, prediction not (false positive) and the reverse: Dice 0, HD95 NaN, NSD 0
    for pred, ref in ((full, empty), (empty, full)):
        m = class_metrics(pred, ref, spacing, 1.0)
        assert m.dice == 0.0 and math.isnan(m.hd95_mm) and m.nsd == 0.0
        assert dice(pred, ref) == 0.0 and math.isnan(hd95(pred, ref, spacing))
        assert normalized_surface_dice(pred, ref, spacing, 1.0) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(full, empty, spacing)


def test_bounding_box_crop_changes_nothing() -> None:
    pred, ref = blob(1, (20, 18, 14)), blob(2, (20, 18, 14))
    big_pred, big_ref = np.zeros((40, 30, 30), bool), np.zeros((40, 30, 30), bool)
    big_pred[10:30, 5:23, 8:22], big_ref[10:30, 5:23, 8:22] = pred, ref
    spacing = (0.8, 1.1, 2.0)
    assert class_metrics(pred, ref, spacing, 2.0) == class_metrics(big_pred, big_ref, spacing, 2.0)
    box = bounding_box(big_pred, big_ref)
    assert box is not None and box[0].start >= 9 and box[0].stop <= 31
    assert bounding_box(np.zeros((3, 3, 3), bool)) is None


def test_bad_arguments() -> None:
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        dice(a, np.zeros((4, 4, 5), bool))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        class_metrics(a, a, (1.0, 1.0, 1.0), -1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_monai(seed: int) -> None:
    """Our Dice, HD95 and NSD equal MONAI's compute_dice / compute_hausdorff_distance(percentile=95) /
    compute_surface_dice(use_subvoxels=False) on random blobs with anisotropic spacing (some touch the border)."""
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    pred, ref = blob(10 + seed), blob(20 + seed, level=0.1 * seed)
    assert pred.any() and ref.any() and (pred[0].any() or ref[0].any() or pred[-1].any() or ref[-1].any())
    spacing = (0.8, 1.3, 2.5)
    tolerance = 2.0

    def onehot(mask: np.ndarray) -> object:
        return torch.from_numpy(mask[None, None].astype(np.float32))

    ours = class_metrics(pred, ref, spacing, tolerance)
    theirs_dice = float(compute_dice(onehot(pred), onehot(ref), include_background=True)[0, 0])
    theirs_hd = float(compute_hausdorff_distance(onehot(pred), onehot(ref), include_background=True,
                                                 percentile=95, spacing=list(spacing))[0, 0])
    theirs_nsd = float(compute_surface_dice(onehot(pred), onehot(ref), [tolerance], include_background=True,
                                            spacing=list(spacing), use_subvoxels=False)[0, 0])
    assert ours.dice == pytest.approx(theirs_dice, abs=1e-6)
    assert ours.hd95_mm == pytest.approx(theirs_hd, rel=1e-4, abs=1e-4)
    assert ours.nsd == pytest.approx(theirs_nsd, abs=1e-6)
    assert ours.hd95_mm > 0 and 0 < ours.nsd < 1


def _case(name: str, pred: np.ndarray, ref: np.ndarray) -> CaseResult:
    return CaseResult(name, "ok", classes={"organ": class_metrics(pred, ref, (1.0, 1.0, 1.0), 1.0)})


def test_global_dice_differs_from_the_mean_and_nan_is_excluded() -> None:
    shape = (10, 10, 10)
    one = np.zeros(shape, bool)
    one[5, 5, 5] = True  # case a: one voxel, found exactly -> Dice 1
    big_pred, big_ref = np.zeros(shape, bool), np.zeros(shape, bool)
    big_pred[:5, :4, :5], big_ref[5:, :4, :5] = True, True  # case b: 100 voxels each, no overlap -> Dice 0
    empty = np.zeros(shape, bool)  # case c: both empty -> NaN, excluded
    cases = [_case("a", one, one), _case("b", big_pred, big_ref), _case("c", empty, empty),
             CaseResult("d", "missing"), CaseResult("e", "error")]
    block = aggregate(cases, ["organ"])["organ"]
    assert block["dice"]["mean"] == pytest.approx(0.5) and block["dice"]["median"] == pytest.approx(0.5)
    assert block["dice"]["std"] == pytest.approx(0.5)  # population std of [1, 0]
    assert block["dice"]["n"] == 2 and block["dice"]["n_nan"] == 1
    assert block["dice"]["global"] == pytest.approx(2 * 1 / (1 + 1 + 100 + 100))
    assert block["hd95_mm"]["n"] == 2 and block["hd95_mm"]["n_undefined"] == 1
    assert math.isnan(aggregate([], ["organ"])["organ"]["dice"]["global"])


def test_lesion_detection_by_hand() -> None:
    ref, pred = np.zeros((20, 20, 20), bool), np.zeros((20, 20, 20), bool)
    ref[2:5, 2:5, 2:5] = True           # lesion A: 27 voxels
    ref[10, 10, 10] = ref[11, 11, 11] = True  # lesion B: two voxels touching at a corner (26-connected: one)
    ref[15, 2, 2] = True                # lesion C: one voxel, missed
    pred[2:5, 2:4, 4:6] = True          # 12 voxels, 6 inside A (6/27 = 0.22 of A; 6/12 of itself): a hit both ways
    pred[10, 10, 10] = True             # covers half of B
    pred[17:19, 17:19, 17] = True       # 4 voxels far from everything: a false positive
    spacing = (0.5, 1.0, 2.0)           # 1 mm^3 voxels
    d = lesion_detection(pred, ref, spacing, min_overlap=0.1)
    assert [round(les.covered, 4) for les in d.reference] == [round(6 / 27, 4), 0.5, 0.0]
    assert [les.hit for les in d.reference] == [True, True, False]
    assert [les.hit for les in d.predicted] == [True, True, False]
    assert d.counts() == {"ref_lesions": 3, "detected_lesions": 2, "pred_lesions": 3, "fp_lesions": 1}
    assert d.reference[0].volume_ml == pytest.approx(0.027)
    assert d.reference[0].diameter_mm == pytest.approx((6 * 27 / math.pi) ** (1 / 3))
    # at 0.6 neither A (22% covered) nor B (50%) is found; the voxel inside B still lies wholly in the reference
    # (not a false positive), the piece half inside A now is one
    strict = lesion_detection(pred, ref, spacing, min_overlap=0.6)
    assert strict.detected == 0 and [les.hit for les in strict.predicted] == [False, True, False]
    assert lesion_detection(pred, ref, spacing, min_overlap=0.5).detected == 1  # exactly half counts (>=)
    # a prediction flooding the region around A: A is wholly covered, but by one false positive (27 of its 343
    # voxels are lesion, < 0.1): nothing is found
    flood = np.zeros_like(ref)
    flood[0:7, 0:7, 0:7] = True
    flooded = lesion_detection(flood, ref, spacing, min_overlap=0.1)
    assert flooded.counts() == {"ref_lesions": 3, "detected_lesions": 0, "pred_lesions": 1, "fp_lesions": 1}
    assert flooded.reference[0].covered == 0.0
    empty = lesion_detection(np.zeros_like(ref), np.zeros_like(ref), spacing, 0.1)
    assert empty.counts() == {"ref_lesions": 0, "detected_lesions": 0, "pred_lesions": 0, "fp_lesions": 0}
    with pytest.raises(ValueError, match="min_overlap"):
        lesion_detection(pred, ref, spacing, 0.0)
    assert [size_bin(v) for v in (0.5, 5.0, 9.99, 10.0, 25.0)] == ["<5mm", "5-10mm", "5-10mm", "10-20mm", ">=20mm"]


def test_lesion_aggregate_is_pooled_over_cases() -> None:
    spacing = (1.0, 1.0, 1.0)
    ref, pred = np.zeros((30, 12, 12), bool), np.zeros((30, 12, 12), bool)
    ref[1:9, 1:9, 1:9] = True                                  # 512 mm^3: 9.9 mm equivalent diameter
    pred[1:9, 1:9, 1:9] = True
    pred[20, 5, 5] = True                                      # a false positive
    found = CaseResult("a", "ok", classes={"t": class_metrics(pred, ref, spacing, 1.0)},
                       lesions={"t": lesion_detection(pred, ref, spacing, 0.1)})
    none_found = np.zeros_like(ref)
    missed = CaseResult("b", "ok", classes={"t": class_metrics(none_found, ref, spacing, 1.0)},
                        lesions={"t": lesion_detection(none_found, ref, spacing, 0.1)})
    block = aggregate([found, missed], ["t"])["t"]["lesions"]
    assert (block["reference"], block["detected"], block["predicted"], block["false_positives"]) == (2, 1, 2, 1)
    assert block["recall"] == 0.5 and block["precision"] == 0.5 and block["f1"] == 0.5
    assert block["fp_per_case"] == 0.5
    assert block["by_size"]["5-10mm"] == {"reference": 2, "detected": 1, "recall": 0.5}
    assert block["by_size"]["<5mm"]["reference"] == 0 and math.isnan(block["by_size"]["<5mm"]["recall"])
    nothing = CaseResult("c", "ok", classes={"t": class_metrics(none_found, none_found, spacing, 1.0)},
                         lesions={"t": lesion_detection(none_found, none_found, spacing, 0.1)})
    empty = aggregate([nothing], ["t"])["t"]["lesions"]
    assert math.isnan(empty["recall"]) and math.isnan(empty["precision"]) and math.isnan(empty["f1"])
    assert "lesions" not in aggregate([CaseResult("d", "ok", classes=nothing.classes)], ["t"])["t"]
