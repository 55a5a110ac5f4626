"""Deep-supervision losses: a per-head DiceCE combined over the U-Net's heads by a configurable scheme.

``loss(outputs, label)`` takes what the network returns (a list of head logits in training, one tensor in
evaluation) and the full-resolution integer label ``(B, 1, D, H, W)``; the label is downsampled to each
head's native shape with nearest-exact (nnU-Net: targets are downsampled, logits never upsampled).
The training step never knows about heads: schedules advance through :meth:`DeepSupervisionLoss.set_epoch`
(an event handler) and the parts of the last call are read from :attr:`DeepSupervisionLoss.last_parts`.

Schemes over heads ``i = 0 .. H-1`` (0 = full resolution), per-head loss ``l_i``:

- ``nnunet``:  ``sum_i w_i l_i`` with ``w_i ∝ 1/2^i`` normalised to sum 1; ``nnunet_zero_coarsest`` gives the
  coarsest head weight 0 before normalising, as nnU-Net does.
- ``dsn``:     Deeply-Supervised Nets, ``l_0 + sum_{m>=1} alpha(t) * max(0, l_m - gamma_m)``; ``gamma_m`` is
  ``dsn_gamma`` (absolute) or ``dsn_gamma`` x the running mean of ``l_m`` (relative); ``alpha(t)`` follows
  ``dsn_schedule`` over epochs (:func:`dsn_alpha`). The paper's ``||w||^2`` terms are the optimiser's
  weight decay, not part of this loss.
- ``uniform``: ``mean_i l_i``.
- ``none``:    ``l_0`` only (the ablation baseline; coarse heads receive no gradient).

Pure torch/MONAI: no engine, tracking or CLI imports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from monai.losses import DiceCELoss
from torch import Tensor, nn
from torch.nn.functional import adaptive_max_pool3d, interpolate

from medsup.config import Config, LossConfig

HeadLoss = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class LossParts:
    """What one call of :class:`DeepSupervisionLoss` was made of (plain floats, ready for MLflow).

    ``raw[i]`` is head i's unweighted loss, ``weights[i]`` its weight (nnU-Net weight, or ``alpha(t)`` for a
    DSN companion), ``active[i]`` whether it contributed gradient (weight > 0 and, for DSN companions, the
    hinge open: ``raw > gamma``), ``gammas[i]`` the DSN hinge threshold (0 elsewhere).
    """

    scheme: str
    total: float
    raw: tuple[float, ...]
    weights: tuple[float, ...]
    active: tuple[bool, ...]
    gammas: tuple[float, ...]
    epoch: int
    alpha: float

    def as_metrics(self, prefix: str = "loss") -> dict[str, float]:
        """Flat ``{name: value}`` for metric logging: ``loss.total``, ``loss.head1``, ``loss.weight1``, ..."""
        values = [self.total, *self.raw, *self.weights, *(float(a) for a in self.active)]
        return parts_metrics(values, self.scheme, self.alpha, prefix)


def parts_metrics(values: Sequence[float], scheme: str, alpha: float, prefix: str = "loss") -> dict[str, float]:
    """Name the values of :meth:`DeepSupervisionLoss.last_values` (one call's, or their mean over an epoch, where
    ``active{i}`` becomes the share of calls in which head i was active): ``{prefix}.total``, ``{prefix}.alpha``
    (``dsn`` only), then per head ``{prefix}.head{i}``, ``.weight{i}``, ``.active{i}``."""
    heads, rest = divmod(len(values) - 1, 3)
    if rest or heads < 1:
        raise ValueError(f"expected 1 + 3 x heads values (total, raw, weights, active), got {len(values)}")
    out = {f"{prefix}.total": float(values[0])}
    if scheme == "dsn":
        out[f"{prefix}.alpha"] = alpha
    for i in range(heads):
        out[f"{prefix}.head{i}"] = float(values[1 + i])
        out[f"{prefix}.weight{i}"] = float(values[1 + heads + i])
        out[f"{prefix}.active{i}"] = float(values[1 + 2 * heads + i])
    return out


def nnunet_weights(num_heads: int, zero_coarsest: bool = False) -> list[float]:
    """``1/2^i`` over heads (0 = full resolution) normalised to sum 1; optionally the coarsest gets 0.

    nnU-Net zeroes the coarsest head only when there is more than one (a single head keeps weight 1).
    """
    if num_heads < 1:
        raise ValueError(f"need at least one head, got {num_heads}")
    w = [0.5**i for i in range(num_heads)]
    if zero_coarsest and num_heads > 1:
        w[-1] = 0.0
    total = sum(w)
    return [v / total for v in w]


def dsn_alpha(cfg: LossConfig, epoch: int) -> float:
    """Companion weight ``alpha(t)`` of the DSN scheme at 0-based ``epoch``.

    ``end`` is ``loss.dsn_end_epoch``, by default the training's epochs (:func:`build_loss` fills it in), so that
    the companions fade out over the whole training as in the DSN paper, whatever its length.
    ``constant``: ``alpha0``; ``linear``: ``alpha0 * (1 - epoch / end)``, 0 from ``end`` on; ``exponential``:
    ``alpha0 * decay**epoch``; ``switch``: ``alpha0`` before ``end``, then 0 (the original DSN code dropped
    the companion heads late in training).
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    a0, end = cfg.dsn_alpha, cfg.dsn_end_epoch
    if cfg.dsn_schedule == "constant":
        return a0
    if end is None and cfg.dsn_schedule in ("linear", "switch"):
        raise ValueError("loss.dsn_end_epoch is unset: build the loss with build_loss(), which sets it to "
                         "train.epochs")
    end = end or 0
    if cfg.dsn_schedule == "linear":
        return a0 * max(0.0, 1.0 - epoch / end) if end > 0 else 0.0
    if cfg.dsn_schedule == "exponential":
        return a0 * cfg.dsn_decay**epoch
    if cfg.dsn_schedule == "switch":
        return a0 if epoch < end else 0.0
    raise ValueError(f"unknown dsn_schedule {cfg.dsn_schedule!r}")


def heads_may_go_unused(cfg: LossConfig) -> bool:
    """Whether some head can get weight 0, so its parameters get no gradient (``grad is None``).

    Zero-weight heads are measured outside autograd, so DDP must then be built with
    ``find_unused_parameters=True``: ``none``, ``nnunet`` with ``nnunet_zero_coarsest``, and ``dsn`` when
    ``alpha(t)`` can reach 0 (``linear``/``switch`` schedules, or ``dsn_alpha == 0``).
    """
    if cfg.scheme == "none":
        return True
    if cfg.scheme == "nnunet":
        return cfg.nnunet_zero_coarsest
    if cfg.scheme == "dsn":
        return cfg.dsn_alpha == 0 or cfg.dsn_schedule in ("linear", "switch")
    return False


class DeepSupervisionLoss(nn.Module):
    """Combine a per-head loss over deep-supervision heads (see the module docstring for the schemes).

    Args:
        cfg: the ``loss`` section of the config.
        head_loss: loss of one head, ``(logits (B, C, *S), label (B, 1, *S)) -> scalar``.

    Call with ``outputs``: a list of ``(B, C, d_i, h_i, w_i)`` logits, full resolution first (train mode),
    or one ``(B, C, D, H, W)`` tensor (eval mode, treated as a single head); ``label``: ``(B, 1, D, H, W)``
    integer classes at full resolution. Returns the scalar total.

    The relative DSN hinge keeps a running mean of each companion's loss; it is updated from detached values
    only while the module is in training mode and gradients are enabled (never from validation batches). It is
    the module's extra state: ``state_dict()`` holds it, and a resumed training restores it.

    A non-finite head loss raises :class:`FloatingPointError` naming the head, from the call that makes
    ``check_every`` calls since the last check (:meth:`check_finite`). Between checks the host reads nothing
    back: the first bad call is remembered on the loss's device, so on a GPU the steps queue back to back
    instead of draining the queue in the middle of each step. ``check_every=1`` checks every call.
    """

    def __init__(self, cfg: LossConfig, head_loss: HeadLoss, check_every: int = 1) -> None:
        super().__init__()
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.cfg = cfg
        self.head_loss = head_loss
        self.check_every = check_every
        self.epoch = 0
        self._running: Tensor | None = None  # (H,) running-mean loss per head, relative hinge only
        self._last: tuple[Tensor, ...] | None = None  # detached parts of the last call, floats made lazily
        self._last_epoch = 0
        self._calls = 0
        # since the last check, on the device: (number of the first call with a non-finite head loss, 0 for none;
        # that call's head losses (H,)); the head shapes of those calls name the head in the error
        self._first_bad: tuple[Tensor, Tensor] | None = None
        self._shapes: list[list[int]] = []
        self._weights: tuple[tuple[float, ...], torch.device, Tensor] | None = None

    def get_extra_state(self) -> Tensor:
        """The relative hinge's running mean loss per head, ``(H,)``; empty ``(0,)`` before its first update."""
        return self._running.detach().clone() if self._running is not None else torch.zeros(0)

    def set_extra_state(self, state: Tensor) -> None:
        """Restore :meth:`get_extra_state` (an empty tensor: no running mean yet)."""
        self._running = state.clone() if state.numel() else None

    def set_epoch(self, epoch: int) -> None:
        """Advance the schedules to 0-based ``epoch`` (Ignite: ``state.epoch - 1`` at EPOCH_STARTED)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    @property
    def alpha(self) -> float:
        """DSN companion weight at the current epoch (1.0 for the other schemes' reporting)."""
        return dsn_alpha(self.cfg, self.epoch) if self.cfg.scheme == "dsn" else 1.0

    def weights(self, num_heads: int) -> list[float]:
        """Weight of each head at the current epoch (``dsn``: 1 for head 0, ``alpha(t)`` for companions)."""
        scheme = self.cfg.scheme
        if scheme == "nnunet":
            return nnunet_weights(num_heads, self.cfg.nnunet_zero_coarsest)
        if scheme == "uniform":
            return [1.0 / num_heads] * num_heads
        if scheme == "none":
            return [1.0] + [0.0] * (num_heads - 1)
        if scheme == "dsn":
            return [1.0] + [self.alpha] * (num_heads - 1)
        raise ValueError(f"unknown loss scheme {scheme!r}")

    def forward(self, outputs: Tensor | Sequence[Tensor], label: Tensor) -> Tensor:
        """Scalar deep-supervision loss of ``outputs`` against the full-resolution ``label``."""
        heads = [outputs] if isinstance(outputs, Tensor) else list(outputs)
        self._check(heads, label)
        weights = self.weights(len(heads))
        # heads with weight 0 are still measured (for monitoring) but outside autograd: no graph, no gradient
        raw = torch.stack([
            (self._head(logits, label) if w > 0 else self._head_no_grad(logits, label)).float()
            for logits, w in zip(heads, weights, strict=True)
        ])
        self._record_finite(raw, heads)

        w = self._weights_tensor(weights, raw)
        gamma = torch.zeros_like(raw)
        active = w > 0
        terms = raw
        if self.cfg.scheme == "dsn" and len(heads) > 1:
            # companions count only while above their threshold: alpha * max(0, l_m - gamma_m)
            gamma[1:] = self._gamma(raw.detach())[1:]
            terms = torch.cat([raw[:1], torch.clamp(raw[1:] - gamma[1:], min=0.0)])
            active[1:] &= raw.detach()[1:] > gamma[1:]
        total = (w * terms).sum()
        self._last = (total.detach(), raw.detach(), w, active, gamma)
        self._last_epoch = self.epoch
        return total

    def last_values(self) -> Tensor | None:
        """The last call's reported parts as one detached vector ``(1 + 3H,)`` on its device, read without a host
        sync: total, then per head its raw loss, weight and active flag (0/1); :func:`parts_metrics` names them."""
        if self._last is None:
            return None
        total, raw, w, active, _ = self._last
        return torch.cat([total.reshape(1), raw, w, active.to(raw.dtype)])

    @property
    def last_parts(self) -> LossParts | None:
        """Parts of the last call as floats (one device sync, paid only when read)."""
        if self._last is None:
            return None
        total, raw, w, active, gamma = self._last
        return LossParts(
            scheme=self.cfg.scheme,
            total=float(total),
            raw=tuple(raw.tolist()),
            weights=tuple(w.tolist()),
            active=tuple(bool(a) for a in active.tolist()),
            gammas=tuple(gamma.tolist()),
            epoch=self._last_epoch,
            alpha=dsn_alpha(self.cfg, self._last_epoch) if self.cfg.scheme == "dsn" else 1.0,
        )

    def _head(self, logits: Tensor, label: Tensor) -> Tensor:
        return self.head_loss(logits, downsample_label(label, logits.shape[2:], self.cfg.ds_label_downsample))

    def _head_no_grad(self, logits: Tensor, label: Tensor) -> Tensor:
        with torch.no_grad():
            return self._head(logits.detach(), label)

    def _gamma(self, raw: Tensor) -> Tensor:
        """DSN hinge thresholds per head from detached losses ``raw`` (H,)."""
        cfg = self.cfg
        if cfg.dsn_gamma_mode == "absolute":
            return torch.full_like(raw, cfg.dsn_gamma)
        running = self._running
        if running is None or running.shape != raw.shape:
            running = raw  # first batch: the mean of one observation
        running = running.to(raw.device)
        gamma = cfg.dsn_gamma * running  # threshold from the past, before this batch moves it
        if self.training and torch.is_grad_enabled():
            m = cfg.dsn_gamma_momentum
            self._running = m * running + (1.0 - m) * raw
        return gamma

    def _check(self, heads: list[Tensor], label: Tensor) -> None:
        if not heads:
            raise ValueError("no head outputs given")
        if label.ndim != 5 or label.shape[1] != 1:
            raise ValueError(f"label must be (B, 1, D, H, W) integer classes, got shape {list(label.shape)}")
        full = heads[0]
        if full.ndim != 5 or full.shape[0] != label.shape[0] or full.shape[2:] != label.shape[2:]:
            raise ValueError(f"head 0 logits {list(full.shape)} do not match the label {list(label.shape)}: "
                             f"expected (B, C, D, H, W) with the label's batch and spatial size")
        for i, h in enumerate(heads[1:], start=1):
            if h.ndim != 5 or h.shape[:2] != full.shape[:2]:
                raise ValueError(f"head {i} logits {list(h.shape)} differ from head 0 {list(full.shape)} "
                                 f"in batch or classes")

    def _weights_tensor(self, weights: list[float], like: Tensor) -> Tensor:
        # a tensor made from host values and copied to a GPU blocks the host until the GPU's queue drains: make it
        # once per value (the weights change at most once an epoch)
        key = tuple(weights)
        if self._weights is None or self._weights[0] != key or self._weights[1] != like.device:
            self._weights = (key, like.device, like.new_tensor(weights))
        return self._weights[2]

    def _record_finite(self, raw: Tensor, heads: list[Tensor]) -> None:
        """Remember, on the device, the first call since the last check whose head losses ``raw`` (H,) are not all
        finite; check on the host every ``check_every`` calls."""
        shapes = [list(h.shape) for h in heads]
        if self._first_bad is not None and (shapes != self._shapes or self._first_bad[1].device != raw.device):
            self.check_finite()  # another head layout or device: settle the calls made with the old one
            self._first_bad = None
        self._shapes = shapes
        self._calls += 1
        raw = raw.detach()
        if self._first_bad is None:
            self._first_bad = (torch.zeros((), dtype=torch.long, device=raw.device), torch.zeros_like(raw))
        call, bad_raw = self._first_bad
        first = (call == 0) & ~torch.isfinite(raw).all()
        self._first_bad = (torch.where(first, torch.full_like(call, self._calls), call),
                           torch.where(first, raw, bad_raw))
        if self._calls % self.check_every == 0:
            self.check_finite()

    def check_finite(self) -> None:
        """Raise :class:`FloatingPointError` if a call since the last check had a non-finite head loss, naming
        the first such call's head, its scale and its logits' shape. One host sync (and under DDP one all-reduce,
        so that every rank raises when one found a bad call); a silent NaN would poison the run instead. The
        trainer calls this at every epoch's end, before validating or checkpointing."""
        if self._first_bad is None:
            return
        call, raw = self._first_bad
        n = int(call)
        if dist.is_available() and dist.is_initialized():
            # DDP ranks reach each check at the same call; one stopping alone would leave the others waiting in
            # the next gradient all-reduce until the collective timed out, so all learn whether any went bad
            anywhere = (call > 0).to(torch.int32)
            dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
            if n == 0 and int(anywhere):
                raise FloatingPointError(f"the loss of another DDP rank is non-finite (this rank's {self._calls} "
                                         "calls were finite)")
        if n == 0:
            return
        values = raw.tolist()
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        i = bad[0]
        full = self._shapes[0][2:]
        scale = [f // s for f, s in zip(full, self._shapes[i][2:], strict=True)]
        raise FloatingPointError(
            f"loss of head {i} (scale {scale}, logits {self._shapes[i]}) is {values[i]} "
            f"(non-finite heads: {bad}; call {n} of the loss)"
        )


def downsample_label(label: Tensor, size: Sequence[int], mode: str = "nearest") -> Tensor:
    """Downsample an integer label ``(B, 1, D, H, W)`` to ``size`` ``(d, h, w)`` (returned as float).

    ``nearest``: nearest-exact sampling (nnU-Net's targets for its coarse heads): a lesion smaller than one
    coarse voxel is often not sampled at all, and that head is then taught background where the lesion is.
    ``max``: every coarse voxel takes the highest class among the fine voxels it covers, so a lesion stays
    visible at every scale (grown to at least one coarse voxel). Right for nested label maps whose classes
    rise inwards (background < liver < tumour; background < nodule).
    """
    if tuple(label.shape[2:]) == tuple(size):
        return label
    if mode == "max":
        return adaptive_max_pool3d(label.float(), tuple(size))
    if mode != "nearest":
        raise ValueError(f"label downsampling mode {mode!r}: expected 'nearest' or 'max'")
    return interpolate(label.float(), size=tuple(size), mode="nearest-exact")


def build_loss(cfg: Config) -> DeepSupervisionLoss:
    """The deep-supervision loss of ``cfg.loss`` over a per-head MONAI DiceCE (softmax, one-hot labels); an unset
    ``loss.dsn_end_epoch`` becomes ``train.epochs``; the finiteness check runs every ``train.sync_every`` calls."""
    c = cfg.loss
    if c.dsn_end_epoch is None:
        c = c.model_copy(update={"dsn_end_epoch": cfg.train.epochs})
    dice_ce = DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        include_background=c.include_background,
        batch=c.batch_dice,
        lambda_dice=c.dice_weight,
        lambda_ce=c.ce_weight,
        smooth_nr=c.smooth,
        smooth_dr=c.smooth,
    )
    return DeepSupervisionLoss(c, dice_ce, check_every=cfg.train.sync_every)
