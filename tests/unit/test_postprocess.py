"""Postprocessing: largest organ component, lesions only inside or touching it, memory-lean helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from medsup.evaluation.metrics import lesion_detection
from medsup.inference.postprocess import (
    LesionRule,
    PostprocessRules,
    apply_rules,
    bincount_slabs,
    bounding_box,
    label_components,
    postprocess,
)
from medsup.inference.postprocess_fit import case_stats, fit_rules
from medsup.tasks import get_task


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


def _reference_postprocess(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """The rule written plainly on whole arrays."""
    region = np.isin(labels, classes)
    ids, n = ndimage.label(region, structure=np.ones((3, 3, 3), bool))
    out = labels.copy()
    if n > 1:
        sizes = np.bincount(ids.ravel())
        sizes[0] = 0
        out[region & (ids != sizes.argmax())] = 0
    return out


@pytest.mark.parametrize(("organ", "lesion"), [([1], [2]), ([1], [2, 3]), ([1], []), ([2], [3])])
def test_region_of_some_or_all_foreground_classes(organ: list[int], lesion: list[int]) -> None:
    # all classes in the region: the label map is labelled itself; a class outside it (3 here, or 1 when the
    # organ is 2) is never removed and does not join the region's components
    rng = np.random.default_rng(2)  # blobs of classes 1-3 in background, many of them islands
    labels = np.digitize(ndimage.zoom(rng.random((10, 8, 12)), 3, order=1), [0.6, 0.75, 0.85]).astype(np.uint8)
    labels = np.asfortranarray(labels)  # as predictions are made
    expected = _reference_postprocess(labels, [*organ, *lesion])
    assert (expected != labels).sum() > 100  # the rule removes something in every case
    np.testing.assert_array_equal(postprocess(labels.copy(), organ, lesion, chunk=4), expected)


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


# --- rules fitted on validation cases ----------------------------------------------------------------------


def _blob(labels: np.ndarray, corner: tuple[int, int, int], size: int, value: int) -> None:
    x, y, z = corner
    labels[x:x + size, y:y + size, z:z + size] = value


def test_keep_components_by_volume_with_anisotropic_spacing() -> None:
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[0:10, 0:10, 0:10] = 1  # the organ: never touched by a lesion rule
    _blob(labels, (2, 2, 2), 3, 2)  # 27 voxels inside the organ
    _blob(labels, (14, 14, 14), 2, 2)  # 8 voxels
    labels[18, 2, 18] = 2  # 1 voxel
    spacing = (1.0, 1.0, 2.0)  # 2 uL per voxel: 54, 16 and 2 uL
    rule = LesionRule("min_volume", min_ml=0.010)
    out = apply_rules(labels.copy(), PostprocessRules(False, {2: rule}), [1], [2], spacing)
    assert np.count_nonzero(out == 2) == 27 + 8 and out[18, 2, 18] == 0
    np.testing.assert_array_equal(out == 1, labels == 1)
    out = apply_rules(labels.copy(), PostprocessRules(False, {2: LesionRule("min_volume", 0.020)}), [1], [2],
                      spacing)
    assert np.count_nonzero(out == 2) == 27
    out = apply_rules(labels.copy(), PostprocessRules(False, {2: LesionRule("largest")}), [1], [2], spacing)
    assert np.count_nonzero(out == 2) == 27
    np.testing.assert_array_equal(
        apply_rules(labels.copy(), PostprocessRules(False, {2: LesionRule("all")}), [1], [2], spacing), labels)


def test_organ_rule_then_lesion_rule() -> None:
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[0:10, 0:10, 0:10] = 1
    _blob(labels, (2, 2, 2), 3, 2)  # a lesion inside the organ
    labels[4, 4, 4] = 1
    labels[8, 8, 8] = 2  # a one-voxel lesion inside the organ
    _blob(labels, (15, 15, 15), 4, 2)  # a large lesion far from the organ: the organ rule drops it
    rules = PostprocessRules(True, {2: LesionRule("min_volume", 0.005)})  # 5 voxels at 1 mm
    out = apply_rules(labels.copy(), rules, [1], [2], (1.0, 1.0, 1.0))
    assert np.count_nonzero(out == 2) == 26  # the blob less the organ voxel at its centre
    assert out[8, 8, 8] == 0 and out[15:19, 15:19, 15:19].max() == 0


def test_rules_json_round_trip_and_errors() -> None:
    names = {0: "background", 1: "liver", 2: "tumour"}
    rules = PostprocessRules(True, {2: LesionRule("min_volume", 0.0654, 5.0)}, {"cases": 3})
    data = json.loads(json.dumps(rules.to_json(names)))
    assert data["lesions"] == {"tumour": {"keep": "min_volume", "min_ml": 0.0654, "min_diameter_mm": 5.0}}
    assert PostprocessRules.from_json(data, names) == rules
    assert "tumour: components >= 0.0654 mL (5 mm sphere)" in rules.describe(names)
    with pytest.raises(ValueError, match="unknown class 'nodule'"):
        PostprocessRules.from_json({"organ_component": True, "lesions": {"nodule": {"keep": "all"}}}, names)
    with pytest.raises(ValueError, match="unknown rule 'smallest'"):
        PostprocessRules.from_json({"organ_component": True, "lesions": {"tumour": {"keep": "smallest"}}}, names)
    with pytest.raises(ValueError, match="malformed"):
        PostprocessRules.from_json({"lesions": {}}, names)


def _lung_case(seed: int, nodule: int) -> tuple[np.ndarray, np.ndarray]:
    """A reference nodule (``nodule``^3 voxels) found by the prediction, plus one-voxel false positives."""
    ref = np.zeros((24, 24, 24), np.uint8)
    _blob(ref, (4, 4, 4), nodule, 1)
    pred = ref.copy()
    rng = np.random.default_rng(seed)
    for x, y, z in rng.integers(12, 24, size=(4, 3)):
        pred[x, y, z] = 1
    return pred, ref


def test_fit_chooses_a_size_floor_that_removes_false_positive_specks() -> None:
    task = get_task("lung")
    cases = [_lung_case(s, 5) for s in range(3)]
    stats = [case_stats(f"c{i}", p, r, (1.0, 1.0, 1.0), task) for i, (p, r) in enumerate(cases)]
    rules = fit_rules(stats, task, [3.0, 5.0])
    # a 3 mm sphere is 14 uL (14 voxels at 1 mm), a 5 mm one 65: the 125-voxel nodules stay, the specks go
    assert rules.lesions == {1: LesionRule("min_volume", math.pi * 27 / 6 / 1000, 3.0)}
    before = np.mean([2 * 125 / (125 + np.count_nonzero(p)) for p, _ in cases])
    assert rules.fit["dice_before"]["tumour"] == pytest.approx(before)
    assert rules.fit["dice_after"]["tumour"] == pytest.approx(1.0)
    assert rules.fit["candidates"]["tumour"]["min 5 mm"]["dice"] == pytest.approx(1.0)  # a tie: the gentler wins
    assert rules.fit["candidates"]["tumour"]["every component"]["fp_per_case"] == 4
    assert rules.fit["candidates"]["tumour"]["min 3 mm"]["fp_per_case"] == 0
    assert not rules.organ_component


def test_fit_keeps_everything_when_a_floor_would_cost_real_lesions() -> None:
    task = get_task("lung")
    # the one real nodule is a single voxel: every floor removes it; nothing else is predicted
    ref = np.zeros((16, 16, 16), np.uint8)
    ref[3, 3, 3] = 1
    stats = [case_stats("c", ref.copy(), ref, (1.0, 1.0, 1.0), task)]
    rules = fit_rules(stats, task, [3.0])
    assert rules.lesions == {} and rules.fit["dice_after"]["tumour"] == 1.0


def test_fit_takes_the_organ_rule_only_when_no_class_loses() -> None:
    task = get_task("tiny")
    ref = np.zeros((24, 24, 24), np.uint8)
    ref[0:10, 0:10, 0:10] = 1
    _blob(ref, (3, 3, 3), 3, 2)
    stray = ref.copy()
    stray[18:21, 18:21, 18:21] = 1  # an organ island: the task rule removes it
    stats = [case_stats("c", stray, ref, (1.0, 1.0, 1.0), task)]
    assert fit_rules(stats, task, []).organ_component
    # a real lesion outside the organ: the rule would remove it, so it is not taken
    ref2 = ref.copy()
    _blob(ref2, (18, 18, 18), 3, 2)
    stats = [case_stats("c", ref2.copy(), ref2, (1.0, 1.0, 1.0), task)]
    rules = fit_rules(stats, task, [])
    assert not rules.organ_component
    assert rules.fit["candidates"]["organ component"]["lesion"] < 1.0
    assert rules.fit["candidates"]["organ component"]["lesions lost in"] == ["lesion"]


def test_fit_never_takes_a_rule_that_loses_a_found_lesion() -> None:
    task = get_task("lung")
    ref = np.zeros((32, 32, 32), np.uint8)
    _blob(ref, (2, 2, 2), 5, 1)  # 125 voxels
    _blob(ref, (20, 2, 2), 3, 1)  # 27 voxels: a small second nodule
    pred = ref.copy()
    pred[2:6, 17:32, 20] = 1  # a 60-voxel false positive
    for z in range(0, 32, 4):
        pred[30, 30, z] = 1  # 8 one-voxel false positives
    stats = [case_stats("c", pred, ref, (1.0, 1.0, 1.0), task)]
    rules = fit_rules(stats, task, [3.0, 4.0])
    scores = rules.fit["candidates"]["tumour"]
    # "largest" has the best Dice but drops the small nodule; a 4 mm floor (34 voxels) drops it too
    assert scores["largest"]["dice"] > scores["min 3 mm"]["dice"] > scores["every component"]["dice"]
    assert scores["largest"]["recall"] == 0.5 and scores["min 4 mm"]["recall"] == 0.5
    assert rules.lesions == {1: LesionRule("min_volume", math.pi * 27 / 6 / 1000, 3.0)}
    assert scores["min 3 mm"] == {"dice": pytest.approx(2 * 152 / (212 + 152)), "detected": 2, "recall": 1.0,
                                  "precision": 2 / 3, "fp_per_case": 1}


def test_component_detection_matches_evaluate() -> None:
    rng = np.random.default_rng(3)
    for seed in range(5):
        ref = (ndimage.gaussian_filter(rng.random((24, 24, 24)), 1.5) > 0.56).astype(np.uint8)
        pred = (ndimage.gaussian_filter(rng.random((24, 24, 24)), 1.5) > 0.55).astype(np.uint8) | np.roll(ref, 1, 0)
        comp = case_stats("c", pred, ref, (1.0, 1.0, 2.0), get_task("lung")).components["raw"][1]
        for min_overlap in (0.1, 0.5):
            expected = lesion_detection(pred == 1, ref == 1, (1.0, 1.0, 2.0), min_overlap).counts()
            assert comp.detection(np.ones(comp.sizes.size, bool), min_overlap) == expected, (seed, min_overlap)
        assert comp.counts(np.ones(comp.sizes.size, bool)) == (int(np.sum(pred & ref)), int(pred.sum()), int(ref.sum()))


def test_a_floor_must_not_exceed_the_smallest_reference_lesion_even_a_missed_one() -> None:
    task = get_task("lung")
    ref = np.zeros((32, 32, 32), np.uint8)
    _blob(ref, (2, 2, 2), 5, 1)  # 125 voxels, found
    _blob(ref, (20, 2, 2), 3, 1)  # 27 voxels, missed
    pred = np.zeros_like(ref)
    _blob(pred, (2, 2, 2), 5, 1)
    pred[2:5, 20:30, 20] = 1  # a 30-voxel false positive: a 4 mm floor (34 voxels) removes it
    pred[20:22, 20:25, 28] = 1  # a 10-voxel false positive: a 3 mm floor (14 voxels) removes it
    rules = fit_rules([case_stats("c", pred, ref, (1.0, 1.0, 1.0), task)], task, [3.0, 4.0])
    scores = rules.fit["candidates"]["tumour"]
    assert scores["min 4 mm"]["dice"] > scores["min 3 mm"]["dice"] > scores["every component"]["dice"]
    assert scores["min 4 mm"]["detected"] == scores["every component"]["detected"] == 1
    assert rules.lesions[1].min_diameter_mm == 3.0  # 4 mm would remove a 27-voxel nodule like the missed one
    assert rules.fit["reference_lesions"]["tumour"] == {"smallest_ml": 0.027, "most_per_case": 2}
