"""The random affine in the training step (``augment.affine_on``): the loader's transform, sample by sample, on
the training device, seeded per epoch; the loader leaves it out then."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.transforms import RandAffined

from medsup.config import load
from medsup.data.batch_augment import BatchAffine
from medsup.data.planning import default_plan
from medsup.data.transforms import affine_in_step, rand_affine
from medsup.engine.steps import prepare
from tests.unit.test_patch_sampler import loaders

CPU = torch.device("cpu")


def batch(seed: int = 0, size: tuple[int, int, int] = (24, 24, 24), n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded smooth ``(n, 1, *size)`` image and integer-valued float label (classes 0..2)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, *size)
    image = torch.nn.functional.avg_pool3d(torch.randn(shape, generator=g), 3, 1, 1)
    return image, torch.randint(0, 3, shape, generator=g).float()


def settings(prob: float = 1.0, patch: tuple[int, int, int] = (24, 24, 24)) -> list[str]:
    return [f"augment.affine_prob={prob}", "augment.rotate_deg=30", "augment.scale_range=0.2",
            f"plan.patch_size={list(patch)}"]


def affine(prob: float = 1.0, seed: int = 5) -> BatchAffine:
    cfg = load("tiny", settings(prob))
    return BatchAffine(cfg, default_plan(cfg), seed)


@pytest.mark.parametrize(("prob", "patch"), [(1.0, (24, 24, 24)), (0.5, (24, 24, 24)), (0.7, (24, 20, 12))])
def test_each_sample_gets_what_the_loaders_affine_gives_it(prob: float, patch: tuple[int, int, int]) -> None:
    """The same draws as MONAI's transform in the loader, sample after sample, and the same resampling (to
    float rounding; a non-cubic patch too): MONAI's matrix as one batched ``affine_grid``."""
    cfg = load("tiny", settings(prob, patch))
    image, label = batch(size=patch, n=6)
    out_image, out_label = BatchAffine(cfg, default_plan(cfg), 5)(image, label)
    assert out_image.shape == image.shape and type(out_image) is torch.Tensor and type(out_label) is torch.Tensor
    loader_affine = rand_affine(cfg.augment, default_plan(cfg))
    assert loader_affine is not None
    loader_affine.set_random_state(seed=5)  # epoch 0 of BatchAffine seed 5
    fired = 0
    for b in range(6):
        out = loader_affine({"image": image[b], "label": label[b]})
        fired += loader_affine._do_transform
        torch.testing.assert_close(out_image[b], out["image"].as_tensor(), atol=1e-5, rtol=0)
        assert (out_label[b] == out["label"].as_tensor()).float().mean() > 0.999
        assert torch.equal(out_image[b], image[b]) != bool(loader_affine._do_transform)
    assert set(out_label.unique().tolist()) <= {0.0, 1.0, 2.0}  # nearest: no blended class values
    assert fired == 6 if prob == 1.0 else 0 < fired < 6


def test_an_epochs_draws_depend_on_the_seed_and_the_epoch_only() -> None:
    image, label = batch()
    step = affine()
    step.reseed(3)
    first = step(image, label)
    step(image, label)  # more draws in between
    step.reseed(3)
    again = step(image, label)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    step.reseed(4)
    assert not torch.equal(step(image, label)[0], first[0])
    other = affine(seed=6)
    other.reseed(3)
    assert not torch.equal(other(image, label)[0], first[0])


def test_prepare_runs_it_on_the_device_before_the_layout_and_the_integer_label() -> None:
    image, label = batch()
    expected = affine()(image, label)
    got_image, got_label = prepare({"image": image, "label": label}, CPU, True, affine())
    assert torch.equal(got_image, expected[0]) and got_image.is_contiguous(memory_format=torch.channels_last_3d)
    assert got_label.dtype == torch.long and torch.equal(got_label, expected[1].long())


def test_affine_on_picks_the_step_on_cuda_and_the_loader_on_a_cpu() -> None:
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert not affine_in_step(load("tiny"), CPU) and affine_in_step(load("tiny"), cuda)
    assert affine_in_step(load("tiny", ["augment.affine_on=step"]), CPU)
    assert not affine_in_step(load("tiny", ["augment.affine_on=loader"]), cuda)
    assert not affine_in_step(load("tiny", ["augment.affine_on=step", "augment.affine_prob=0"]), cuda)
    with pytest.raises(ValueError, match="affine_prob is 0"):
        BatchAffine(load("tiny", ["augment.affine_prob=0"]), default_plan(load("tiny")), 0)


def test_the_loader_leaves_the_affine_to_the_step(msd_dataset: Path, tmp_path: Path) -> None:
    def affines(*overrides: str) -> int:
        train, _ = loaders(msd_dataset, tmp_path, *overrides)
        return sum(isinstance(t, RandAffined) for t in train.dataset.transform.transforms)

    assert affines() == 1
    assert affines("augment.affine_on=step") == 0
