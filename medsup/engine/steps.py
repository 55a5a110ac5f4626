"""The training and validation step closures (each a few lines; everything else is a handler)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, EventEnum
from torch import nn

from medsup.config import Config
from medsup.device import autocast, autocast_dtype
from medsup.losses import DeepSupervisionLoss


class StepEvents(EventEnum):
    """Events fired from inside the training step on engines that registered them
    (``engine.register_events(*StepEvents)``); other engines never see them.

    ``GRADS_READY``: after backward and AMP unscaling, before clipping and the optimiser step. Handlers see
    each parameter's true gradient in ``p.grad`` (``None`` where the parameter got none).
    """

    GRADS_READY = "grads_ready"


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """``train.optimizer``: SGD with Nesterov momentum (nnU-Net's) or AdamW, at ``train.lr`` (PolyLR moves it).

    Fused: one kernel updates every parameter (3-4.5x faster than torch's per-parameter loop on a CPU for the
    quick and the reference liver networks, the same weights to float rounding: ``bench/optimizer_step.py``),
    and with fp16's GradScaler the step skips an overflow on the device instead of the host reading the
    overflow flag first.
    """
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                               nesterov=True, fused=True)
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore a checkpoint's optimiser state and hyperparameters, keeping this build's implementation
    (``fused``, ``foreach``): a checkpoint from before :func:`build_optimizer` fused would otherwise switch it
    back to torch's loop, which refuses the GradScaler's on-device overflow flag that a fused build is given."""
    implementation: list[dict[str, Any]] = [{k: group[k] for k in ("fused", "foreach") if k in group}
                                            for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, implementation, strict=True):
        group.update(keep)


#: ``(image, label) -> (image, label)`` on the device, both ``(B, 1, X, Y, Z)`` float (the batch's random affine)
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def prepare(batch: dict[str, Any], device: torch.device, channels_last: bool,
            augment: BatchTransform | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch dict -> plain ``(B, 1, X, Y, Z)`` float32 image and integer label tensors on ``device``, through
    ``augment`` on the device first when given.

    MetaTensors are unwrapped: their per-op metadata tracking costs time and nothing downstream needs it. A
    batch may come in the training cache's types (float16 image, uint8 label: what the loader hands over when
    the step augments): they cross to the device as they are and widen there.
    """
    image, label = batch["image"], batch["label"]
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    label = label.as_tensor() if hasattr(label, "as_tensor") else label
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    # the layout once: in the copy to the device, or after the augmentation (whose output is contiguous)
    image = image.to(device, non_blocking=True, memory_format=fmt if augment is None else torch.preserve_format)
    label = label.to(device, non_blocking=True)
    if augment is not None:
        image, label = augment(image, label)
    image = image.to(torch.float32).contiguous(memory_format=fmt)  # no copy where both hold already
    return image, (label.round() if label.is_floating_point() else label).long()


def make_train_step(
    model: nn.Module,
    loss_fn: DeepSupervisionLoss,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    amp: bool = True,
    amp_dtype: str = "auto",
    grad_clip: float = 12.0,
    channels_last: bool = False,
    augment: BatchTransform | None = None,
) -> Callable[[Engine, dict[str, Any]], dict[str, torch.Tensor]]:
    """(``augment`` on the device,) forward, deep-supervision loss, backward, unscale,
    :attr:`StepEvents.GRADS_READY`, clip, step. Returns ``{"loss": detached scalar tensor}`` on ``device``.

    fp16 uses a GradScaler; bf16 and fp32 need none. The step never sees the heads: the model returns its
    list of logits and the loss takes it whole. Nothing in it reads from the device (the fp16 GradScaler's
    overflow skip neither, with :func:`build_optimizer`'s fused optimisers): on a GPU the host queues the next
    step while this one runs. Whoever wants the loss as a number pays that sync (the progress bar, every
    ``train.sync_every`` steps).
    """
    dtype = autocast_dtype(device, amp, amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(engine: Engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        model.train()
        image, label = prepare(batch, device, channels_last, augment)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            outputs = model(image)
        loss = loss_fn([o.float() for o in outputs], label)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # a no-op without fp16; scaler.step would unscale here anyway
        if engine.has_registered_events(StepEvents.GRADS_READY):  # an engine without them just trains
            engine.fire_event(StepEvents.GRADS_READY)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return {"loss": loss.detach()}

    step.scaler = scaler  # type: ignore[attr-defined]  # checkpointed with the rest of the state
    return step
