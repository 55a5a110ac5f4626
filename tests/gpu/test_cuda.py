"""CUDA: AMP training and GPU inference (skipped without CUDA; run on a lent GPU machine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsup.config import load
from medsup.data.io import read_header, read_image
from medsup.inference.api import InferRequest, infer
from medsup.train import run_training
from tests.conftest import write_msd

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


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


def test_cuda_inference_matches_cpu(cuda_run: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = cuda_run
    gpu = _infer(bundle, data, tmp_path / "gpu", "cuda")
    cpu = _infer(bundle, data, tmp_path / "cpu", "cpu")
    for a, b in zip(gpu, cpu, strict=True):  # bf16 vs bf16 on different kernels: nearly every voxel agrees
        assert (a == b).mean() > 0.99


def test_cuda_inference_with_tta(cuda_run: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = cuda_run
    labels = _infer(bundle, data, tmp_path / "tta", "cuda", tta=True)
    assert all(lab.max() >= 1 for lab in labels)
