"""Deep-supervision losses: weights, DSN hinge and schedules, gradients per head, NaN guard, overfitting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from medsup.config import load
from medsup.losses import (
    DeepSupervisionLoss,
    build_loss,
    downsample_label,
    dsn_alpha,
    heads_may_go_unused,
    nnunet_weights,
)
from medsup.models.topology import Topology
from medsup.models.unet import DeepSupervisedUNet

SCHEMES = ["nnunet", "dsn", "uniform", "none"]
TOPOLOGY = Topology(((3, 3, 3),) * 4, ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)), (4, 8, 16, 32))


def phantom(n: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded ``(1, 1, n, n, n)`` image and label: a sphere "organ" (1) holding a smaller "lesion" (2)."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.arange(n, dtype=torch.float32)
    i, j, k = torch.meshgrid(axis, axis, axis, indexing="ij")
    c = n / 2 + torch.rand(3, generator=g) * 2 - 1
    organ = (i - c[0]) ** 2 + (j - c[1]) ** 2 + (k - c[2]) ** 2 < (n / 3) ** 2
    lesion = (i - c[0] - 3) ** 2 + (j - c[1]) ** 2 + (k - c[2] - 2) ** 2 < (n / 8) ** 2
    label = organ.long() + (lesion & organ).long()
    image = torch.where(organ, 1.0, -1.0) - 0.8 * lesion.float() + 0.3 * torch.randn(n, n, n, generator=g)
    return image[None, None], label[None, None]


def mean_loss(cfg_overrides: list[str]) -> DeepSupervisionLoss:
    """A deep-supervision loss whose per-head loss is the mean logit: head values are set by the test."""
    return DeepSupervisionLoss(load("tiny", cfg_overrides).loss, lambda logits, _label: logits.mean())


def heads_with_values(values: list[float], size: int = 8) -> list[Tensor]:
    """Constant logits ``(1, 2, s, s, s)`` per head, halving in size, whose mean is ``values[i]``."""
    return [torch.full((1, 2, *(size >> i,) * 3), v, requires_grad=True) for i, v in enumerate(values)]


def test_nnunet_weights_halve_and_normalise() -> None:
    w = nnunet_weights(5)
    assert sum(w) == pytest.approx(1.0)
    assert [w[i] / w[i + 1] for i in range(4)] == pytest.approx([2.0] * 4)
    zeroed = nnunet_weights(5, zero_coarsest=True)
    assert zeroed[-1] == 0.0
    assert sum(zeroed) == pytest.approx(1.0)
    assert zeroed[0] == pytest.approx(1 / (1 + 0.5 + 0.25 + 0.125))
    assert nnunet_weights(1, zero_coarsest=True) == [1.0]  # a lone head is never switched off


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [("nnunet", [4 / 7, 2 / 7, 1 / 7]), ("uniform", [1 / 3] * 3), ("none", [1.0, 0.0, 0.0]), ("dsn", [1.0] * 3)],
)
def test_scheme_weights(scheme: str, expected: list[float]) -> None:
    loss = build_loss(load("tiny", [f"loss.scheme={scheme}"]))
    assert loss.weights(3) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("schedule", "epochs", "expected"),
    [
        ("constant", [0, 50, 500], [2.0, 2.0, 2.0]),
        ("linear", [0, 5, 10, 20], [2.0, 1.0, 0.0, 0.0]),
        ("exponential", [0, 1, 3], [2.0, 1.0, 0.25]),
        ("switch", [0, 9, 10, 11], [2.0, 2.0, 0.0, 0.0]),
    ],
)
def test_dsn_alpha_schedules(schedule: str, epochs: list[int], expected: list[float]) -> None:
    cfg = load("tiny", ["loss.scheme=dsn", "loss.dsn_alpha=2.0", f"loss.dsn_schedule={schedule}",
                        "loss.dsn_end_epoch=10", "loss.dsn_decay=0.5"])
    assert [dsn_alpha(cfg.loss, e) for e in epochs] == pytest.approx(expected)
    loss = build_loss(cfg)
    loss.set_epoch(epochs[-1])
    assert loss.weights(3) == pytest.approx([1.0, expected[-1], expected[-1]])


def test_dsn_companions_fade_over_the_whole_training_by_default() -> None:
    """loss.dsn_end_epoch unset: alpha reaches 0 at train.epochs (the DSN paper's alpha0 * (1 - t/N))."""
    for epochs in (30, 200):
        cfg = load("tiny", ["loss.scheme=dsn", f"train.epochs={epochs}"])
        assert cfg.loss.dsn_end_epoch is None
        loss = build_loss(cfg)
        loss.set_epoch(epochs // 2)
        assert loss.weights(2) == pytest.approx([1.0, 0.5])
        loss.set_epoch(epochs - 1)
        assert loss.weights(2)[1] == pytest.approx(1 / epochs)
    with pytest.raises(ValueError, match="dsn_end_epoch is unset"):
        dsn_alpha(load("tiny", ["loss.scheme=dsn"]).loss, 3)


def test_absolute_hinge_switches_a_companion_off_below_gamma() -> None:
    loss = mean_loss(["loss.scheme=dsn", "loss.dsn_gamma=0.3", "loss.dsn_schedule=constant", "loss.dsn_alpha=0.5"])
    heads = heads_with_values([0.5, 0.2, 0.8])
    total = loss(heads, torch.zeros(1, 1, 8, 8, 8))
    assert total.item() == pytest.approx(0.5 + 0.5 * (0.8 - 0.3))
    total.backward()
    assert heads[0].grad is not None
    assert heads[1].grad is not None
    assert heads[2].grad is not None
    assert heads[0].grad.abs().sum() > 0
    assert heads[1].grad.abs().sum() == 0  # below gamma: the hinge is closed
    assert heads[2].grad.abs().sum() > 0
    parts = loss.last_parts
    assert parts is not None
    assert parts.active == (True, False, True)
    assert parts.raw == pytest.approx((0.5, 0.2, 0.8))
    assert parts.weights == pytest.approx((1.0, 0.5, 0.5))
    assert parts.gammas == pytest.approx((0.0, 0.3, 0.3))
    metrics = parts.as_metrics()
    assert metrics["loss.active1"] == 0.0
    assert metrics["loss.alpha"] == 0.5
    assert metrics["loss.total"] == pytest.approx(0.75)


def test_relative_hinge_follows_the_running_mean() -> None:
    loss = mean_loss(["loss.scheme=dsn", "loss.dsn_gamma=0.9", "loss.dsn_gamma_mode=relative",
                      "loss.dsn_gamma_momentum=0.5", "loss.dsn_schedule=constant"])
    label = torch.zeros(1, 1, 8, 8, 8)
    loss(heads_with_values([1.0, 1.0, 1.0]), label)  # first batch: running mean = these values
    assert loss.last_parts is not None
    assert loss.last_parts.active == (True, True, True)  # 1.0 > 0.9 * 1.0
    loss(heads_with_values([1.0, 0.5, 2.0]), label)  # thresholds from the past: 0.9 * 1.0
    parts = loss.last_parts
    assert parts is not None
    assert parts.gammas[1:] == pytest.approx((0.9, 0.9))
    assert parts.active == (True, False, True)
    # validation (no grad) must not move the running mean: the next thresholds are 0.9 * (0.75, 1.5)
    with torch.no_grad():
        loss(heads_with_values([9.0, 9.0, 9.0]), label)
    loss(heads_with_values([1.0, 0.7, 1.0]), label)
    parts = loss.last_parts
    assert parts is not None
    assert parts.gammas[1:] == pytest.approx((0.9 * 0.75, 0.9 * 1.5))
    assert parts.active == (True, True, False)
    # the running mean is the module's state: a fresh loss given it sets the same thresholds (a resume)
    running = loss.state_dict()["_extra_state"]
    assert running.tolist() == pytest.approx([1.0, 0.725, 1.25])
    restored = mean_loss(["loss.scheme=dsn", "loss.dsn_gamma=0.9", "loss.dsn_gamma_mode=relative",
                          "loss.dsn_gamma_momentum=0.5", "loss.dsn_schedule=constant"])
    restored.load_state_dict(loss.state_dict())
    restored(heads_with_values([1.0, 1.0, 1.0]), label)
    assert restored.last_parts is not None
    assert restored.last_parts.gammas[1:] == pytest.approx((0.9 * 0.725, 0.9 * 1.25))


def test_single_tensor_is_one_head_and_label_is_checked() -> None:
    loss = build_loss(load("tiny", ["loss.scheme=nnunet", "loss.nnunet_zero_coarsest=true"]))
    _, label = phantom(8)
    logits = torch.randn(1, 3, 8, 8, 8)
    value = loss(logits, label)
    parts = loss.last_parts
    assert parts is not None
    assert parts.weights == (1.0,)
    assert value.item() == pytest.approx(parts.raw[0])
    with pytest.raises(ValueError, match=r"label must be \(B, 1, D, H, W\)"):
        loss(logits, label[:, 0])
    with pytest.raises(ValueError, match=r"head 0 logits .* do not match the label"):
        loss(torch.randn(1, 3, 4, 8, 8), label)
    with pytest.raises(ValueError, match="head 1 logits"):
        loss([logits, torch.randn(1, 2, 4, 4, 4)], label)


def test_labels_are_downsampled_nearest_exact() -> None:
    _, label = phantom(16)
    small = downsample_label(label, (4, 4, 4))
    assert small.shape == (1, 1, 4, 4, 4)
    assert set(small.unique().tolist()) <= {0.0, 1.0, 2.0}
    # nearest-exact picks the voxel at the centre of each 4^3 block: index 4*i + 2 (floor((i + 0.5) * 4))
    torch.testing.assert_close(small, label[:, :, 2::4, 2::4, 2::4].float())
    assert downsample_label(label, (16, 16, 16)) is label


def test_max_downsampling_keeps_a_one_voxel_lesion_at_every_scale() -> None:
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    label[0, 0, 4:12, 4:12, 4:12] = 1  # an organ
    label[0, 0, 5, 6, 9] = 2           # a one-voxel lesion inside it, off every 4^3 block centre
    nearest = downsample_label(label, (4, 4, 4))
    assert 2.0 not in nearest.unique().tolist()  # nnU-Net's targets: the coarse head never sees the lesion
    coarse = downsample_label(label, (4, 4, 4), "max")
    assert coarse.shape == (1, 1, 4, 4, 4)
    assert coarse[0, 0, 1, 1, 2] == 2 and int((coarse == 2).sum()) == 1  # the block holding it, nothing else
    assert int((coarse >= 1).sum()) == 8  # the organ's 2^3 blocks, a coarse voxel per block it touches
    assert downsample_label(label, (16, 16, 16), "max") is label
    with pytest.raises(ValueError, match="'mean'"):
        downsample_label(label, (4, 4, 4), "mean")


def test_the_configured_downsampling_reaches_the_coarse_heads() -> None:
    label = torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
    label[:, 0, 5, 6, 9] = 1
    logits = [torch.zeros(2, 2, 16, 16, 16), torch.zeros(2, 2, 4, 4, 4)]
    logits[1][:, 0] = 8.0  # the coarse head calls everything background but the block holding the lesion
    logits[1][:, 0, 1, 1, 2], logits[1][:, 1, 1, 1, 2] = 0.0, 8.0
    losses = {}
    for mode in ("nearest", "max"):
        loss = build_loss(load("tiny", overrides=["loss.scheme=uniform", f"loss.ds_label_downsample={mode}"]))
        loss(logits, label)
        assert loss.last_parts is not None
        losses[mode] = loss.last_parts.raw[1]
    # nearest: the lesion is not in the target and the head is punished for finding it; max: it is right
    assert losses["nearest"] > 0.9 and losses["max"] < 0.05


def _heads(nan_head: int | None = None) -> list[torch.Tensor]:
    heads = [torch.randn(1, 3, 16, 16, 16), torch.randn(1, 3, 8, 8, 8), torch.randn(1, 3, 4, 4, 4)]
    if nan_head is not None:
        heads[nan_head][0, 1, 0, 0, 0] = float("nan")
    return heads


def test_a_nan_head_raises_naming_the_head_and_its_scale() -> None:
    loss = build_loss(load("tiny", ["train.sync_every=1"]))
    _, label = phantom(16)
    with pytest.raises(FloatingPointError, match=r"head 2 \(scale \[4, 4, 4\].*call 1 of the loss"):
        loss(_heads(2), label)


def test_the_finite_check_waits_for_every_nth_call_and_names_the_first_bad_one() -> None:
    loss = build_loss(load("tiny", ["train.sync_every=4"]))
    assert loss.check_every == 4
    _, label = phantom(16)
    loss(_heads(), label)
    loss(_heads(1), label)  # the first bad call: remembered on the device, not read yet
    loss(_heads(2), label)  # a later bad call does not replace it
    with pytest.raises(FloatingPointError, match=r"head 1 \(scale \[2, 2, 2\].*heads: \[1\]; call 2 of"):
        loss(_heads(), label)  # the 4th call checks
    with pytest.raises(FloatingPointError, match="call 2 of"):
        loss.check_finite()  # what was found stays found
    clean = build_loss(load("tiny", ["train.sync_every=2"]))
    for _ in range(5):
        clean(_heads(), label)
    clean.check_finite()  # all finite: nothing to raise
    late = build_loss(load("tiny", ["train.sync_every=100"]))
    late(_heads(0), label)
    with pytest.raises(FloatingPointError, match=r"head 0 \(scale \[1, 1, 1\]"):
        late.check_finite()  # the trainer's check at each epoch's end


def _head_grads(scheme: str, overrides: list[str] | None = None) -> list[float]:
    """Gradient magnitude reaching each head's parameters after one step (-1 when the grad is None)."""
    torch.manual_seed(0)
    model = DeepSupervisedUNet(1, 3, TOPOLOGY)
    loss = build_loss(load("tiny", [f"loss.scheme={scheme}", *(overrides or [])]))
    image, label = phantom(16)
    loss(model(image), label).backward()
    sizes = []
    for head in model.heads:
        grads = [p.grad for p in head.parameters()]
        if any(g is None for g in grads):
            sizes.append(-1.0)
        else:
            sizes.append(sum(float(g.abs().sum()) for g in grads if g is not None))
    return sizes


@pytest.mark.parametrize("scheme", ["nnunet", "dsn", "uniform"])
def test_gradients_reach_every_head(scheme: str) -> None:
    assert all(g > 0 for g in _head_grads(scheme)), scheme


def test_none_and_switched_off_companions_get_no_gradient() -> None:
    grads = _head_grads("none")
    assert grads[0] > 0
    assert grads[1:] == [-1.0, -1.0]
    grads = _head_grads("nnunet", ["loss.nnunet_zero_coarsest=true"])
    assert grads[0] > 0
    assert grads[1] > 0
    assert grads[2] == -1.0
    # epoch 0 of the test calls set_epoch(0): a switch schedule ending at epoch 0 has its companions off
    grads = _head_grads("dsn", ["loss.dsn_schedule=switch", "loss.dsn_end_epoch=0"])
    assert grads[0] > 0
    assert grads[1:] == [-1.0, -1.0]


@pytest.mark.parametrize(
    ("overrides", "unused"),
    [
        (["loss.scheme=none"], True),
        (["loss.scheme=uniform"], False),
        (["loss.scheme=nnunet"], False),
        (["loss.scheme=nnunet", "loss.nnunet_zero_coarsest=true"], True),
        (["loss.scheme=dsn", "loss.dsn_schedule=linear"], True),
        (["loss.scheme=dsn", "loss.dsn_schedule=switch"], True),
        (["loss.scheme=dsn", "loss.dsn_schedule=exponential"], False),
        (["loss.scheme=dsn", "loss.dsn_schedule=constant", "loss.dsn_alpha=0"], True),
    ],
)
def test_heads_may_go_unused_tells_ddp_when_to_look_for_unused_parameters(
    overrides: list[str], unused: bool
) -> None:
    assert heads_may_go_unused(load("tiny", overrides).loss) is unused


@pytest.mark.parametrize("scheme", SCHEMES)
def test_overfits_one_synthetic_case(scheme: str) -> None:
    torch.manual_seed(0)
    image, label = phantom(32)
    model = DeepSupervisedUNet(1, 3, TOPOLOGY)
    loss = build_loss(load("tiny", [f"loss.scheme={scheme}", "loss.dsn_schedule=constant"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(20):
        optimizer.zero_grad()
        total = loss(model(image), label)
        total.backward()
        optimizer.step()
        parts = loss.last_parts
        assert parts is not None
        history.append((parts.total, parts.raw[0]))
    (first_total, first_out), (last_total, last_out) = history[0], history[-1]
    assert last_total < 0.8 * first_total, history
    assert last_out < 0.8 * first_out, history  # the full-resolution output improves under every scheme


def _ddp_check_worker(rank: int, world: int, store: str, out: str) -> None:
    """One of two gloo ranks: rank 1's 2nd call has a NaN head; both check at their 3rd call."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        loss = build_loss(load("tiny", ["train.sync_every=3"]))
        _, label = phantom(16)
        message = "no error"
        try:
            for call in range(1, 4):
                loss(_heads(2 if rank == 1 and call == 2 else None), label)
        except FloatingPointError as err:
            message = str(err)
        Path(out, f"rank{rank}.txt").write_text(message, encoding="utf-8")
    finally:
        dist.destroy_process_group()


def test_under_ddp_every_rank_raises_when_one_rank_went_non_finite(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank that stopped alone would leave the others waiting in the next gradient all-reduce."""
    import torch.multiprocessing as mp

    import medsup

    # spawned children take this sys.path: this checkout first (a test that loaded an MLflow pyfunc model in this
    # worker put the model's copy of medsup, without configs/, on the path)
    monkeypatch.syspath_prepend(str(Path(medsup.__file__).resolve().parents[1]))
    mp.spawn(_ddp_check_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    assert "loss of head 2 (scale [4, 4, 4]" in (tmp_path / "rank1.txt").read_text(encoding="utf-8")
    assert "another DDP rank" in (tmp_path / "rank0.txt").read_text(encoding="utf-8")
