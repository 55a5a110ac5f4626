"""The deep-supervised U-Net: shape contract, early exit, argument checks, and the `medsup model` summary."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from medsup.cli import app
from medsup.config import load
from medsup.data.planning import default_plan
from medsup.models.summary import describe, render
from medsup.models.topology import Topology
from medsup.models.unet import DeepSupervisedUNet, InstanceNorm3d, build_model

Triple = tuple[int, int, int]


def make_topology(strides: list[Triple], kernels: list[Triple] | None = None, base: int = 4) -> Topology:
    kernels = kernels or [(3, 3, 3)] * len(strides)
    filters = tuple(min(base * 2**i, 64) for i in range(len(strides)))
    return Topology(tuple(kernels), tuple(strides), filters)


# (strides, kernels, patch): every topology keeps a bottleneck of 2 voxels per axis (instance norm needs > 1)
TOPOLOGIES: dict[str, tuple[list[Triple], list[Triple] | None, Triple]] = {
    "iso4": ([(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)], None, (16, 16, 16)),
    "aniso5": (
        [(1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 1), (2, 2, 2)],
        [(3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)],
        (32, 32, 8),
    ),
    "mixed6": ([(1, 1, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 1), (2, 2, 2)], None, (32, 32, 16)),
}


def expected_head_sizes(strides: list[Triple], patch: Triple) -> list[Triple]:
    """Spatial size of head d: the patch divided by the stride product of stages 0..d (computed here, not
    by the model, so the test is independent of the implementation)."""
    sizes = []
    for d in range(len(strides) - 1):
        factor = [math.prod(s[a] for s in strides[: d + 1]) for a in range(3)]
        sizes.append((patch[0] // factor[0], patch[1] // factor[1], patch[2] // factor[2]))
    return sizes


@pytest.fixture(params=sorted(TOPOLOGIES))
def case(request: pytest.FixtureRequest) -> tuple[DeepSupervisedUNet, list[Triple], Triple]:
    torch.manual_seed(0)
    strides, kernels, patch = TOPOLOGIES[request.param]
    return DeepSupervisedUNet(1, 3, make_topology(strides, kernels)), strides, patch


def test_train_mode_returns_every_head_at_native_resolution(
    case: tuple[DeepSupervisedUNet, list[Triple], Triple],
) -> None:
    model, strides, patch = case
    model.train()
    out = model(torch.randn(2, 1, *patch))
    assert isinstance(out, list)
    assert model.num_heads == len(strides) - 1 == len(out)
    assert [tuple(o.shape) for o in out] == [(2, 3, *s) for s in expected_head_sizes(strides, patch)]
    assert [s[1:] for s in model.head_shapes(patch)] == expected_head_sizes(strides, patch)
    assert model.head_scales()[0] == (1, 1, 1)


def test_eval_mode_and_every_exit_level(case: tuple[DeepSupervisedUNet, list[Triple], Triple]) -> None:
    model, _, patch = case
    model.eval()
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        full = model(x)
        assert isinstance(full, torch.Tensor)
        assert full.shape == (1, 3, *patch)
        torch.testing.assert_close(model(x, exit_level=0), full)
        for level in range(model.num_heads):
            assert model(x, exit_level=level).shape == (1, 3, *patch)


def test_exit_level_is_the_head_upsampled() -> None:
    torch.manual_seed(0)
    strides, kernels, patch = TOPOLOGIES["aniso5"]
    model = DeepSupervisedUNet(1, 2, make_topology(strides, kernels))
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        heads = model.train()(x)
        model.eval()
        for level in range(model.num_heads):
            upsampled = nn.functional.interpolate(heads[level], size=patch, mode="trilinear")
            # instance norm behaves the same in train and eval (no running statistics), so the outputs agree
            torch.testing.assert_close(model(x, exit_level=level), upsampled)


def test_early_exit_skips_the_finer_decoder_stages() -> None:
    torch.manual_seed(0)
    strides, _, patch = TOPOLOGIES["iso4"]
    model = DeepSupervisedUNet(1, 3, make_topology(strides)).eval()
    calls: list[str] = []
    for name, module in [*model.decoder.named_children(), *(("head" + n, m) for n, m in model.heads.named_children())]:
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
    x = torch.randn(1, 1, *patch)
    flops = []
    for level in range(model.num_heads):
        calls.clear()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, exit_level=level)
        flops.append(counter.get_total_flops())
        # decoder stages num_heads-1 .. level ran (coarse to fine), then exactly one head
        assert calls == [str(d) for d in range(model.num_heads - 1, level - 1, -1)] + [f"head{level}"]
    assert flops[0] > flops[1] > flops[2], flops


def test_precise_value_errors() -> None:
    strides, _, patch = TOPOLOGIES["aniso5"]
    model = DeepSupervisedUNet(1, 3, make_topology(strides))
    with pytest.raises(ValueError, match=r"along axis 2 \(6 % 4 = 2\); use a multiple of 4"):
        model(torch.zeros(1, 1, 32, 32, 6))
    with pytest.raises(ValueError, match=r"along axis 0 \(24 % 16 = 8\); use a multiple of 16"):
        model(torch.zeros(1, 1, 24, 32, 8))
    with pytest.raises(ValueError, match="expected 1 input channel"):
        model(torch.zeros(1, 2, *patch))
    with pytest.raises(ValueError, match="5-D input"):
        model(torch.zeros(1, *patch))
    model.eval()
    with pytest.raises(ValueError, match=r"exit_level must be in 0\.\.3"):
        model(torch.zeros(1, 1, *patch), exit_level=4)
    with pytest.raises(ValueError, match=r"exit_level must be in 0\.\.3"):
        model(torch.zeros(1, 1, *patch), exit_level=-1)
    model.train()
    with pytest.raises(ValueError, match=r"call model\.eval\(\)"):
        model(torch.zeros(1, 1, *patch), exit_level=1)


@pytest.mark.parametrize(
    ("topology", "message"),
    [
        (Topology(((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2)), (4, 8, 16)), "3 kernels, 2 strides, 3 filters"),
        (Topology(((3, 3, 3),), ((1, 1, 1),), (4,)), "at least 2 stages"),
        (Topology(((3, 3, 3),) * 2, ((2, 2, 2), (2, 2, 2)), (4, 8)), "stage 0 must not downsample"),
        (Topology(((3, 2, 3),) * 2, ((1, 1, 1), (2, 2, 2)), (4, 8)), "stage 0: kernel .* must be odd"),
        (Topology(((3, 3, 3), (1, 1, 1)), ((1, 1, 1), (3, 3, 3)), (4, 8)), "stage 1: kernel .* too small"),
        (Topology(((3, 3, 3),) * 2, ((1, 1, 1), (2, 0, 2)), (4, 8)), "stage 1: stride .* must be positive"),
        (Topology(((3, 3, 3),) * 2, ((1, 1, 1), (2, 2, 2)), (4, 0)), "stage 1: filters must be positive"),
    ],
)
def test_bad_topologies_are_refused(topology: Topology, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeepSupervisedUNet(1, 3, topology)


def test_bad_layer_choices_are_refused() -> None:
    topology = make_topology(TOPOLOGIES["iso4"][0])
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        DeepSupervisedUNet(1, 3, topology, norm="layer")
    with pytest.raises(ValueError, match="unknown act 'tanh'"):
        DeepSupervisedUNet(1, 3, topology, act="tanh")
    with pytest.raises(ValueError, match="in_channels must be >= 1"):
        DeepSupervisedUNet(0, 3, topology)
    with pytest.raises(ValueError, match="dropout"):
        DeepSupervisedUNet(1, 3, topology, dropout=1.0)


@pytest.mark.parametrize(
    ("residual", "norm", "act", "dropout"),
    [(True, "instance", "leakyrelu", 0.0), (False, "batch", "relu", 0.1), (True, "group", "prelu", 0.0),
     (False, "instance", "gelu", 0.0)],
)
def test_layer_variants_build_and_run(residual: bool, norm: str, act: str, dropout: float) -> None:
    strides, _, patch = TOPOLOGIES["iso4"]
    model = DeepSupervisedUNet(1, 2, make_topology(strides, base=8), residual=residual, norm=norm, act=act,
                               dropout=dropout, trans_bias=True)
    out = model(torch.randn(2, 1, *patch))
    assert [o.shape[2:] for o in out] == [torch.Size(s) for s in expected_head_sizes(strides, patch)]
    transposed = [m for m in model.modules() if isinstance(m, nn.ConvTranspose3d)]
    assert all(m.bias is not None for m in transposed)


def test_channels_last_3d_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    strides, _, patch = TOPOLOGIES["iso4"]
    model = DeepSupervisedUNet(1, 3, make_topology(strides)).eval()
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        out = model(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("affine", [True, False])
def test_cpu_instance_norm_matches_torch_in_values_and_gradients(affine: bool) -> None:
    """The group-norm path must be nn.InstanceNorm3d exactly (values, input and parameter gradients), also
    under the in-place leaky ReLU that follows it in every block."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7, 4) * 3 + 1
    grad = torch.randn_like(x)
    results = []
    for cls in (nn.InstanceNorm3d, InstanceNorm3d):
        norm = cls(5, affine=affine)
        if affine:
            with torch.no_grad():
                norm.weight.copy_(torch.linspace(0.5, 2, 5))
                norm.bias.copy_(torch.linspace(-1, 1, 5))
        xi = x.clone().requires_grad_()
        out = nn.functional.leaky_relu(norm(xi), 0.01, inplace=True)
        out.backward(grad)
        results.append([out.detach(), xi.grad, *(p.grad for p in norm.parameters())])
    assert len(results[0]) == (4 if affine else 2)
    for ours, reference in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_instance_norms_are_the_fast_kind_with_torch_state_dict_keys() -> None:
    """Every instance norm of a built model takes the fast CPU path, and the state dict is the one a plain
    MONAI/torch instance norm has (checkpoints from before the swap load)."""
    model = DeepSupervisedUNet(1, 3, make_topology(TOPOLOGIES["iso4"][0]))
    norms = [m for m in model.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(type(m) is InstanceNorm3d and m.affine for m in norms)
    plain = DeepSupervisedUNet(1, 3, make_topology(TOPOLOGIES["iso4"][0]))
    for parent in plain.modules():  # undo the swap: what a model built before it looked like
        for name, child in list(parent.named_children()):
            if type(child) is InstanceNorm3d:
                setattr(parent, name, nn.InstanceNorm3d(child.num_features, affine=True))
    assert list(plain.state_dict()) == list(model.state_dict())
    model.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, *TOPOLOGIES["iso4"][2])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-4)


def test_nnunet_initialisation() -> None:
    torch.manual_seed(0)
    model = DeepSupervisedUNet(1, 3, make_topology(TOPOLOGIES["iso4"][0], base=8))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
    assert all(m.bias is None or not m.bias.any() for m in convs)
    # Kaiming normal with a=1e-2: std = sqrt(2 / (1 + a^2) / fan_in); check the widest encoder conv
    conv = next(m for m in model.encoder[3].modules() if isinstance(m, nn.Conv3d))
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (1 + 1e-4) / fan_in), rel=0.05)


@pytest.mark.parametrize("name", ["iso4", "aniso5"])
def test_describe_matches_a_real_forward(name: str) -> None:
    strides, kernels, patch = TOPOLOGIES[name]
    topology = make_topology(strides, kernels, base=8)
    cfg = load("tiny", ["model.residual=true"])
    plan = default_plan(cfg).model_copy(update={
        "patch_size": patch, "kernels": topology.kernels, "strides": topology.strides, "filters": topology.filters,
    })
    summary = describe(cfg, plan)
    model = build_model(cfg, plan)
    with torch.no_grad():
        out = model.train()(torch.zeros(1, 1, *patch))
    assert [h["shape"] for h in summary["heads"]] == [list(o.shape[1:]) for o in out]
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    assert summary["deep_supervision_heads"] == len(out) == len(strides) - 1
    assert summary["residual"] is True
    assert [s["feature_shape"][1:] for s in summary["stages"]][-1] == [2, 2, 2]
    text = render(summary)
    assert f"{len(out)} segmentation heads" in text
    assert "1x1x1" in text


def test_medsup_model_cli_lists_a_head_per_decoder_scale() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["model", "--task", "liver", "--json"])
    assert result.exit_code == 0, result.output
    liver = json.loads(result.stdout)
    assert liver["deep_supervision_heads"] == 5
    assert [h["scale"] for h in liver["heads"]] == [[s] * 3 for s in (1, 2, 4, 8, 16)]
    assert [h["shape"] for h in liver["heads"]] == [[3, n, n, n] for n in (128, 64, 32, 16, 8)]
    assert liver["params"] > 10_000_000
    lung = json.loads(runner.invoke(app, ["model", "--task", "lung", "--json"]).stdout)
    assert [h["shape"][1:] for h in lung["heads"]] == [
        [lung["patch_size"][a] // h["scale"][a] for a in range(3)] for h in lung["heads"]
    ]
    tiny = runner.invoke(app, ["model", "--task", "tiny"])
    assert tiny.exit_code == 0
    assert "3 segmentation heads" in tiny.stdout
    bad = runner.invoke(app, ["model", "--task", "tiny", "--set", "plan.patch_size=[30,32,32]"])
    assert bad.exit_code != 0


@pytest.mark.parametrize(("mode", "exit_level"), [("train", None), ("eval", None), ("eval", 1)])
def test_the_network_compiles_as_one_graph(mode: str, exit_level: int | None) -> None:
    """``train.compile``: dynamo must trace the whole forward (``fullgraph`` raises at a graph break). A
    generator expression in the input check once made it fall back to eager for the whole forward, so
    torch.compile changed nothing. The eager backend traces without generating code (well under a second)."""
    cfg = load("tiny", presets=["smoke"])
    plan = default_plan(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, plan).train(mode == "train")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(1, 1, *plan.patch_size)
    with torch.no_grad():
        out, ref = compiled(x, exit_level), model(x, exit_level)
    for a, b in zip(out if isinstance(out, list) else [out], ref if isinstance(ref, list) else [ref], strict=True):
        torch.testing.assert_close(a, b)
