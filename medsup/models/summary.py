"""What ``medsup model`` reports: parameters, encoder stages and one head per decoder scale for a plan.

Shapes are analytic (:meth:`DeepSupervisedUNet.head_shapes`; tests cross-check them against a real forward)
and the network is built on the ``meta`` device, so describing nnU-Net's 128^3 liver plan costs no memory
and a few milliseconds.
"""

from __future__ import annotations

from typing import Any

import torch

from medsup.config import Config
from medsup.data.planning import Plan
from medsup.models.unet import build_model


def describe(cfg: Config, plan: Plan) -> dict[str, Any]:
    """JSON-ready summary of the network ``cfg`` builds for ``plan``.

    Keys: ``task``, ``params``, ``in_channels``, ``num_classes``, ``patch_size``, ``residual``, ``norm``,
    ``act``, ``deep_supervision_heads``, ``loss_scheme``, ``stages`` (``stage``, ``channels``, ``kernel``,
    ``stride``, ``feature_shape`` ``[channels, d, h, w]``) and ``heads`` (``level``, ``scale`` per-axis
    downsampling, ``shape`` ``[C, d, h, w]`` of one sample's train-mode logits, ``params``).

    Raises:
        ValueError: the plan's patch is not divisible by its stride product, or the topology is invalid.
    """
    with torch.device("meta"):  # parameters without storage: counting them needs no memory
        model = build_model(cfg, plan)
    patch = tuple(plan.patch_size)
    features = model.feature_shapes(patch)
    scales, shapes = model.head_scales(), model.head_shapes(patch)
    heads = [
        {"level": level, "scale": list(scales[level]), "shape": list(shapes[level]),
         "params": _count(model.heads[level])}
        for level in range(model.num_heads)
    ]
    stages = [
        {
            "stage": s,
            "channels": plan.filters[s],
            "kernel": list(plan.kernels[s]),
            "stride": list(plan.strides[s]),
            "feature_shape": list(features[s]),
        }
        for s in range(len(plan.filters))
    ]
    return {
        "task": plan.task,
        "plan_source": plan.source,
        "params": _count(model),
        "params_encoder": _count(model.encoder),
        "params_decoder": _count(model.decoder),
        "in_channels": plan.in_channels,
        "num_classes": plan.num_classes,
        "patch_size": list(patch),
        "residual": cfg.model.residual,
        "norm": cfg.model.norm,
        "act": cfg.model.act,
        "deep_supervision_heads": model.num_heads,
        "loss_scheme": cfg.loss.scheme,
        "stages": stages,
        "heads": heads,
    }


def render(summary: dict[str, Any]) -> str:
    """Readable text tables for a :func:`describe` summary."""
    s = summary
    blocks = "residual" if s["residual"] else "plain"
    lines = [
        f"deep-supervised U-Net for {s['task']} (plan: {s.get('plan_source', 'dataset')}): "
        f"{s['params']:,} parameters (encoder {s['params_encoder']:,}, decoder {s['params_decoder']:,})",
        f"input [{s['in_channels']}, {_dims(s['patch_size'])}] -> {s['num_classes']} classes; "
        f"{blocks} blocks, {s['norm']} norm, {s['act']}; loss scheme {s['loss_scheme']}",
        "",
        f"{'stage':>5}  {'channels':>8}  {'kernel':<9}  {'stride':<9}  feature map",
    ]
    for st in s["stages"]:
        kernel, stride, size = _dims(st["kernel"]), _dims(st["stride"]), _dims(st["feature_shape"][1:])
        lines.append(f"{st['stage']:>5}  {st['channels']:>8}  {kernel:<9}  {stride:<9}  {size}")
    lines += [
        "",
        f"{s['deep_supervision_heads']} segmentation heads, one per decoder scale (native resolution in training):",
        f"{'level':>5}  {'scale':<11}  logits",
    ]
    for h in s["heads"]:
        lines.append(f"{h['level']:>5}  {_dims(h['scale']):<11}  [{h['shape'][0]}, {_dims(h['shape'][1:])}]")
    return "\n".join(lines)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dims(values: list[int]) -> str:
    return "x".join(str(v) for v in values)
