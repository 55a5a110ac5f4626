"""Figures: curves, grad-norm curves, overlays (slice through the largest lesion), deep-supervision panel, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medsup.cli import app
from medsup.config import load
from medsup.data.geometry import Geometry, Volume
from medsup.data.io import write_volume
from medsup.data.planning import default_plan
from medsup.evaluation.ds_panel import crop_patch, deep_supervision_panel, head_predictions, head_targets
from medsup.evaluation.figures import curve_figures, grad_norm_curves, training_curves
from medsup.evaluation.history import read_history, read_validation, write_history, write_validation
from medsup.evaluation.overlays import CaseView, case_view, focus_point, overlay_figure, plane
from medsup.evaluation.run_figures import best_and_worst
from medsup.inference.bundle import write_bundle
from medsup.models.topology import Topology
from medsup.models.unet import DeepSupervisedUNet, build_model
from tests.conftest import make_volume

LABELS = {0: "background", 1: "organ", 2: "lesion"}
runner = CliRunner()


def history(epochs: int = 3, grad_norms: bool = True) -> list[dict[str, float]]:
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": float(e), "train.loss.total": 1.0 / e, "train.loss.head0": 1.1 / e, "train.loss.head1": 1.3 / e,
               "train.loss.weight0": 0.67, "train.loss.weight1": 0.33, "train.lr": 0.01 * (1 - e / 4),
               "train.epoch_seconds": 2.0, "train.samples_per_s": 5.0, "val.dice": 0.5 + 0.1 * e,
               "val.dice.organ": 0.8, "val.dice.lesion": math.nan if e == 1 else 0.3, "val.seconds": 1.0,
               "val.dice_global.lesion": 0.2 + 0.1 * e}
        if e > 1:  # no lesion recall while no reference lesion was validated
            row["val.lesion_recall.lesion"] = 0.5
        if grad_norms:
            row.update({f"train.grad_norm.{k}": v / e for k, v in
                        {"encoder0": 0.2, "encoder1": 0.3, "encoder2": 0.1, "decoder0": 0.5, "decoder1": 0.4,
                         "head0": 0.6, "head1": 0.0, "total": 1.2}.items()})
        rows.append(row)
    return rows


def png_shape(path: Path) -> tuple[int, int]:
    """(height, width) in pixels of a PNG that matplotlib reads back."""
    assert path.is_file() and path.stat().st_size > 0
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and float(image[..., :3].std()) > 0  # not blank
    return image.shape[0], image.shape[1]


def test_curves_and_grad_norms_write_readable_pngs(tmp_path: Path) -> None:
    h = history()
    assert png_shape(training_curves(h, tmp_path / "curves.png")) == (800, 1500)
    assert png_shape(grad_norm_curves(h, tmp_path / "norms.png")) == (480, 1500)  # a zero-norm head is fine
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temp file left


def test_curve_figures_skip_grad_norms_when_not_recorded(tmp_path: Path) -> None:
    written = curve_figures(tmp_path, history(grad_norms=False))
    assert [p.name for p in written] == ["training_curves.png"]
    with pytest.raises(ValueError, match="grad_norm"):
        grad_norm_curves(history(grad_norms=False), tmp_path / "x.png")
    assert curve_figures(tmp_path / "empty", []) == []


def test_history_and_validation_json_round_trip(tmp_path: Path) -> None:
    h = history(2)
    write_history(tmp_path / "history.json", h)
    assert "NaN" not in (tmp_path / "history.json").read_text(encoding="utf-8")  # strict JSON
    back = read_history(tmp_path)
    assert math.isnan(back[0]["val.dice.lesion"]) and back[1] == h[1]
    rows = [{"case": "a", "image": "a.nii.gz", "label": "la.nii.gz", "dice": {"organ": 0.9, "lesion": math.nan}},
            {"case": "b", "image": "b.nii.gz", "label": "lb.nii.gz", "dice": {"organ": 0.5, "lesion": 0.1}},
            {"case": "c", "image": "c.nii.gz", "label": "lc.nii.gz", "dice": {"organ": math.nan, "lesion": math.nan}}]
    write_validation(tmp_path / "validation.json", rows)
    cases = read_validation(tmp_path)
    assert math.isnan(cases[0]["dice"]["lesion"])
    assert [(role, c["case"]) for role, c in best_and_worst(cases)] == [("best", "a"), ("worst", "b")]
    assert [role for role, _ in best_and_worst(cases[:1])] == ["best"]
    with pytest.raises(FileNotFoundError, match="medsup run folder"):
        read_history(tmp_path / "nothing")


def ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2  # type: ignore[no-any-return]


def test_focus_point_goes_through_the_largest_lesion() -> None:
    shape = (40, 36, 30)
    label = np.zeros(shape, dtype=np.int16)
    label[ball(shape, (20, 18, 15), 14)] = 1  # organ
    label[ball(shape, (10, 12, 8), 2.5)] = 2  # small lesion
    label[ball(shape, (27, 22, 19), 4.5)] = 2  # largest lesion
    point, why = focus_point(label, lesion_classes=(2,), organ_classes=(1,))
    assert point == (27, 22, 19) and why.startswith("largest lesion")
    for name, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        assert (plane(label, name, point[axis]) == 2).sum() == max(
            (np.take(label, i, axis=axis) == 2).sum() for i in range(shape[axis]))  # widest cross-section

    no_lesion = np.where(label == 2, 1, label)
    point, why = focus_point(no_lesion, (2,), (1,))
    assert why.startswith("organ centroid") and all(abs(p - c) <= 1 for p, c in zip(point, (20, 18, 15), strict=True))
    assert focus_point(np.zeros(shape, dtype=np.int16), (2,), (1,))[0] == (20, 18, 15)  # the centre


def test_plane_is_radiological() -> None:
    ras = np.zeros((4, 5, 6))
    ras[3, 4, 5] = 1  # patient's far right, anterior, superior
    axial = plane(ras, "axial", 5)
    assert axial.shape == (5, 4) and axial[0, 0] == 1  # anterior up, patient's right on the image's left
    assert plane(ras, "coronal", 4)[0, 0] == 1  # superior up, right on the left
    assert plane(ras, "sagittal", 3)[0, 0] == 1  # superior up, anterior on the left


def test_overlay_figure_of_two_cases(tmp_path: Path) -> None:
    views = []
    for seed in (0, 1):
        image, label = make_volume(seed)
        pred = Volume(np.where(label.array == 2, 1, label.array).astype(np.uint8), label.geometry)  # misses lesion
        views.append(case_view(f"case{seed}", Volume(image.array.astype(np.float32), image.geometry), label, pred,
                               LABELS))
    assert views[0].dice["organ"] > 0.8 and views[0].dice["lesion"] == 0.0
    path = overlay_figure(views, tmp_path / "overlays.png", labels=LABELS, lesion_classes=(2,), organ_classes=(1,))
    assert png_shape(path) == (2 * 2 * 360 + 120, 1260)


def test_case_view_refuses_another_grid() -> None:
    image, label = make_volume(0)
    moved = Volume(label.array, Geometry(label.geometry.shape, label.geometry.spacing, (0.0, 0.0, 0.0),
                                         label.geometry.direction))
    with pytest.raises(ValueError, match="not on the image's grid"):
        case_view("x", image, label, moved, LABELS)
    with pytest.raises(ValueError, match="one 3-D shape"):
        CaseView("x", np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), np.zeros((4, 4, 3)), (1.0, 1.0, 1.0))


def tiny_net(stages: int = 3) -> DeepSupervisedUNet:
    torch.manual_seed(0)
    strides = [(1, 1, 1)] + [(2, 2, 2)] * (stages - 1)
    return DeepSupervisedUNet(1, 3, Topology(tuple([(3, 3, 3)] * stages), tuple(strides),
                                             tuple(4 * 2**i for i in range(stages))))


def test_all_heads_in_eval_mode_matches_the_train_mode_list() -> None:
    net = tiny_net().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        heads = net.all_heads(x)
        assert not net.training
        assert [tuple(h.shape[2:]) for h in heads] == [(16, 16, 16), (8, 8, 8)]
        assert torch.allclose(heads[0], net(x))  # head 0 is what eval-mode forward returns
        net.train()  # instance norm, no dropout: both modes compute the same
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(heads, net(x), strict=True))
    assert sorted(net.named_stages()) == ["decoder0", "decoder1", "encoder0", "encoder1", "encoder2", "head0",
                                          "head1"]


@pytest.mark.parametrize("stages", [3, 4])
def test_deep_supervision_panel_has_a_column_per_head(tmp_path: Path, stages: int) -> None:
    net = tiny_net(stages).train()
    shape = (36, 30, 28)
    label = np.zeros(shape, dtype=np.int16)
    label[ball(shape, (18, 15, 14), 10)] = 1
    label[ball(shape, (24, 20, 18), 3)] = 2
    image = np.where(label > 0, 1.0, -1.0).astype(np.float32)
    patch = (16, 16, 16)
    crop, crop_label, start = crop_patch(image, label, patch, (24, 20, 18), pad_value=-1.0)
    assert crop.shape == patch and start == (16, 12, 10) and (crop_label == 2).any()
    preds = head_predictions(net, crop, torch.device("cpu"))
    assert net.training  # the mode is restored
    assert [p.shape for p in preds] == [tuple(n // 2**d for n in patch) for d in range(stages - 1)]
    assert [t.shape for t in head_targets(crop_label, [p.shape for p in preds])] == [p.shape for p in preds]
    path = deep_supervision_panel(net, image, label, tmp_path / "ds.png", spacing=(2.0, 2.0, 2.5), patch_size=patch,
                                  labels=LABELS, to_hu=(100.0, 50.0), pad_value=-1.0, lesion_classes=(2,),
                                  organ_classes=(1,))
    heads = stages - 1
    assert png_shape(path) == (760, round((3.4 * heads + 0.6) * 100))  # one 340 px column per head


def test_crop_centres_a_volume_smaller_than_the_patch() -> None:
    image = np.arange(10 * 20 * 8, dtype=np.float32).reshape(10, 20, 8)
    crop, label, start = crop_patch(image, np.ones((10, 20, 8), np.int16), (16, 16, 16), (5, 19, 4), pad_value=-3.0)
    assert start == (-3, 4, -4) and crop.shape == (16, 16, 16)
    assert crop[0, 0, 0] == -3.0 and label[0, 0, 0] == 0 and crop[13, 0, 4] == -3.0
    assert np.array_equal(crop[3:13, :, 4:12], image[:, 4:20, :]) and label[3:13, :, 4:12].all()


def test_figures_command(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_history(run / "history.json", history())
    result = runner.invoke(app, ["figures", "--run", str(run), "--json"])
    assert result.exit_code == 0, result.output
    written = [Path(p) for p in json.loads(result.stdout)["written"]]
    assert {p.name for p in written} == {"training_curves.png", "grad_norms.png"}
    assert all(p.parent == run / "figures" for p in written)

    image, label = make_volume(0)
    files = {}
    for name, volume in (("ct", image), ("ref", label), ("pred", Volume(np.minimum(label.array, 1), label.geometry))):
        files[name] = write_volume(tmp_path / "case" / f"{name}.nii.gz", volume)
    result = runner.invoke(app, ["figures", "--image", str(files["ct"]), "--ref", str(files["ref"]), "--pred",
                                 str(files["pred"]), "--task", "tiny", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert png_shape(tmp_path / "out" / "ct_overlay.png") == (2 * 360 + 120, 1260)

    cfg = load("tiny", presets=["smoke"])
    plan = default_plan(cfg)
    bundle = write_bundle(tmp_path / "model", build_model(cfg, plan).state_dict(), cfg, plan, LABELS)
    result = runner.invoke(app, ["figures", "--model", str(bundle), "--image", str(files["ct"]), "--ref",
                                 str(files["ref"]), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    heads = len(plan.strides) - 1
    assert png_shape(tmp_path / "out" / "ct_deep_supervision.png") == (760, round((3.4 * heads + 0.6) * 100))

    assert runner.invoke(app, ["figures"]).exit_code == 2
    bad = runner.invoke(app, ["figures", "--image", str(files["ct"]), "--pred", str(files["pred"])])
    assert bad.exit_code == 2 and "--task" in bad.output
    missing = runner.invoke(app, ["figures", "--run", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "history.json" in missing.output
