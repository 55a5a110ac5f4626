"""Per-stage gradient norms: recorded after backward (unscaled, before clipping), every N iterations, per epoch."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine, Events

from medsup.config import load
from medsup.engine.handlers import GradNorms
from medsup.engine.steps import StepEvents, make_train_step
from medsup.losses import build_loss
from medsup.models.topology import Topology
from medsup.models.unet import DeepSupervisedUNet


def train_one_epoch(scheme: str, iterations: int = 3, every: int = 1, grad_clip: float = 12.0,
                    ) -> tuple[GradNorms, dict[str, float], list[dict[str, float]]]:
    torch.manual_seed(0)
    net = DeepSupervisedUNet(1, 3, Topology(((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), (4, 8, 16)))
    loss_fn = build_loss(load("tiny", [f"loss.scheme={scheme}"]))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    trainer = Engine(make_train_step(net, loss_fn, optimizer, torch.device("cpu"), amp=False, grad_clip=grad_clip))
    trainer.register_events(*StepEvents)
    norms = GradNorms(net.named_stages(), every)
    norms.attach(trainer)
    seen: list[dict[str, float]] = []  # every measurement, straight from the event
    trainer.add_event_handler(StepEvents.GRADS_READY, lambda _e: seen.append(
        dict(zip(norms.names, norms.measure().tolist(), strict=True))))
    out: dict[str, float] = {}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _e: out.update(norms.compute()))
    batches = [{"image": torch.randn(1, 1, 16, 16, 16), "label": (torch.rand(1, 1, 16, 16, 16) * 3).floor()}
               for _ in range(iterations)]
    trainer.run(batches, max_epochs=1)
    return norms, out, seen


def test_every_stage_gets_a_finite_positive_norm() -> None:
    norms, metrics, _ = train_one_epoch("nnunet")
    stages = ["encoder0", "encoder1", "encoder2", "decoder0", "decoder1", "head0", "head1"]
    assert sorted(metrics) == sorted(f"train.grad_norm.{s}" for s in [*stages, "total"])
    for key, value in metrics.items():
        assert math.isfinite(value) and value > 0, key
    total = math.sqrt(sum(metrics[f"train.grad_norm.{s}"] ** 2 for s in stages))
    assert metrics["train.grad_norm.total"] == pytest.approx(total, rel=0.05)  # mean of norms, not of squares
    assert norms.count == 3


def test_none_scheme_head_gets_zero() -> None:
    _, metrics, _ = train_one_epoch("none")
    assert metrics["train.grad_norm.head1"] == 0.0  # the unsupervised companion head gets no gradient
    assert metrics["train.grad_norm.head0"] > 0 and metrics["train.grad_norm.decoder1"] > 0


def test_norms_are_taken_before_clipping_and_every_n_iterations() -> None:
    norms, metrics, seen = train_one_epoch("nnunet", iterations=5, every=2, grad_clip=1e-3)
    assert norms.count == 3  # iterations 0, 2 and 4 of the epoch
    assert min(s["total"] for s in seen) > 1e-3  # the clip (to 1e-3) comes after the measurement
    measured = [seen[i]["encoder0"] for i in (0, 2, 4)]
    assert metrics["train.grad_norm.encoder0"] == pytest.approx(sum(measured) / 3)


def test_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every"):
        GradNorms({}, 0)


def test_an_engine_without_step_events_trains() -> None:
    torch.manual_seed(0)
    net = DeepSupervisedUNet(1, 3, Topology(((3, 3, 3),) * 2, ((1, 1, 1), (2, 2, 2)), (4, 8)))
    step = make_train_step(net, build_loss(load("tiny")), torch.optim.SGD(net.parameters(), lr=0.1),
                           torch.device("cpu"), amp=False)
    engine = Engine(step)  # StepEvents not registered (e.g. bench/train_step.py)
    engine.run([{"image": torch.randn(1, 1, 8, 8, 8), "label": torch.zeros(1, 1, 8, 8, 8)}], max_epochs=1)
    assert math.isfinite(engine.state.output["loss"])
