"""Event handlers attached to the trainer: LR schedule, loss schedule, epoch metrics, gradient norms,
validation, checkpoints, early stopping. Each is a small callable; :func:`medsup.train.run_training` wires them."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, cast

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from medsup.config import Config
from medsup.engine.steps import StepEvents
from medsup.losses import DeepSupervisionLoss, parts_metrics

log = logging.getLogger(__name__)
LogFn = Callable[[dict[str, float], int], None]


def attach_step_handlers(trainer: Engine, cfg: Config, stages: dict[str, torch.nn.Module],
                         loss_fn: DeepSupervisionLoss, optimizer: torch.optim.Optimizer, batch_size: int,
                         ) -> tuple[EpochMetrics, GradNorms | None]:
    """What runs around every training step: the poly LR, the loss's epoch, the epoch's loss parts and (with
    ``train.grad_norm_every``) the gradient norms of ``stages`` (the network's ``named_stages()``). None of
    them reads from the device per step: the host reads at :meth:`EpochMetrics.compute` and
    :meth:`GradNorms.compute`, and the loss's own check every ``train.sync_every`` steps."""
    total_iterations = cfg.train.epochs * cfg.train.iterations_per_epoch
    trainer.add_event_handler(Events.ITERATION_STARTED, PolyLR(optimizer, cfg.train.lr, total_iterations,
                                                                cfg.train.poly_exponent))
    trainer.add_event_handler(Events.EPOCH_STARTED, LossEpoch(loss_fn))
    epoch_metrics = EpochMetrics(loss_fn, optimizer, batch_size)
    trainer.add_event_handler(Events.EPOCH_STARTED, epoch_metrics.started_epoch)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, epoch_metrics.iteration)
    grad_norms = GradNorms(stages, cfg.train.grad_norm_every) if cfg.train.grad_norm_every else None
    if grad_norms is not None:  # train.grad_norm.<stage>: encoder0.., decoder0.., head0.., total
        grad_norms.attach(trainer)
    return epoch_metrics, grad_norms


class PolyLR:
    """nnU-Net's poly schedule per iteration: ``lr = lr0 * (1 - it / total) ** exponent``."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr0: float, total_iterations: int, exponent: float) -> None:
        self.optimizer, self.lr0, self.total, self.exponent = optimizer, lr0, max(1, total_iterations), exponent

    def __call__(self, engine: Engine) -> None:
        it = engine.state.iteration - 1  # ITERATION_STARTED: iterations done so far
        lr = self.lr0 * max(0.0, 1.0 - it / self.total) ** self.exponent
        for group in self.optimizer.param_groups:
            group["lr"] = lr


class LossEpoch:
    """Tell the deep-supervision loss the 0-based epoch (its alpha(t) schedule) at EPOCH_STARTED."""

    def __init__(self, loss_fn: DeepSupervisionLoss) -> None:
        self.loss_fn = loss_fn

    def __call__(self, engine: Engine) -> None:
        self.loss_fn.set_epoch(engine.state.epoch - 1)


class EpochMetrics:
    """Average the loss parts over an epoch's iterations; report loss per head, weights, hinge flags,
    LR, epoch time and samples/s. Values are all-reduced across DDP ranks.

    The parts are summed on the loss's device and read once, at :meth:`compute`: a read per iteration would
    make the host wait for each GPU step. :meth:`compute` first runs the loss's finiteness check, so a NaN
    stops the run before this epoch is validated, logged or checkpointed.
    """

    def __init__(self, loss_fn: DeepSupervisionLoss, optimizer: torch.optim.Optimizer, batch_size: int) -> None:
        self.loss_fn, self.optimizer, self.batch_size = loss_fn, optimizer, batch_size
        self.sums: torch.Tensor | None = None  # (1 + 3H,) float64 on the loss's device: DeepSupervisionLoss.last_values
        self.count = 0
        self.started = time.perf_counter()

    def started_epoch(self, engine: Engine) -> None:
        self.sums = None
        self.count = 0
        self.started = time.perf_counter()

    def iteration(self, engine: Engine) -> None:
        values = self.loss_fn.last_values()
        if values is None:
            return
        values = values.double()
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1

    def compute(self, engine: Engine) -> dict[str, float]:
        self.loss_fn.check_finite()
        seconds = time.perf_counter() - self.started
        out: dict[str, float] = {}
        if self.sums is not None:
            mean = (self.sums / self.count).cpu()
            if idist.get_world_size() > 1:
                mean = cast(torch.Tensor, idist.all_reduce(mean)) / idist.get_world_size()
            out = parts_metrics(mean.tolist(), self.loss_fn.cfg.scheme, self.loss_fn.alpha, "train.loss")
        out["train.lr"] = float(self.optimizer.param_groups[0]["lr"])
        out["train.epoch_seconds"] = seconds
        out["train.samples_per_s"] = self.count * self.batch_size * idist.get_world_size() / max(seconds, 1e-9)
        return out


class BestTracker:
    """Remember the best validation score and, with ``patience`` > 0, stop the trainer when it stalls."""

    def __init__(self, key: str = "val.dice", patience: int = 0) -> None:
        self.key, self.patience = key, patience
        self.best = -math.inf
        self.best_epoch = 0
        self.stale = 0

    def update(self, engine: Engine, metrics: dict[str, float]) -> bool:
        """Record this validation; returns True when it is a new best."""
        score = metrics.get(self.key, float("nan"))
        if not math.isnan(score) and score > self.best:
            self.best, self.best_epoch, self.stale = score, engine.state.epoch, 0
            return True
        self.stale += 1
        if self.stopped:
            log.info("early stop: %s has not improved for %d validations (best %.4f at epoch %d)",
                     self.key, self.stale, self.best, self.best_epoch)
            engine.terminate()
        return False

    @property
    def stopped(self) -> bool:
        """True once the score has stalled for ``patience`` validations (the trainer was told to stop)."""
        return bool(self.patience) and self.stale >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.stale = state["best"], state["best_epoch"], state["stale"]


class GradNorms:
    """Per-epoch mean L2 gradient norm of named modules (a network's stages), sampled cheaply.

    Attach to :attr:`~medsup.engine.steps.StepEvents.GRADS_READY` (after backward and AMP unscaling, before
    clipping and the optimiser step) with :meth:`attach`. The first iteration of every epoch and then every
    ``every``-th one is measured: per module, the L2 norm of all its parameters' gradients taken together
    (0 when none got a gradient, e.g. a zero-weight head), plus ``total`` over every module, the norm that
    gradient clipping compares with its threshold. An fp16 overflow step (non-finite gradients, skipped by the
    GradScaler) is skipped here too. :meth:`compute` gives ``{"<prefix>.<name>": mean}`` for the epoch.

    Under DDP the gradients are already all-reduced when the event fires, so every rank measures the same.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], every: int, prefix: str = "train.grad_norm") -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.params = {name: [p for p in m.parameters() if p.requires_grad] for name, m in modules.items()}
        self.every, self.prefix = every, prefix
        self.names = [*self.params, "total"]
        self.device = next((p.device for params in self.params.values() for p in params), torch.device("cpu"))
        # summed on the parameters' device and read once an epoch: a read per measurement would make the host
        # wait for the GPU's queue
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        self.counted = torch.zeros((), dtype=torch.long, device=self.device)
        self.seen = 0

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (whose step fires ``GRADS_READY``, registered with ``register_events``)."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.started_epoch)
        engine.add_event_handler(StepEvents.GRADS_READY, self.sample)

    def started_epoch(self, engine: Engine) -> None:
        self.sums.zero_()
        self.counted.zero_()
        self.seen = 0

    @property
    def count(self) -> int:
        """Measurements summed this epoch (one host sync)."""
        return int(self.counted)

    def measure(self) -> torch.Tensor:
        """``(len(names),)`` float64 on the parameters' device: each module's gradient norm, then the total."""
        zero = torch.zeros((), device=self.device)
        parts = []
        for params in self.params.values():
            grads = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p in params
                     if p.grad is not None]
            parts.append(torch.linalg.vector_norm(torch.stack(grads)) if grads else zero)
        norms = torch.stack(parts) if parts else zero.reshape(0)
        total = torch.linalg.vector_norm(norms).reshape(1)
        return torch.cat([norms, total]).double()

    def sample(self, engine: Engine) -> None:
        seen, self.seen = self.seen, self.seen + 1
        if seen % self.every:
            return
        norms = self.measure()
        finite = torch.isfinite(norms).all()  # an fp16 overflow step is skipped, decided on the device
        self.sums += torch.where(finite, norms, torch.zeros_like(norms))
        self.counted += finite

    def compute(self) -> dict[str, float]:
        """Mean norms of this epoch's measurements (empty before the first)."""
        count = self.count
        if not count:
            return {}
        means = (self.sums / count).tolist()
        return {f"{self.prefix}.{name}": value for name, value in zip(self.names, means, strict=True)}
