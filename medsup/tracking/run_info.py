"""What a training run records about itself beside its config: the planned values as params, and tags that
say what ran where (task, fold, git sha, data fingerprint, device, world size, versions, output folder).

The output-folder tag (``medsup.output_dir``) is what ``--resume RUN_ID`` follows back to the checkpoints
(:func:`medsup.tracking.run_output_dir`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import torch

from medsup.config import Config
from medsup.data.planning import Plan
from medsup.device import autocast_dtype, dtype_name, inference_autocast_dtype
from medsup.inference.bundle import software_versions


def plan_params(plan: Plan) -> dict[str, Any]:
    """The plan as flat params (``patch_size``, ``target_spacing``, ..., ``normalization.mean``, ...)."""
    data = plan.model_dump(mode="json")
    norm = data.pop("normalization")
    return {**data, **{f"normalization.{k}": v for k, v in norm.items()}}


def run_tags(cfg: Config, plan: Plan, fold: int, device: torch.device, output: Path, world_size: int) -> dict[str, str]:
    """Tags of a training run: what ran (task, fold, loss scheme, data fingerprint, git sha, versions), where
    (device name, the network's dtypes in training and validation, world size) and where its files are
    (``medsup.output_dir``)."""
    return {
        "task": cfg.task, "fold": str(fold), "git_sha": git_sha(), "data_fingerprint": plan.fingerprint_hash,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        # train.amp asks for autocast; what it gives depends on the device (training on a CPU: float32)
        "train_dtype": dtype_name(autocast_dtype(device, cfg.train.amp, cfg.train.amp_dtype)),
        "validation_dtype": dtype_name(inference_autocast_dtype(device, cfg.train.amp)),
        "world_size": str(world_size), "loss_scheme": cfg.loss.scheme,
        "medsup.output_dir": str(output), **{f"version.{k}": v for k, v in software_versions().items()},
    }


def git_sha() -> str:
    """The commit of medsup's source checkout, or ``unknown`` (an installed wheel, no git, a slow git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             encoding="utf-8", errors="replace", timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
