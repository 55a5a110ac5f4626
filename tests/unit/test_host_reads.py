"""The training loop reads from the device only every ``train.sync_every`` steps and at each epoch's end.

On a GPU every read (``.item()``, ``bool(tensor)``, a tensor made from host values and copied over) makes the
host wait until the GPU's queue drains, so the next step is not queued while this one runs. On a CPU a
dispatch mode sees the ops that do it: ``_local_scalar_dense`` (``item``/``float``/``bool``/``int``) and
``lift_fresh`` (a tensor made from host data). ``.tolist()`` and device-to-host copies of CPU tensors are not
dispatched, so the CUDA test (tests/gpu/test_cuda.py) runs the same loop under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from ignite.engine import Engine, Events
from torch.utils._python_dispatch import TorchDispatchMode

from medsup.config import load
from medsup.engine.handlers import attach_step_handlers
from medsup.engine.steps import StepEvents, build_optimizer, make_train_step
from medsup.losses import build_loss
from medsup.models.topology import Topology
from medsup.models.unet import DeepSupervisedUNet

HOST_READS = {"aten._local_scalar_dense.default", "aten.lift_fresh.default", "aten.nonzero.default"}


class HostReads(TorchDispatchMode):
    """Records the host-reading ops dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if str(func) in HOST_READS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _reads_per_iteration(overrides: list[str], iterations: int) -> tuple[list[list[str]], list[str], dict[str, float]]:
    """Train one epoch of a tiny network with the trainer's own step and step handlers; returns the host reads
    of each iteration, those of the epoch's end (the metrics' compute) and the epoch's metrics."""
    torch.manual_seed(0)
    cfg = load("tiny", [f"train.iterations_per_epoch={iterations}", "train.epochs=1", *overrides])
    net = DeepSupervisedUNet(1, 3, Topology(((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), (4, 8, 16)))
    loss_fn = build_loss(cfg)
    optimizer = build_optimizer(cfg, net)
    trainer = Engine(make_train_step(net, loss_fn, optimizer, torch.device("cpu"), amp=cfg.train.amp,
                                     grad_clip=cfg.train.grad_clip))
    trainer.register_events(*StepEvents)
    epoch_metrics, grad_norms = attach_step_handlers(trainer, cfg, net.named_stages(), loss_fn, optimizer, 1)
    mode = HostReads()
    marks: list[int] = []
    metrics: dict[str, float] = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _e: marks.append(len(mode.ops)))

    def end(engine: Engine) -> None:
        metrics.update(epoch_metrics.compute(engine))
        if grad_norms is not None:
            metrics.update(grad_norms.compute())

    trainer.add_event_handler(Events.EPOCH_COMPLETED, end)
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(1, 1, 16, 16, 16, generator=g),
                "label": (torch.rand(1, 1, 16, 16, 16, generator=g) * 3).floor()} for _ in range(iterations)]
    with mode:
        trainer.run(batches, max_epochs=1)
    bounds = [0, *marks]
    per_iteration = [mode.ops[a:b] for a, b in itertools.pairwise(bounds)]
    return per_iteration, mode.ops[marks[-1]:], metrics


@pytest.mark.parametrize("scheme", ["nnunet", "dsn"])
def test_the_step_and_its_handlers_read_the_device_only_every_sync_every_steps(scheme: str) -> None:
    per_iteration, epoch_end, metrics = _reads_per_iteration(
        [f"loss.scheme={scheme}", "loss.dsn_gamma_mode=relative", "train.sync_every=4", "train.grad_norm_every=1"],
        iterations=9)
    for i, ops in enumerate(per_iteration, start=1):
        if i == 1:
            assert ops.count("aten._local_scalar_dense.default") == 0, ops  # the head weights are made once
        elif i % 4 == 0:
            assert ops == ["aten._local_scalar_dense.default"], (i, ops)  # the loss's finiteness check
        else:
            assert ops == [], (i, ops)
    assert epoch_end, "the epoch's end reads the sums (and checks the loss) once"
    # what was summed on the device is the epoch's mean, as before
    assert 0 < metrics["train.loss.total"] < 10 and metrics["train.loss.weight0"] > 0
    assert metrics["train.grad_norm.total"] > 0 and metrics["train.lr"] > 0


def test_sync_every_one_checks_each_step() -> None:
    per_iteration, _, _ = _reads_per_iteration(["train.sync_every=1", "train.grad_norm_every=0"], iterations=3)
    assert [ops.count("aten._local_scalar_dense.default") for ops in per_iteration] == [1, 1, 1]


def test_epoch_mean_matches_the_calls() -> None:
    """The device-side sums give the mean of the per-call parts (as the per-call floats did)."""
    torch.manual_seed(0)
    cfg = load("tiny", ["loss.scheme=dsn", "train.sync_every=3"])
    loss_fn = build_loss(cfg)
    from medsup.engine.handlers import EpochMetrics

    net = torch.nn.Linear(1, 1)
    metrics = EpochMetrics(loss_fn, torch.optim.SGD(net.parameters(), lr=0.1), batch_size=2)
    label = (torch.rand(1, 1, 8, 8, 8) * 3).floor()
    seen = []
    for _ in range(5):
        loss_fn([torch.randn(1, 3, 8, 8, 8), torch.randn(1, 3, 4, 4, 4)], label)
        metrics.iteration(None)  # type: ignore[arg-type]
        parts = loss_fn.last_parts
        assert parts is not None
        seen.append(parts.as_metrics("train.loss"))
    out = metrics.compute(None)  # type: ignore[arg-type]
    for key in seen[0]:
        assert out[key] == pytest.approx(sum(s[key] for s in seen) / 5, rel=1e-6), key
    assert out["train.loss.alpha"] == pytest.approx(loss_fn.alpha)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_an_fp16_overflow_is_skipped_on_the_device(optimizer: str) -> None:
    """With the fused optimisers the GradScaler's step hands the overflow flag to the optimiser's kernel instead
    of reading it on the host (what fp16 training on a GPU without bf16 runs every step)."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3)
    opt = build_optimizer(load("tiny", [f"train.optimizer={optimizer}"]), net)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in net.parameters()]
    scaler.scale(net(torch.randn(1, 1, 6, 6, 6)).square().mean()).backward()
    assert net.weight.grad is not None
    net.weight.grad[0, 0, 0, 0, 0] = float("inf")  # an overflow in fp16
    scaler.unscale_(opt)  # as the step does, before clipping
    with HostReads() as mode:
        scaler.step(opt)
        scaler.update()
    assert mode.ops == []
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))  # skipped
    assert scaler.get_scale() == 512.0  # backed off
    opt.zero_grad()
    scaler.scale(net(torch.randn(1, 1, 6, 6, 6)).square().mean()).backward()
    scaler.step(opt)  # a finite step moves the weights
    assert not torch.equal(before[0], net.weight)


def test_a_checkpoint_from_an_unfused_optimiser_resumes_fused() -> None:
    """Optimiser state saved before the optimisers were fused: the resumed optimiser stays fused (torch's loop
    would refuse the GradScaler's overflow flag) and takes the saved momentum and hyperparameters."""
    from medsup.engine.steps import load_optimizer_state

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3)
    old = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, nesterov=True)  # as build_optimizer was
    net(torch.randn(1, 1, 6, 6, 6)).square().mean().backward()
    old.step()
    new = build_optimizer(load("tiny", ["train.optimizer=sgd"]), net)
    load_optimizer_state(new, old.state_dict())
    assert new.param_groups[0]["fused"] is True and new.param_groups[0]["lr"] == 0.5
    assert torch.equal(new.state[net.weight]["momentum_buffer"], old.state[net.weight]["momentum_buffer"])
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(net(torch.randn(1, 1, 6, 6, 6)).square().mean()).backward()
    scaler.unscale_(new)
    scaler.step(new)  # torch's loop would assert here: it takes no found_inf
