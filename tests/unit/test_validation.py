"""Validation summaries against hand-counted voxels: per-case mean Dice and global Dice."""

from __future__ import annotations

import math

import pytest
import torch

from medsup.engine.validation import dice_per_class, lesion_counts, overlap_counts, summarise


def _case(shape: tuple[int, int, int], ref: list[tuple[slice, ...]], pred: list[tuple[slice, ...]]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    label, prediction = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    for box in ref:
        label[box] = 1
    for box in pred:
        prediction[box] = 1
    return prediction, label


def test_per_case_mean_and_global_dice() -> None:
    # a: a 4^3 lesion found exactly; b: a 1-voxel lesion missed, 1 false-positive voxel elsewhere;
    # c: no lesion and none predicted (says nothing); d: no lesion, 2 false-positive voxels
    a = _case((8, 8, 8), [(slice(0, 4),) * 3], [(slice(0, 4),) * 3])
    b = _case((8, 8, 8), [(slice(0, 1),) * 3], [(slice(7, 8),) * 3])
    c = _case((8, 8, 8), [], [])
    d = _case((8, 8, 8), [], [(slice(0, 1), slice(0, 1), slice(0, 2))])
    results = [{"dice": dice_per_class(p, g, [1]), "counts": overlap_counts(p, g, [1])} for p, g in (a, b, c, d)]
    assert [r["counts"][0] for r in results] == [(64, 64, 64), (0, 1, 1), (0, 0, 0), (0, 2, 0)]
    assert results[0]["dice"] == [1.0] and results[1]["dice"] == [0.0] and math.isnan(results[2]["dice"][0])
    out = summarise(results, ["lesion"])
    assert out["val.dice.lesion"] == pytest.approx(1 / 3)  # (1 + 0 + 0) / 3 cases: c is skipped
    assert out["val.dice_global.lesion"] == pytest.approx(2 * 64 / (67 + 65))  # TP 64; predicted 67, reference 65
    assert out["val.dice"] == out["val.dice.lesion"] and out["val.dice_global"] == out["val.dice_global.lesion"]


def test_no_counts_no_global_and_empty_classes_are_skipped() -> None:
    p, g = _case((4, 4, 4), [], [])
    out = summarise([{"dice": dice_per_class(p, g, [1, 2]), "counts": overlap_counts(p, g, [1, 2])}], ["a", "b"])
    assert set(out) == {"val.dice"} and math.isnan(out["val.dice"])  # nothing anywhere: no class says anything
    assert "val.dice_global" not in summarise([{"dice": [0.5]}], ["a"])  # results without counts: per case only


def test_lesion_recall_and_precision_are_pooled_over_cases() -> None:
    # a: two lesions, one found, plus one false-positive speck; b: one lesion found; c: nothing anywhere
    a = _case((10, 10, 10), [(slice(0, 3),) * 3, (slice(6, 8),) * 3], [(slice(0, 3),) * 3, (slice(9, 10),) * 3])
    b = _case((10, 10, 10), [(slice(4, 6),) * 3], [(slice(4, 6),) * 3])
    c = _case((10, 10, 10), [], [])
    lesions = [lesion_counts(p, g, [1], [1], (1.0, 1.0, 1.0), 0.1) for p, g in (a, b, c)]
    assert lesions[0] == [{"ref_lesions": 2, "detected_lesions": 1, "pred_lesions": 2, "fp_lesions": 1}]
    results = [{"dice": dice_per_class(p, g, [1]), "counts": overlap_counts(p, g, [1]), "lesions": le}
               for (p, g), le in zip((a, b, c), lesions, strict=True)]
    out = summarise(results, ["tumour"])
    assert out["val.lesion_recall.tumour"] == pytest.approx(2 / 3)  # 2 of 3 reference lesions
    assert out["val.lesion_precision.tumour"] == pytest.approx(2 / 3)  # 2 of 3 predicted lesions are real
    # a class that is not a lesion class gets no lesion metrics; nothing predicted: no precision
    assert lesion_counts(*a, [1, 2], [2], (1.0, 1.0, 1.0), 0.1) == [None, {
        "ref_lesions": 0, "detected_lesions": 0, "pred_lesions": 0, "fp_lesions": 0}]
    missed = summarise([{"dice": [0.0], "counts": [(0, 0, 8)], "lesions": lesion_counts(c[0], b[1], [1], [1],
                                                                                         (1.0, 1.0, 1.0), 0.1)}],
                       ["tumour"])
    assert missed["val.lesion_recall.tumour"] == 0.0 and "val.lesion_precision.tumour" not in missed
    assert not any(k.startswith("val.lesion") for k in summarise([{"dice": [0.5]}], ["tumour"]))
