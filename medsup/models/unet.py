"""The deep-supervised 3D U-Net: MONAI blocks, a 1x1x1 segmentation head on every decoder scale.

Shape contract (spatial axes are the plan's ``(i, j, k)`` patch axes, ``C`` = ``num_classes``)::

    x:                   (B, in_channels, D, H, W)   D, H, W divisible by the stride product per axis
    train()  forward(x)  -> [ (B, C, D, H, W),                        head 0, full resolution
                              (B, C, D/s1_i, H/s1_j, W/s1_k),          head 1
                              ...,                                     head S-2, one above the bottleneck ]
    eval()   forward(x)  -> (B, C, D, H, W)                           head 0 only
    eval()   forward(x, exit_level=k) -> (B, C, D, H, W)              head k, trilinear-upsampled to x
    all_heads(x)         -> the train() list, in whichever mode the model is (figures, diagnostics)

With ``S`` encoder stages (stage 0 at full resolution, stage ``S-1`` the bottleneck) there are ``S-1`` decoder
stages; decoder stage ``d`` turns level ``d+1`` features into level-``d`` features (the resolution of encoder
stage ``d``) and head ``d`` reads them. Head ``d`` is downsampled by ``prod(strides[:d+1])`` per axis. Logits
stay at their native resolution in training (nnU-Net: targets are downsampled, logits never upsampled).
Unlike MONAI's ``DynUNet`` the lowest decoder level is supervised too (Deeply-Supervised Nets: a companion
classifier on every hidden scale).

Early exit (``exit_level=k``) runs the encoder and only the decoder stages ``S-2 .. k``, so a coarse preview
costs a fraction of full inference ("anytime" prediction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetResBlock, UnetUpBlock
from torch import Tensor, nn
from torch.nn.functional import group_norm, interpolate

from medsup.config import Config
from medsup.data.planning import Plan
from medsup.models.topology import Topology

Triple = tuple[int, int, int]

#: config names -> MONAI layer specs (nnU-Net's choices: affine instance norm, leaky ReLU 0.01)
_ACTS: dict[str, tuple[str, dict[str, Any]]] = {
    "leakyrelu": ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
    "relu": ("relu", {"inplace": True}),
    "prelu": ("prelu", {"num_parameters": 1}),
    "gelu": ("gelu", {}),
}


def norm_spec(norm: str, filters: Sequence[int]) -> tuple[str, dict[str, Any]]:
    """MONAI norm spec for a config name.

    ``group`` uses ``gcd(8, *filters)`` groups: the count must divide every stage's channels, and 8 keeps at
    least 4 channels per group at nnU-Net's 32 base filters (32 groups there would be instance norm).
    """
    if norm == "instance":
        return ("INSTANCE", {"affine": True})
    if norm == "batch":
        return ("BATCH", {})
    if norm == "group":
        return ("GROUP", {"num_groups": math.gcd(8, *filters)})
    raise ValueError(f"unknown norm {norm!r}; expected instance, batch or group")


def act_spec(act: str) -> tuple[str, dict[str, Any]]:
    """MONAI activation spec for a config name."""
    try:
        name, args = _ACTS[act]
    except KeyError:
        raise ValueError(f"unknown act {act!r}; expected one of {', '.join(_ACTS)}") from None
    return (name, dict(args))


def check_topology(topology: Topology) -> None:
    """Raise a ValueError naming the stage and the problem when ``topology`` cannot build a U-Net."""
    n_k, n_s, n_f = len(topology.kernels), len(topology.strides), len(topology.filters)
    if not (n_k == n_s == n_f):
        raise ValueError(f"topology lists differ in length: {n_k} kernels, {n_s} strides, {n_f} filters")
    if n_s < 2:
        raise ValueError(f"a U-Net needs at least 2 stages (one decoder scale), got {n_s}")
    for stage, (kernel, stride, filters) in enumerate(
        zip(topology.kernels, topology.strides, topology.filters, strict=True)
    ):
        if len(kernel) != 3 or len(stride) != 3:
            raise ValueError(f"stage {stage}: kernel {list(kernel)} and stride {list(stride)} need 3 entries")
        if any(k < 1 or k % 2 == 0 for k in kernel):
            # even kernels would change the feature-map size and break the skip connections
            raise ValueError(f"stage {stage}: kernel {list(kernel)} must be odd and positive")
        if any(s < 1 for s in stride):
            raise ValueError(f"stage {stage}: stride {list(stride)} must be positive")
        if any(k < s - 1 for k, s in zip(kernel, stride, strict=True)):
            raise ValueError(f"stage {stage}: kernel {list(kernel)} is too small for stride {list(stride)} "
                             f"(needs kernel >= stride - 1 for 'same' padding)")
        if filters < 1:
            raise ValueError(f"stage {stage}: filters must be positive, got {filters}")
    if tuple(topology.strides[0]) != (1, 1, 1):
        raise ValueError(f"stage 0 must not downsample, got stride {list(topology.strides[0])}")


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` that runs as ``group_norm`` with one group per channel on a CPU.

    The two are the same function of a batched ``(B, C, D, H, W)`` input when no running statistics are
    tracked: per sample and channel, ``(x - mean) / sqrt(var + eps) * weight[c] + bias[c]`` with the biased
    variance. On a CPU ``instance_norm`` reshapes to ``(1, B*C, ...)``, runs batch norm and returns a *view*;
    the in-place leaky ReLU after it then makes autograd copy the whole tensor back (``CopySlices``), and the
    batch-norm kernel is slower than ``group_norm``'s on these shapes (``group_norm`` 2.2-5x faster forward
    and backward on the quick preset's feature maps: ``bench/norm_kernel.py``). CUDA keeps ``instance_norm``
    (cuDNN; under autocast ``group_norm`` would run in float32), as do unbatched inputs and running
    statistics. Same parameters and state-dict keys as ``nn.InstanceNorm3d``, so checkpoints load either way.
    """

    def forward(self, input: Tensor) -> Tensor:
        """``(B, C, D, H, W)`` -> normalised ``(B, C, D, H, W)``; other ranks as ``nn.InstanceNorm3d``."""
        if input.device.type == "cpu" and input.ndim == 5 and not self.track_running_stats:
            return group_norm(input, self.num_features, self.weight, self.bias, self.eps)
        return super().forward(input)


def _fast_instance_norms(module: nn.Module) -> None:
    """Swap every plain ``nn.InstanceNorm3d`` under ``module`` (MONAI's ``INSTANCE`` norm) for
    :class:`InstanceNorm3d`, keeping its settings and parameters."""
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.InstanceNorm3d:
                fast = InstanceNorm3d(child.num_features, eps=child.eps, affine=child.affine,
                                      track_running_stats=child.track_running_stats)
                fast.momentum = child.momentum
                fast.load_state_dict(child.state_dict())
                setattr(parent, name, fast)


class DeepSupervisedUNet(nn.Module):
    """3D U-Net with a segmentation head on every decoder scale (see the module docstring for shapes).

    Args:
        in_channels: image channels (1 for CT).
        num_classes: output channels, background included.
        topology: kernels, strides and filters of the ``S`` encoder stages; ``strides[0]`` is ``(1, 1, 1)``.
        residual: ``UnetResBlock`` encoder stages instead of ``UnetBasicBlock``.
        norm: ``instance`` | ``batch`` | ``group``.
        act: ``leakyrelu`` | ``relu`` | ``prelu`` | ``gelu``.
        dropout: dropout probability inside the convolution blocks (0 disables).
        trans_bias: bias in the decoder's transposed convolutions.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        topology: Topology,
        *,
        residual: bool = False,
        norm: str = "instance",
        act: str = "leakyrelu",
        dropout: float = 0.0,
        trans_bias: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        check_topology(topology)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.topology = topology
        # a plain tuple, computed once: forward's input check reads it, and torch.compile cannot trace the
        # generator expressions of Topology.divisor (it fell back to eager for the whole forward)
        self._divisor: Triple = topology.divisor
        kernels, strides, filters = topology.kernels, topology.strides, topology.filters
        norm_name, act_name = norm_spec(norm, filters), act_spec(act)
        drop = dropout or None  # MONAI would insert a no-op Dropout(p=0) layer for 0.0
        block = UnetResBlock if residual else UnetBasicBlock

        # encoder[s]: level s-1 -> level s (stage 0 keeps full resolution; S-1 is the bottleneck)
        self.encoder = nn.ModuleList(
            block(3, c_in, c_out, kernel_size=k, stride=s, norm_name=norm_name, act_name=act_name,
                  dropout=drop)
            for c_in, c_out, k, s in zip((in_channels, *filters[:-1]), filters, kernels, strides, strict=True)
        )
        # decoder[d]: level d+1 -> level d. Transposed conv with kernel = stride undoes encoder stage d+1's
        # downsampling exactly; the convolutions use stage d's kernel (nnU-Net's choice: the kernel that
        # matches level d's spacing; MONAI's DynUNet uses stage d+1's).
        self.decoder = nn.ModuleList(
            UnetUpBlock(3, filters[d + 1], filters[d], kernel_size=kernels[d], stride=1,
                        upsample_kernel_size=strides[d + 1], norm_name=norm_name, act_name=act_name,
                        dropout=drop, trans_bias=trans_bias)
            for d in range(len(filters) - 1)
        )
        # heads[d]: 1x1x1 logits on decoder level d
        self.heads = nn.ModuleList(UnetOutBlock(3, filters[d], num_classes) for d in range(len(filters) - 1))
        _fast_instance_norms(self)
        self.apply(_init_weights)

    @property
    def num_heads(self) -> int:
        """Segmentation heads, one per decoder scale (``S - 1``)."""
        return len(self.heads)

    @property
    def divisor(self) -> Triple:
        """Input sizes must be divisible by this per axis (the stride product)."""
        return self._divisor

    def named_stages(self) -> dict[str, nn.Module]:
        """The network's stages by stable name: ``encoder0`` (full resolution) .. ``encoder{S-1}`` (bottleneck),
        ``decoder0`` (finest) .. ``decoder{S-2}``, ``head0`` .. ``head{S-2}``; together they hold every parameter.

        These names key the per-stage gradient norms ``train.grad_norm.<name>``.
        """
        stages: dict[str, nn.Module] = {}
        for prefix, modules in (("encoder", self.encoder), ("decoder", self.decoder), ("head", self.heads)):
            stages.update({f"{prefix}{i}": m for i, m in enumerate(modules)})
        return stages

    def head_scales(self) -> list[Triple]:
        """Per-axis downsampling factor of each head relative to the input, head 0 (= ``(1, 1, 1)``) first."""
        scales, current = [], (1, 1, 1)
        for stride in self.topology.strides[: self.num_heads]:
            current = (current[0] * stride[0], current[1] * stride[1], current[2] * stride[2])
            scales.append(current)
        return scales

    def head_shapes(self, spatial: Sequence[int]) -> list[tuple[int, int, int, int]]:
        """Per-sample logits shape ``(C, d, h, w)`` of each head (train mode) for input size ``spatial``."""
        self._check_spatial(tuple(spatial))
        return [(self.num_classes, spatial[0] // f[0], spatial[1] // f[1], spatial[2] // f[2])
                for f in self.head_scales()]

    def feature_shapes(self, spatial: Sequence[int]) -> list[tuple[int, int, int, int]]:
        """Per-sample feature shape ``(channels, d, h, w)`` of each encoder stage for input ``spatial``."""
        self._check_spatial(tuple(spatial))
        sizes = self.topology.scales((spatial[0], spatial[1], spatial[2]))
        return [(f, *size) for f, size in zip(self.topology.filters, sizes, strict=True)]

    def forward(self, x: Tensor, exit_level: int | None = None) -> Tensor | list[Tensor]:
        """Segment ``x`` of shape ``(B, in_channels, D, H, W)``.

        Returns:
            train mode: a list of ``num_heads`` logits, full resolution first, each at its native resolution.
            eval mode: ``(B, C, D, H, W)`` logits of head 0, or of head ``exit_level`` upsampled to ``x``.
        """
        self._check_input(x)
        if exit_level is not None:
            if self.training:
                raise ValueError("exit_level is an inference option: call model.eval() first")
            if not 0 <= exit_level < self.num_heads:
                raise ValueError(f"exit_level must be in 0..{self.num_heads - 1} (one per decoder scale, "
                                 f"0 = full resolution), got {exit_level}")
        stop = 0 if exit_level is None else exit_level
        if self.training:
            return self._decode(x, stop, every_head=True)
        out = self._decode(x, stop, every_head=False)[0]
        if out.shape[2:] != x.shape[2:]:
            out = interpolate(out, size=x.shape[2:], mode="trilinear", align_corners=False)
        return out

    def all_heads(self, x: Tensor) -> list[Tensor]:
        """Every head's logits at its native resolution, full resolution first, in the current mode.

        What ``train()``-mode ``forward`` returns, without switching modes: call it under ``eval()`` (and
        ``torch.no_grad()``) to look at every decoder scale with inference behaviour (no dropout; BatchNorm
        running statistics; instance and group norm behave the same in both modes).

        Returns:
            ``num_heads`` tensors ``(B, C, D/f_i, H/f_j, W/f_k)`` with ``f`` from :meth:`head_scales`.
        """
        self._check_input(x)
        return self._decode(x, 0, every_head=True)

    def _decode(self, x: Tensor, stop: int, every_head: bool) -> list[Tensor]:
        """Encoder, then decoder stages ``S-2 .. stop``; logits of every head run (finest first) or of ``stop``."""
        skips: list[Tensor] = []
        h = x
        for stage in self.encoder:
            h = stage(h)
            skips.append(h)
        # walk up from the bottleneck; stop at the level asked for so finer stages never run
        logits: list[Tensor] = []
        for d in range(self.num_heads - 1, stop - 1, -1):
            h = self.decoder[d](h, skips[d])
            if every_head:
                logits.append(self.heads[d](h))
        return logits[::-1] if every_head else [self.heads[stop](h)]

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"expected a 5-D input (B, C, D, H, W), got shape {list(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channel(s), got {x.shape[1]} "
                             f"(input shape {list(x.shape)})")
        self._check_spatial(tuple(x.shape[2:]))

    def _check_spatial(self, spatial: tuple[int, ...]) -> None:
        if len(spatial) != 3:
            raise ValueError(f"expected 3 spatial sizes, got {list(spatial)}")
        for axis, (n, div) in enumerate(zip(spatial, self.divisor, strict=True)):
            if n < 1 or n % div:
                raise ValueError(f"spatial size {list(spatial)} is not divisible by the stride product "
                                 f"{list(self.divisor)} along axis {axis} ({n} % {div} = {n % div}); "
                                 f"use a multiple of {div}")


def _init_weights(module: nn.Module) -> None:
    """nnU-Net's ``InitWeights_He(1e-2)``: Kaiming normal for (transposed) convolutions, zero biases."""
    if isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_model(cfg: Config, plan: Plan) -> DeepSupervisedUNet:
    """The network for ``plan`` (topology, channels, classes) with ``cfg.model``'s layer choices."""
    m = cfg.model
    return DeepSupervisedUNet(
        plan.in_channels,
        plan.num_classes,
        plan.topology,
        residual=m.residual,
        norm=m.norm,
        act=m.act,
        dropout=m.dropout,
        trans_bias=m.trans_bias,
    )
