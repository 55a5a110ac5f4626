"""Layered YAML configuration resolved into frozen, typed pydantic models.

Layers, each overriding the one before: ``configs/defaults.yaml`` -> ``configs/tasks/<task>.yaml`` ->
``configs/presets/<preset>.yaml`` (any number) -> ``--set a.b=c`` overrides. Unknown keys, wrong types and
bad values fail with the dotted key path and the reason (:class:`ConfigError`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medsup.tasks import TASKS

PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key and the reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    orientation: str = "RAS"
    geometry_tolerance: PositiveFloat = 1e-3
    num_folds: Annotated[int, Field(ge=1)] = 5
    fold: Annotated[int, Field(ge=0)] = 0
    split_seed: Annotated[int, Field(ge=0)] | None = None
    max_train_cases: Annotated[int, Field(ge=1)] | None = None
    check_workers: Annotated[int, Field(ge=1)] = 2
    fingerprint_samples: Annotated[int, Field(ge=100)] = 10000
    ct_padding_threshold: float = -1500.0

    @field_validator("orientation")
    @classmethod
    def _orientation(cls, v: str) -> str:
        v = v.upper()
        axes = [{"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}.get(c) for c in v]
        if len(v) != 3 or None in axes or sorted(axes) != [0, 1, 2]:  # type: ignore[type-var]
            raise ValueError(f"{v!r} is not a 3-letter orientation code such as RAS or LPS")
        return v


class PlanConfig(_Section):
    target_spacing: Triple | None = None
    anisotropy_threshold: Annotated[float, Field(gt=1)] = 3.0
    patch_size: IntTriple | None = None
    max_patch_voxels: Annotated[int, Field(ge=64)] = 256**3
    memory_budget_gb: PositiveFloat = 8.0
    min_feature_map: Annotated[int, Field(ge=1)] = 4
    max_stages: Annotated[int, Field(ge=2, le=8)] = 6
    base_filters: Annotated[int, Field(ge=1)] = 32
    max_filters: Annotated[int, Field(ge=1)] = 320
    batch_size: Annotated[int, Field(ge=1)] | None = None
    max_batch_size: Annotated[int, Field(ge=1)] = 8
    batch_dataset_fraction: Annotated[float, Field(gt=0, le=1)] = 0.05

    @field_validator("target_spacing")
    @classmethod
    def _spacing(cls, v: Triple | None) -> Triple | None:
        if v is not None and min(v) <= 0:
            raise ValueError(f"spacing must be positive, got {list(v)}")
        return v

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, v: IntTriple | None) -> IntTriple | None:
        if v is not None and min(v) < 1:
            raise ValueError(f"patch sizes must be >= 1, got {list(v)}")
        return v


class ModelConfig(_Section):
    residual: bool = False
    norm: Literal["instance", "batch", "group"] = "instance"
    act: Literal["leakyrelu", "relu", "prelu", "gelu"] = "leakyrelu"
    dropout: Probability = 0.0
    trans_bias: bool = False


class LossConfig(_Section):
    scheme: Literal["nnunet", "dsn", "uniform", "none"] = "nnunet"
    dice_weight: Annotated[float, Field(ge=0)] = 1.0
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    include_background: bool = False
    batch_dice: bool = False
    ds_label_downsample: Literal["nearest", "max"] = "nearest"
    smooth: PositiveFloat = 1e-5
    nnunet_zero_coarsest: bool = False
    dsn_gamma: Annotated[float, Field(ge=0)] = 0.0
    dsn_gamma_mode: Literal["absolute", "relative"] = "absolute"
    dsn_gamma_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    dsn_alpha: Annotated[float, Field(ge=0)] = 1.0
    dsn_schedule: Literal["constant", "linear", "exponential", "switch"] = "linear"
    dsn_end_epoch: Annotated[int, Field(ge=0)] | None = None  # None: train.epochs (resolved by build_loss)
    dsn_decay: Annotated[float, Field(gt=0, le=1)] = 0.97

    @model_validator(mode="after")
    def _some_weight(self) -> LossConfig:
        if self.dice_weight == 0 and self.ce_weight == 0:
            raise ValueError("dice_weight and ce_weight cannot both be 0")
        return self


class TrainConfig(_Section):
    epochs: Annotated[int, Field(ge=1)] = 300
    iterations_per_epoch: Annotated[int, Field(ge=1)] = 250
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.01
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.99
    weight_decay: Annotated[float, Field(ge=0)] = 3e-5
    poly_exponent: Annotated[float, Field(ge=0)] = 0.9
    grad_clip: Annotated[float, Field(ge=0)] = 12.0
    amp: bool = True
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    compile: bool = False
    channels_last: bool = False
    foreground_oversample: Probability = 0.33
    foreground_jitter: Probability = 1.0
    val_every: Annotated[int, Field(ge=1)] = 1
    val_max_cases: Annotated[int, Field(ge=1)] | None = None
    early_stop_patience: Annotated[int, Field(ge=0)] = 0
    num_workers: Annotated[int, Field(ge=0)] | None = None
    cache_rate: Probability = 1.0
    cache_dtype: Literal["float16", "float32"] = "float16"
    cache: Literal["auto", "memory", "disk"] = "auto"
    cache_dir: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False
    grad_norm_every: Annotated[int, Field(ge=0)] = 10
    sync_every: Annotated[int, Field(ge=1)] = 10
    figures: bool = True


class AugmentConfig(_Section):
    flip_prob: Probability = 0.5
    rot90_prob: Probability = 0.0
    affine_prob: Probability = 0.2
    rotate_deg: Annotated[float, Field(ge=0, le=180)] = 15.0
    scale_range: Annotated[float, Field(ge=0, lt=1)] = 0.15
    intensity_scale_prob: Probability = 0.15
    intensity_scale: Annotated[float, Field(ge=0, lt=1)] = 0.1
    intensity_shift_prob: Probability = 0.15
    intensity_shift: Annotated[float, Field(ge=0)] = 0.1
    gamma_prob: Probability = 0.15
    gamma_range: tuple[PositiveFloat, PositiveFloat] = (0.7, 1.5)
    noise_prob: Probability = 0.1
    noise_std: Annotated[float, Field(ge=0)] = 0.1
    runs_in: Literal["auto", "loader", "step"] = "auto"

    @field_validator("gamma_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError(f"low end {v[0]} is above high end {v[1]}")
        return v


class InferConfig(_Section):
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.5
    sw_batch_size: Annotated[int, Field(ge=1)] = 2
    blend: Literal["gaussian", "constant"] = "gaussian"
    tta: bool = False
    postprocess: bool = True


class PostprocessConfig(_Section):
    fit: bool = True
    min_lesion_diameters_mm: list[PositiveFloat] = Field(default_factory=lambda: [3.0, 4.0, 5.0, 6.0, 8.0, 10.0])


class TrackingConfig(_Section):
    uri: str | None = None
    experiment: str | None = None
    register_best: bool = True
    flush_interval_s: PositiveFloat = 5.0


class SynthConfig(_Section):
    voxel_mm: PositiveFloat = 2.0
    test_cases: Annotated[int, Field(ge=0)] = 2


class EvaluateConfig(_Section):
    nsd_tolerance_mm: dict[str, PositiveFloat] = Field(
        default_factory=lambda: {"liver": 5.0, "tumour": 2.0, "organ": 5.0, "lesion": 2.0})
    lesion_min_overlap: Annotated[float, Field(gt=0, le=1)] = 0.1


class Config(_Section):
    """The whole resolved configuration. Frozen: derive variants with :func:`load` overrides."""

    task: str = "liver"
    seed: int = 12345
    data: DataConfig = DataConfig()
    plan: PlanConfig = PlanConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    infer: InferConfig = InferConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    tracking: TrackingConfig = TrackingConfig()
    synth: SynthConfig = SynthConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in TASKS:
            raise ValueError(f"unknown task {v!r}; known: {', '.join(sorted(TASKS))}")
        return v

    @model_validator(mode="after")
    def _fold_in_range(self) -> Config:
        if self.data.fold >= self.data.num_folds:
            raise ValueError(f"data.fold={self.data.fold} must be < data.num_folds={self.data.num_folds}")
        return self

    @model_validator(mode="after")
    def _tolerance_per_class(self) -> Config:
        # keyed by class name, so one table serves every task; each foreground class of this task needs one
        names = [name for value, name in sorted(TASKS[self.task].labels.items()) if value != 0]
        missing = [n for n in names if n not in self.evaluate.nsd_tolerance_mm]
        if missing:
            raise ValueError(f"evaluate.nsd_tolerance_mm has no tolerance for class(es) {', '.join(missing)} "
                             f"of task {self.task}")
        return self

    def flat(self) -> dict[str, Any]:
        """The config flattened to ``{"a.b": value}`` (for MLflow params)."""
        return flatten(self.model_dump(mode="json"))

    def to_json(self) -> str:
        """Stable JSON form (the form stored with runs and model bundles)."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def config_dir() -> Path:
    """The directory holding defaults.yaml, tasks/ and presets/.

    An installed wheel carries it as ``medsup/configs``; a source checkout has ``configs/`` at the top.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "defaults.yaml").is_file():
            return candidate
    raise ConfigError(f"cannot find configs/defaults.yaml next to {here}")


def presets() -> list[str]:
    """Names of the presets in ``configs/presets``."""
    return sorted(p.stem for p in (config_dir() / "presets").glob("*.yaml"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], layer: dict[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """Deep-merge ``layer`` into a copy of ``base``; keys absent from ``base`` are errors."""
    out = copy.deepcopy(base)
    for key, value in layer.items():
        path = f"{prefix}{key}"
        if key not in out:
            raise ConfigError(f"{path}: unknown key (from {source})")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping of settings (from {source})")
            out[key] = _merge(out[key], value, source, path + ".")
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=0.1"`` -> ``(["train", "lr"], 0.1)``; the value is parsed as YAML (types coerced)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        tree = {part: tree}
    return tree


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-")) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg} (got {e.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load(
    task: str | None = None,
    overrides: list[str] | None = None,
    presets: list[str] | None = None,
    files: list[Path] | None = None,
) -> Config:
    """Resolve the configuration for ``task``.

    Args:
        task: task name; None keeps the task from defaults/files/overrides.
        overrides: ``a.b=c`` strings, applied last (values parsed as YAML).
        presets: names of ``configs/presets/*.yaml`` layers, applied after the task layer.
        files: extra YAML layers (e.g. a run's saved config), applied after the presets.

    Raises:
        ConfigError: unknown key, wrong type or bad value, naming the dotted key.
    """
    root = config_dir()
    tree = _read_yaml(root / "defaults.yaml")
    parsed = [parse_override(o) for o in overrides or []]
    # the task may come from an override (--set task=lung); its layer must still apply
    for path, value in parsed:
        if path == ["task"] and task is None:
            task = str(value)
    if task is not None:
        if task not in TASKS:
            raise ConfigError(f"task: unknown task {task!r}; known: {', '.join(sorted(TASKS))}")
        tree = _merge(tree, {"task": task}, "task")
        task_file = root / "tasks" / f"{task}.yaml"
        if task_file.is_file():
            tree = _merge(tree, _read_yaml(task_file), f"tasks/{task}.yaml")
    for name in presets or []:
        preset_file = root / "presets" / f"{name}.yaml"
        if not preset_file.is_file():
            known = ", ".join(p.stem for p in sorted((root / "presets").glob("*.yaml")))
            raise ConfigError(f"preset {name!r} not found in {root / 'presets'} (known: {known})")
        tree = _merge(tree, _read_yaml(preset_file), f"presets/{name}.yaml")
    for file in files or []:
        tree = _merge(tree, _read_yaml(Path(file)), str(file))
    for path, value in parsed:
        tree = _merge(tree, _nest(path, value), f"--set {'.'.join(path)}")
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation(err)) from None


#: keys that older medsup versions stored under another name: (section, old) -> new, same values
_RENAMED = {("augment", "affine_on"): "runs_in"}  # session 19: only the affine could move to the step


def from_json(text: str) -> Config:
    """Rebuild a config stored with a run or model bundle (strict: unknown keys fail; keys renamed since the
    run was stored are read under their new name, so older bundles and checkpoints keep loading)."""
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"invalid configuration: not JSON: {err}") from None
    if isinstance(tree, dict):
        for (section, old), new in _RENAMED.items():
            part = tree.get(section)
            if isinstance(part, dict) and old in part and new not in part:
                part[new] = part.pop(old)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation(err)) from None
