"""Event handlers attached to the trainer: LR schedule, loss schedule, epoch metrics, gradient norms,
validation, checkpoints, early stopping. Each is a small callable; :func:`medsup.train.run_training` wires them."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, cast

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from medsup.engine.steps import StepEvents
from medsup.losses import DeepSupervisionLoss

log = logging.getLogger(__name__)
LogFn = Callable[[dict[str, float], int], None]


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
    LR, epoch time and samples/s. Values are all-reduced across DDP ranks."""

    def __init__(self, loss_fn: DeepSupervisionLoss, optimizer: torch.optim.Optimizer, batch_size: int) -> None:
        self.loss_fn, self.optimizer, self.batch_size = loss_fn, optimizer, batch_size
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0
        self.started = time.perf_counter()

    def started_epoch(self, engine: Engine) -> None:
        self.sums.clear()
        self.count = 0
        self.started = time.perf_counter()

    def iteration(self, engine: Engine) -> None:
        parts = self.loss_fn.last_parts
        if parts is None:
            return
        for key, value in parts.as_metrics("train.loss").items():
            self.sums[key] += value
        self.count += 1

    def compute(self, engine: Engine) -> dict[str, float]:
        seconds = time.perf_counter() - self.started
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] / max(1, self.count) for k in keys], dtype=torch.float64)
        if idist.get_world_size() > 1:
            values = cast(torch.Tensor, idist.all_reduce(values)) / idist.get_world_size()
        out = dict(zip(keys, values.tolist(), strict=True))
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
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)
        self.count = 0
        self.seen = 0

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (whose step fires ``GRADS_READY``, registered with ``register_events``)."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.started_epoch)
        engine.add_event_handler(StepEvents.GRADS_READY, self.sample)

    def started_epoch(self, engine: Engine) -> None:
        self.sums.zero_()
        self.count = self.seen = 0

    def measure(self) -> torch.Tensor:
        """``(len(names),)`` float64 on the CPU: each module's gradient norm, then the total."""
        device = next((p.device for params in self.params.values() for p in params), torch.device("cpu"))
        zero = torch.zeros((), device=device)
        parts = []
        for params in self.params.values():
            grads = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p in params
                     if p.grad is not None]
            parts.append(torch.linalg.vector_norm(torch.stack(grads)) if grads else zero)
        norms = torch.stack(parts) if parts else zero.reshape(0)
        total = torch.linalg.vector_norm(norms).reshape(1)
        return torch.cat([norms, total]).to("cpu", torch.float64)  # one device sync per measurement

    def sample(self, engine: Engine) -> None:
        seen, self.seen = self.seen, self.seen + 1
        if seen % self.every:
            return
        norms = self.measure()
        if not bool(torch.isfinite(norms).all()):
            return
        self.sums += norms
        self.count += 1

    def compute(self) -> dict[str, float]:
        """Mean norms of this epoch's measurements (empty before the first)."""
        if not self.count:
            return {}
        means = (self.sums / self.count).tolist()
        return {f"{self.prefix}.{name}": value for name, value in zip(self.names, means, strict=True)}
