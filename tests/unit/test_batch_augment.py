"""The augmentation in the training step (``augment.runs_in``): the loader's chain, sample by sample, on the
training device, seeded per epoch; the loader only crops then and hands over the cache's types."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.transforms import Compose, RandomizableTrait

from medsup.config import load
from medsup.data.batch_augment import BatchAugment
from medsup.data.planning import default_plan
from medsup.data.transforms import ForegroundOversampledCropd, augment_in_step, augmentations
from medsup.engine.steps import prepare
from tests.unit.test_patch_sampler import loaders

CPU = torch.device("cpu")
#: every stage but the noise (whose values the step draws on the device: see the noise test)
EVERY_STAGE = ["augment.affine_prob=1.0", "augment.flip_prob=0.5", "augment.rot90_prob=1.0",
               "augment.intensity_scale_prob=1.0", "augment.intensity_shift_prob=1.0", "augment.gamma_prob=1.0",
               "augment.noise_prob=0"]
HALF = ["augment.affine_prob=0.5", "augment.flip_prob=0.5", "augment.rot90_prob=0.5",
        "augment.intensity_scale_prob=0.5", "augment.intensity_shift_prob=0.5", "augment.gamma_prob=0.5",
        "augment.noise_prob=0"]
NOTHING = ["augment.affine_prob=0", "augment.flip_prob=0", "augment.rot90_prob=0", "augment.intensity_scale_prob=0",
           "augment.intensity_shift_prob=0", "augment.gamma_prob=0", "augment.noise_prob=0"]


def batch(seed: int = 0, size: tuple[int, int, int] = (24, 24, 24), n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loader hands over when the step augments: a seeded smooth ``(n, 1, *size)`` float16 image and
    a uint8 label (classes 0..2)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, *size)
    image = torch.nn.functional.avg_pool3d(torch.randn(shape, generator=g), 3, 1, 1)
    return image.half(), torch.randint(0, 3, shape, generator=g).to(torch.uint8)


def config(*overrides: str, patch: tuple[int, int, int] = (24, 24, 24)) -> tuple:
    cfg = load("tiny", ["augment.rotate_deg=30", "augment.scale_range=0.2", f"plan.patch_size={list(patch)}",
                        *overrides])
    return cfg, default_plan(cfg)


@pytest.mark.parametrize(("settings", "patch"), [(EVERY_STAGE, (24, 24, 24)), (HALF, (24, 24, 24)),
                                                 (HALF, (24, 20, 12))])
def test_each_sample_gets_what_the_loaders_chain_gives_it(settings: list[str], patch: tuple[int, int, int]) -> None:
    """The same draws as MONAI's transforms in the loader, sample after sample, and the same results (to float
    rounding): affine as one batched ``affine_grid``, flips and quarter turns, intensity, gamma; a non-square
    patch (no quarter turns there) too."""
    cfg, plan = config(*settings, patch=patch)
    image, label = batch(size=patch, n=8)
    out_image, out_label = BatchAugment(cfg, plan, 5)(image, label)
    assert out_image.shape == image.shape and out_image.dtype == torch.float32 and out_label.dtype == torch.uint8
    assert type(out_image) is torch.Tensor and type(out_label) is torch.Tensor
    chain = Compose(augmentations(cfg.augment, plan).chain())
    chain.set_random_state(seed=5)  # epoch 0 of BatchAugment seed 5
    randomized = [t for t in chain.transforms if isinstance(t, RandomizableTrait)]
    fired = {id(t): 0 for t in randomized}
    for b in range(8):
        # the loader's chain gets float32 (its crop widens); the step widens the same float16 values
        out = chain({"image": image[b].float(), "label": label[b].float()})
        for t in randomized:
            fired[id(t)] += bool(t._do_transform)
        torch.testing.assert_close(out_image[b], out["image"].as_tensor(), atol=2e-5, rtol=1e-5)
        assert (out_label[b].float() == out["label"].as_tensor()).float().mean() > 0.999
    assert set(out_label.unique().tolist()) <= {0, 1, 2}  # nearest: no blended class values
    drawn = [n for t, n in zip(randomized, fired.values(), strict=True) if t.prob > 0]
    # every stage was exercised (seeded: at p 0.5 some samples, not all)
    assert len(drawn) == (9 if patch[0] == patch[1] else 8) - 1  # the noise (p 0) not; quarter turns if square
    assert all(n == 8 for n in drawn[:1] + drawn[4:]) if settings is EVERY_STAGE else all(0 < n < 8 for n in drawn)


def test_nothing_drawn_leaves_the_batch_as_it_is() -> None:
    cfg, plan = config(*NOTHING)
    image, label = batch(n=3)
    out_image, out_label = BatchAugment(cfg, plan, 0)(image, label)
    assert torch.equal(out_image, image.float()) and torch.equal(out_label, label)


def test_the_noise_is_drawn_on_the_device_with_the_loaders_distribution() -> None:
    """MONAI draws noise voxel by voxel on the host; the step draws whether (noise_prob) and how strong
    (uniform in 0..noise_std) on the host, and the noise itself where the batch is."""
    cfg, plan = config(*NOTHING[:-1], "augment.noise_prob=0.5", "augment.noise_std=0.2", patch=(16, 16, 16))
    step = BatchAugment(cfg, plan, 1)
    draws = step.draw(24)
    step.reseed(0)
    image = torch.zeros(24, 1, 16, 16, 16)
    out, _ = step(image, torch.zeros(24, 1, 16, 16, 16, dtype=torch.uint8))
    stds = [d.noise_std for d in draws]
    assert 3 <= sum(s is not None for s in stds) <= 21
    for b, std in enumerate(stds):
        if std is None:
            assert torch.equal(out[b], image[b])
        else:
            assert 0 < std < 0.2
            assert abs(out[b].std().item() - std) < 0.06 * std and abs(out[b].mean().item()) < 0.1 * std


def test_an_epochs_draws_depend_on_the_seed_and_the_epoch_only() -> None:
    cfg, plan = config(*HALF[:-1], "augment.noise_prob=0.5")
    image, label = batch()
    step = BatchAugment(cfg, plan, 5)
    step.reseed(3)
    first = step(image, label)
    step(image, label)  # more draws in between
    step.reseed(3)
    again = step(image, label)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    step.reseed(4)
    assert not torch.equal(step(image, label)[0], first[0])
    other = BatchAugment(cfg, plan, 6)
    other.reseed(3)
    assert not torch.equal(other(image, label)[0], first[0])


def test_prepare_augments_on_the_device_then_lays_out_and_widens() -> None:
    cfg, plan = config(*EVERY_STAGE)
    image, label = batch()
    expected = BatchAugment(cfg, plan, 5)(image, label)
    got_image, got_label = prepare({"image": image, "label": label}, CPU, True, BatchAugment(cfg, plan, 5))
    assert torch.equal(got_image, expected[0]) and got_image.is_contiguous(memory_format=torch.channels_last_3d)
    assert got_label.dtype == torch.long and torch.equal(got_label, expected[1].long())
    # without the step's augmentation a batch in the cache's types still reaches the network as float32
    plain_image, plain_label = prepare({"image": image, "label": label}, CPU, False)
    assert plain_image.dtype == torch.float32 and torch.equal(plain_image, image.float())
    assert torch.equal(plain_label, label.long())


def test_runs_in_picks_the_step_on_cuda_and_the_loader_on_a_cpu() -> None:
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert not augment_in_step(load("tiny"), CPU) and augment_in_step(load("tiny"), cuda)
    assert augment_in_step(load("tiny", ["augment.runs_in=step"]), CPU)
    assert not augment_in_step(load("tiny", ["augment.runs_in=loader"]), cuda)


def test_the_loader_only_crops_when_the_step_augments(msd_dataset: Path, tmp_path: Path) -> None:
    """Step: after the cache only the crop, which keeps the cache's float16 / uint8 (3 bytes a voxel handed
    over, not 8); loader: the whole chain, float32."""
    def tail(*overrides: str) -> tuple[list[type], dict]:
        train, _ = loaders(msd_dataset, tmp_path, *overrides)
        chain = train.dataset.transform
        first = chain.get_index_of_first(lambda t: isinstance(t, RandomizableTrait))
        return [type(t) for t in chain.transforms[first:]], next(iter(train))

    in_loader, loader_batch = tail()
    assert in_loader[0] is ForegroundOversampledCropd and len(in_loader) > 5
    assert loader_batch["image"].dtype == torch.float32 and loader_batch["label"].dtype == torch.float32
    in_step, step_batch = tail("augment.runs_in=step")
    assert in_step == [ForegroundOversampledCropd]
    assert step_batch["image"].dtype == torch.float16 and step_batch["label"].dtype == torch.uint8
    assert step_batch["image"].shape == loader_batch["image"].shape
