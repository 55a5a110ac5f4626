from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsup.config import load
from medsup.data.fingerprint import fingerprint_dataset, plan_dataset
from medsup.data.planning import Plan, default_plan, estimate_memory_gb, target_spacing
from medsup.data.splits import load_splits, make_splits
from medsup.models.topology import Topology, plan_topology


def test_target_spacing_median_when_isotropic_enough() -> None:
    spacings = np.array([[0.7, 0.7, 1.0], [0.8, 0.8, 1.5], [0.9, 0.9, 2.0]])
    shapes = np.array([[512, 512, 300]] * 3)
    np.testing.assert_allclose(target_spacing(spacings, shapes), [0.8, 0.8, 1.5])


def test_target_spacing_thick_axis_takes_10th_percentile() -> None:
    # 5 mm slices, > 3x in-plane, and few slices: nnU-Net's anisotropy rule applies
    spacings = np.array([[0.7, 0.7, 5.0], [0.8, 0.8, 5.0], [0.75, 0.75, 2.5], [0.7, 0.7, 5.0], [0.8, 0.8, 5.0]])
    shapes = np.array([[512, 512, 60]] * 5)
    target = target_spacing(spacings, shapes)
    assert target[2] == pytest.approx(np.percentile(spacings[:, 2], 10))
    assert target[2] < 5.0
    # many slices: the voxel condition fails and the median is kept
    assert target_spacing(spacings, np.array([[512, 512, 400]] * 5))[2] == 5.0


def test_topology_isotropic_and_anisotropic() -> None:
    iso = plan_topology((1.0, 1.0, 1.0), (128, 128, 128))
    assert iso.num_stages == 6 and iso.strides[1:] == ((2, 2, 2),) * 5
    assert iso.filters == (32, 64, 128, 256, 320, 320) and iso.divisor == (32, 32, 32)
    aniso = plan_topology((0.8, 0.8, 4.0), (192, 192, 32))
    assert aniso.kernels[0] == (3, 3, 1)  # no mixing across thick slices at full resolution
    assert aniso.strides[1] == (2, 2, 1) and aniso.strides[2] == (2, 2, 1)  # z waits for x/y to catch up
    assert aniso.strides[3] == (2, 2, 2)
    assert aniso.divisor[2] < aniso.divisor[0]
    with pytest.raises(ValueError, match="not divisible by the stride product"):
        iso.check_patch((128, 128, 100))
    assert Topology.from_dict(aniso.as_dict()) == aniso


def test_memory_grows_with_patch() -> None:
    topo = plan_topology((1.0, 1.0, 1.0), (128, 128, 128))
    small, big = (estimate_memory_gb(topo, p, 2, 3) for p in ((64, 64, 64), (128, 128, 128)))
    assert big == pytest.approx(8 * small, rel=0.05)


@pytest.mark.parametrize("budget", [0.5, 2.0, 8.0])
def test_plan_fits_budget_and_divides(budget: float) -> None:
    cfg = load("liver", [f"plan.memory_budget_gb={budget}"])
    plan = default_plan(cfg)
    assert plan.memory_estimate_gb <= budget * 1.0001 or plan.patch_size == plan.topology.divisor
    plan.topology.check_patch(plan.patch_size)
    assert all(p <= m for p, m in zip(plan.patch_size, plan.median_shape, strict=True))


def test_liver_reference_plan_matches_nnunet() -> None:
    plan = default_plan(load("liver"))
    assert plan.patch_size == (128, 128, 128) and plan.batch_size == 2
    assert plan.filters[-1] == 320 and len(plan.strides) == 6


def test_plan_on_dataset_writes_plan_fingerprint_splits(msd_dataset: Path, tmp_path: Path) -> None:
    cfg = load("tiny", ["plan.target_spacing=null"])
    plan = plan_dataset(msd_dataset, cfg, tmp_path / "out" / "plan.json")
    assert Plan.load(tmp_path / "out" / "plan.json") == plan
    assert plan.target_spacing == pytest.approx((0.8, 0.9, 2.5), rel=1e-5)
    assert plan.num_classes == 3 and plan.num_cases == 3
    # foreground HU: organ at ~100 with a lesion at ~60, from the conftest phantom
    assert 40 < plan.normalization.mean < 110 and plan.normalization.clip_low < plan.normalization.clip_high
    fingerprint = json.loads((tmp_path / "out" / "fingerprint.json").read_text(encoding="utf-8"))
    assert fingerprint["hash"] == plan.fingerprint_hash == fingerprint_dataset(msd_dataset, cfg)["hash"]
    splits = load_splits(tmp_path / "out" / "splits.json")
    assert len(splits) == 2 and sorted(splits[0]["val"] + splits[1]["val"]) == ["case0", "case1", "case2"]


def test_fingerprint_is_in_reoriented_axis_order(tmp_path: Path, msd_dataset: Path) -> None:
    # sample every foreground voxel so that both orders see the same values
    cfg_ras = load("tiny", ["data.orientation=RAS", "data.fingerprint_samples=100000"])
    cfg_sla = load("tiny", ["data.orientation=SLA", "data.fingerprint_samples=100000"])
    a, b = fingerprint_dataset(msd_dataset, cfg_ras), fingerprint_dataset(msd_dataset, cfg_sla)
    assert a["shapes"][0] == [24, 20, 16] and b["shapes"][0] == [16, 24, 20]
    assert a["foreground"] == pytest.approx(b["foreground"], rel=1e-5)


def test_splits_are_deterministic_and_disjoint() -> None:
    ids = [f"c{i}" for i in range(11)]
    s1, s2 = make_splits(ids, 5, 7), make_splits(list(reversed(ids)), 5, 7)
    assert s1 == s2 and len(s1) == 5
    assert make_splits(ids, 5, 8) != s1
    vals = [v for s in s1 for v in s["val"]]
    assert sorted(vals) == sorted(ids)
    for s in s1:
        assert not set(s["train"]) & set(s["val"])
    assert make_splits(["a"], 5, 0) == [{"train": ["a"], "val": ["a"]}]
    assert len(make_splits(["a", "b", "c"], 5, 0)) == 3


def test_plan_real_lung(realdata: Path, tmp_path: Path) -> None:
    plan = plan_dataset(realdata / "lung_2mm", load("lung"), tmp_path / "plan.json")
    assert plan.target_spacing[:2] == pytest.approx((2.0, 2.0))
    # lung tumour HU: soft tissue, clipped well above air
    assert -1000 < plan.normalization.clip_low < 0 < plan.normalization.clip_high < 400
