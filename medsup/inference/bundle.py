"""Model bundles: weights + resolved config + plan + label map + versions, self-describing.

A bundle folder (written by training, pulled from the registry) or a training checkpoint (``last.pt``,
``best.pt`` or a run folder) both load into a :class:`Bundle`; inference rebuilds all preprocessing from
it and never reads the current ``configs/``.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import monai
import torch

import medsup
from medsup.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from medsup.config import Config, ConfigError, from_json
from medsup.data.files import atomic_path
from medsup.data.planning import Plan
from medsup.device import inference_memory_format
from medsup.inference.postprocess import RULES_FILE, PostprocessRules
from medsup.models.unet import DeepSupervisedUNet, build_model


class BundleError(ValueError):
    """A model folder or file cannot be used; the message names it and what is missing."""


@dataclass
class Bundle:
    """Everything inference needs. ``weights`` is a state_dict."""

    source: str
    cfg: Config
    plan: Plan
    labels: dict[int, str]
    weights: dict[str, torch.Tensor]
    versions: dict[str, str] = field(default_factory=dict)
    #: rules fitted on the validation cases at the end of training (``postprocessing.json``); None: the task rule
    postprocessing: PostprocessRules | None = None

    def network(self, device: torch.device) -> DeepSupervisedUNet:
        """The U-Net with the bundle's weights, in eval mode on ``device`` and in its inference layout.

        Every prediction from a bundle (``medsup infer``, the MLflow pyfunc model, the figures) runs the layout
        of :func:`medsup.device.inference_memory_format`: channels-last on a CPU, ~1.35x per sliding-window call
        (``bench/infer_layout.py``).
        """
        model = build_model(self.cfg, self.plan)
        try:
            model.load_state_dict(self.weights)
        except RuntimeError as err:
            raise BundleError(f"{self.source}: weights do not fit the planned network ({err})") from None
        return model.to(device, memory_format=inference_memory_format(device)).eval()  # type: ignore[call-overload]

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for reports."""
        return {"source": self.source, "task": self.cfg.task, "labels": {str(k): v for k, v in self.labels.items()},
                "target_spacing": list(self.plan.target_spacing), "patch_size": list(self.plan.patch_size),
                "postprocessing": self.postprocessing.describe(self.labels) if self.postprocessing else "task rule",
                "versions": self.versions}


def software_versions() -> dict[str, str]:
    """The versions a bundle records (``versions.json``) and a run tags: medsup, torch, monai, python."""
    return {"medsup": medsup.__version__, "torch": torch.__version__, "monai": monai.__version__,
            "python": platform.python_version()}


def write_bundle(folder: Path, weights: dict[str, torch.Tensor], cfg: Config, plan: Plan,
                 labels: dict[int, str]) -> Path:
    """Write a bundle folder: ``weights.pt`` + resolved ``config.json`` + ``plan.json`` + ``labels.json`` +
    ``versions.json``, each file atomically; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "weights.pt", {"model": weights})
    for name, text in (
        ("config.json", cfg.to_json()),
        ("plan.json", plan.model_dump_json(indent=2)),
        ("labels.json", json.dumps({str(k): v for k, v in sorted(labels.items())}, indent=2)),
        ("versions.json", json.dumps(software_versions(), indent=2)),
    ):
        with atomic_path(folder / name) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
    return folder


def load_bundle(path: Path | str) -> Bundle:
    """Load a bundle folder, a training checkpoint file, or a training run folder.

    Raises:
        BundleError: missing files, unreadable JSON, weights that fail ``weights_only`` loading.
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: no such model folder or file")
    if path.is_dir() and (path / "weights.pt").is_file():
        return _from_folder(path)
    if path.is_dir() and (path / "model" / "weights.pt").is_file():
        return _from_folder(path / "model")
    return _from_checkpoint(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path.parent}: model bundle lacks {path.name}") from None
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: unreadable ({err})") from None


def _from_folder(folder: Path) -> Bundle:
    try:
        cfg = from_json((folder / "config.json").read_text(encoding="utf-8"))
        plan = Plan.load(folder / "plan.json")
        weights = load_checkpoint(folder / "weights.pt")["model"]
    except (OSError, ConfigError, CheckpointError, ValueError) as err:
        raise BundleError(f"{folder}: not a usable model bundle ({err})") from None
    labels = {int(k): str(v) for k, v in _read_json(folder / "labels.json").items()}
    versions = _read_json(folder / "versions.json") if (folder / "versions.json").is_file() else {}
    rules = None
    if (folder / RULES_FILE).is_file():  # bundles of trainings that fitted no rules have none
        try:
            rules = PostprocessRules.from_json(_read_json(folder / RULES_FILE), labels)
        except ValueError as err:
            raise BundleError(f"{folder / RULES_FILE}: {err}") from None
    return Bundle(str(folder), cfg, plan, labels, weights, versions, rules)


def _from_checkpoint(path: Path) -> Bundle:
    from medsup.tasks import get_task

    try:
        ckpt = load_checkpoint(path)
        cfg = from_json(ckpt["config"])
        plan = Plan.model_validate_json(ckpt["plan"])
    except (CheckpointError, ConfigError, KeyError, ValueError) as err:
        raise BundleError(f"{path}: not a medsup bundle or training checkpoint ({err})") from None
    labels = dict(get_task(cfg.task).labels)
    return Bundle(str(path), cfg, plan, labels, ckpt["model"], {"medsup": str(ckpt.get("medsup_version", ""))})
