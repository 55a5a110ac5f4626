"""CUDA: AMP training and GPU inference (skipped without CUDA; run on a lent GPU machine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from medsup.config import load
from medsup.data.io import read_header, read_image
from medsup.device import autocast_dtype
from medsup.engine.handlers import attach_step_handlers
from medsup.engine.steps import StepEvents, build_optimizer, make_train_step
from medsup.inference.api import InferRequest, infer
from medsup.losses import build_loss
from medsup.models.topology import Topology
from medsup.models.unet import DeepSupervisedUNet
from medsup.train import run_training
from tests.conftest import write_msd

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle, dataset) of a tiny model trained on the GPU with bf16 autocast."""
    root = tmp_path_factory.mktemp("cuda")
    data = write_msd(root / "data", n=4)
    cfg = load("tiny", ["plan.target_spacing=[1.5, 1.5, 1.5]", "train.epochs=6", "train.iterations_per_epoch=20",
                        "plan.base_filters=8", "train.val_every=6", "train.amp=true", "train.device=cuda"],
               presets=["smoke"])
    result = run_training(cfg, data, output=root / "run", tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert np.isfinite(result.best_dice) and result.best_dice > 0.5, result.best_dice
    return result.bundle_dir, data


def _infer(bundle: Path, data: Path, out: Path, device: str, **kw: object) -> list[np.ndarray]:
    request = InferRequest(inputs=[str(data / "imagesTr")], output_dir=out, model=str(bundle), model_path=bundle,
                           device=device, **kw)  # type: ignore[arg-type]
    report = infer(request)
    assert [c["status"] for c in report.cases] == ["ok"] * 4
    for case in report.cases:
        assert read_image(case["output"]).geometry.mismatches(read_header(case["input"]).geometry, 1e-5) == []
    return [read_image(c["output"]).array for c in report.cases]


def test_cuda_inference_matches_cpu(cuda_run: tuple[Path, Path], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bundle, data = cuda_run
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # training set it: inference must too
    gpu = _infer(bundle, data, tmp_path / "gpu", "cuda")
    assert torch.backends.cudnn.benchmark  # tiles of one shape: autotuned, as nnU-Net's predictor
    cpu = _infer(bundle, data, tmp_path / "cpu", "cpu")
    for a, b in zip(gpu, cpu, strict=True):  # bf16 vs bf16 on different kernels: nearly every voxel agrees
        assert (a == b).mean() > 0.99


def test_cuda_inference_with_tta(cuda_run: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = cuda_run
    labels = _infer(bundle, data, tmp_path / "tta", "cuda", tta=True)
    assert all(lab.max() >= 1 for lab in labels)


@pytest.mark.parametrize(("amp", "amp_dtype"), [(True, "auto"), (True, "float16"), (False, "auto")])
def test_training_steps_do_not_wait_for_the_gpu_between_checks(amp: bool, amp_dtype: str) -> None:
    """Between the loss's finiteness checks (every ``train.sync_every`` steps) neither the step nor its
    handlers (LR, epoch loss sums, gradient norms) make the host wait for the GPU: with
    ``set_sync_debug_mode("error")`` any synchronising call raises. The CPU test in tests/unit/test_host_reads.py
    sees only part of this (no ``.tolist()``, no device copies)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = load("tiny", ["train.sync_every=4", "train.grad_norm_every=1", "train.iterations_per_epoch=9",
                        "train.epochs=1", "loss.scheme=dsn", "loss.dsn_gamma_mode=relative"])
    net = DeepSupervisedUNet(1, 3, Topology(((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), (8, 16, 32))).to(dev)
    loss_fn = build_loss(cfg)
    optimizer = build_optimizer(cfg, net)
    # float16: the GradScaler's overflow skip runs in the fused optimiser, on the GPU
    trainer = Engine(make_train_step(net, loss_fn, optimizer, dev, amp=amp, amp_dtype=amp_dtype,
                                     grad_clip=cfg.train.grad_clip))
    trainer.register_events(*StepEvents)
    epoch_metrics, _ = attach_step_handlers(trainer, cfg, net.named_stages(), loss_fn, optimizer, 2)
    strict: list[int] = []

    @trainer.on(Events.ITERATION_STARTED)  # after PolyLR: the whole step and the handlers after it are checked
    def _strict(engine: Engine) -> None:
        it = engine.state.iteration
        if it > 1 and it % 4:  # the first step makes the head weights; every 4th checks the loss
            torch.cuda.set_sync_debug_mode("error")
            strict.append(it)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _relax(engine: Engine) -> None:
        torch.cuda.set_sync_debug_mode("default")

    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(2, 1, 32, 32, 32, generator=g).pin_memory(),
                "label": (torch.rand(2, 1, 32, 32, 32, generator=g) * 3).floor().pin_memory()} for _ in range(9)]
    try:
        trainer.run(batches, max_epochs=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert strict == [2, 3, 5, 6, 7, 9]
    metrics = epoch_metrics.compute(trainer)
    assert 0 < metrics["train.loss.total"] < 10


def test_amp_dtype_on_a_gpu() -> None:
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert autocast_dtype(CUDA, True, "auto") is (torch.bfloat16 if native else torch.float16)
    assert autocast_dtype(CUDA, True, "float16") is torch.float16
    assert autocast_dtype(CUDA, False, "float16") is None
    if native:
        assert autocast_dtype(CUDA, True, "bfloat16") is torch.bfloat16
    else:  # emulated bf16 (before Ampere) is refused, not run slowly
        with pytest.raises(ValueError, match="has no bf16"):
            autocast_dtype(CUDA, True, "bfloat16")


def test_the_step_augmentation_on_cuda_matches_the_cpu_and_does_not_wait_for_the_gpu() -> None:
    """augment.runs_in=auto augments in the training step on CUDA: its numbers reach the GPU from pinned memory
    without a blocking copy, its output is the CPU's to float rounding (the noise aside: drawn on the device),
    and with the noise on it still never waits."""
    from medsup.data.batch_augment import BatchAugment
    from medsup.data.planning import default_plan

    every = ["augment.affine_prob=0.7", "augment.flip_prob=0.5", "augment.rot90_prob=0.5",
             "augment.intensity_scale_prob=0.5", "augment.intensity_shift_prob=0.5", "augment.gamma_prob=0.5"]
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 1, 32, 32, 16, generator=g).half()  # what the loader hands over: the cache's types
    label = torch.randint(0, 3, (4, 1, 32, 32, 16), generator=g).to(torch.uint8)
    for noise in ("0", "0.5"):
        cfg = load("tiny", [*every, f"augment.noise_prob={noise}", "plan.patch_size=[32, 32, 16]"])
        plan = default_plan(cfg)
        on_cpu = BatchAugment(cfg, plan, 3)(image, label)
        step = BatchAugment(cfg, plan, 3)
        gpu_image, gpu_label = image.to(CUDA), label.to(CUDA)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):  # the first call makes the noise's generator
                on_gpu = step(gpu_image, gpu_label)
            step.reseed(0)
            on_gpu = step(gpu_image, gpu_label)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert on_gpu[0].dtype == torch.float32 and on_gpu[1].dtype == torch.uint8
        if noise == "0":
            torch.testing.assert_close(on_gpu[0].cpu(), on_cpu[0], atol=1e-4, rtol=1e-4)
            assert (on_gpu[1].cpu() == on_cpu[1]).float().mean() > 0.999
