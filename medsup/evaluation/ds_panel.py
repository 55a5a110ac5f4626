"""The deep-supervision panel: what every decoder head predicts, each at its own native scale.

One training patch (the plan's patch size) centred on the largest lesion goes through the network in eval
mode; :meth:`~medsup.models.unet.DeepSupervisedUNet.all_heads` returns every head's logits without
upsampling. One column per head shows the axial slice through the lesion: top, the head's argmax over the
CT; bottom, the target that head is trained against (the reference downsampled as the loss does it:
``loss.ds_label_downsample``, nearest-exact or max). Coarse heads show as coarse pixels: nothing is interpolated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import nibabel.orientations as nio
import numpy as np
import torch

from medsup.evaluation.figures import pyplot, save_figure
from medsup.evaluation.overlays import (
    ABDOMEN_WINDOW,
    class_colors,
    dice_by_class,
    draw_labels,
    focus_point,
    plane,
    plane_extent,
    show_ct,
)
from medsup.losses import downsample_label
from medsup.models.unet import DeepSupervisedUNet

Triple = tuple[int, int, int]


def crop_patch(image: np.ndarray, label: np.ndarray, patch: Sequence[int], centre: Sequence[int],
               pad_value: float) -> tuple[np.ndarray, np.ndarray, Triple]:
    """The ``patch``-sized crop of ``image`` and ``label`` (``(X, Y, Z)``) centred on ``centre``, shifted to stay
    inside the volume. Along an axis where the volume is smaller than the patch it sits in the middle of the
    patch, padded with ``pad_value`` (label 0). Returns the crops and the volume index of the crop's first
    voxel (negative where padded in front)."""
    img = np.full(tuple(patch), pad_value, dtype=np.float32)
    lab = np.zeros(tuple(patch), dtype=np.int64)
    start, src, dst = [], [], []
    for c, p, n in zip(centre, patch, image.shape, strict=True):
        s = max(0, min(int(c) - p // 2, n - p)) if n >= p else -((p - n) // 2)
        start.append(s)
        src.append(slice(max(s, 0), min(s + p, n)))
        dst.append(slice(max(-s, 0), max(-s, 0) + min(s + p, n) - max(s, 0)))
    img[tuple(dst)] = image[tuple(src)]
    lab[tuple(dst)] = label[tuple(src)]
    return img, lab, (start[0], start[1], start[2])


@torch.no_grad()
def head_predictions(model: DeepSupervisedUNet, patch: np.ndarray, device: torch.device) -> list[np.ndarray]:
    """Argmax class map of every head for one ``(X, Y, Z)`` patch, full resolution first, native sizes.

    Runs in eval mode (restoring the model's mode afterwards): dropout off, BatchNorm on running stats.
    """
    was_training = model.training
    model.eval()
    try:
        x = torch.as_tensor(patch, dtype=torch.float32, device=device)[None, None]
        return [logits.argmax(dim=1)[0].cpu().numpy() for logits in model.all_heads(x)]
    finally:
        model.train(was_training)


def head_targets(label: np.ndarray, shapes: Sequence[Sequence[int]], mode: str = "nearest") -> list[np.ndarray]:
    """The ``(X, Y, Z)`` reference downsampled to each head's shape as the loss does it (``mode``: see
    :func:`~medsup.losses.downsample_label`)."""
    lab = torch.as_tensor(label, dtype=torch.int64)[None, None]
    return [downsample_label(lab, s, mode)[0, 0].numpy().astype(np.int64) for s in shapes]


def _to_ras(orientation: str) -> np.ndarray:
    """nibabel orientation transform from ``orientation`` axes to RAS (row = source axis: [target, flip])."""
    return nio.ornt_transform(nio.axcodes2ornt(tuple(orientation)), nio.axcodes2ornt(("R", "A", "S")))


def deep_supervision_panel(model: DeepSupervisedUNet, image: np.ndarray, label: np.ndarray, path: Path, *,
                           spacing: Sequence[float], patch_size: Sequence[int], labels: dict[int, str],
                           to_hu: tuple[float, float] = (1.0, 0.0), pad_value: float = 0.0,
                           orientation: str = "RAS", lesion_classes: Sequence[int] = (),
                           organ_classes: Sequence[int] = (), window: tuple[float, float] = ABDOMEN_WINDOW,
                           device: torch.device | None = None, title: str | None = None,
                           target_mode: str = "nearest") -> Path:
    """Draw the panel for one case to ``path`` (one column per head; ``3.4 * heads + 0.6`` in wide, 7.6 in
    high at 100 dpi).

    Args:
        image: ``(X, Y, Z)`` network input (normalised) on the plan grid, axes in ``orientation``.
        label: ``(X, Y, Z)`` reference on the same grid (all zeros: the patch goes to the volume centre).
        spacing: mm per voxel along ``(X, Y, Z)``.
        patch_size: the network's patch (divisible by its stride product).
        to_hu: ``(std, mean)`` of the CT normalisation, to show the input in HU again.
        pad_value: normalised value of air, used where the patch leaves the volume.
        target_mode: how the loss downsampled the reference for the coarse heads (``loss.ds_label_downsample``).
    """
    plt = pyplot()
    device = device or next(model.parameters()).device
    point, why = focus_point(label, lesion_classes, organ_classes)
    patch_img, patch_lab, start = crop_patch(image, label, patch_size, point, pad_value)
    preds = head_predictions(model, patch_img, device)
    targets = head_targets(patch_lab, [p.shape for p in preds], target_mode)
    scales = model.head_scales()

    # everything to RAS for display; scales, spacing and the slice index follow the axis permutation and flips
    transform = _to_ras(orientation)
    src_of = {int(dst): src for src, (dst, _flip) in enumerate(transform)}
    ras = lambda a: np.ascontiguousarray(nio.apply_orientation(a, transform))  # noqa: E731
    ct = ras(patch_img * to_hu[0] + to_hu[1])
    sup = src_of[2]  # the source axis that runs inferior -> superior
    local = point[sup] - start[sup]
    k_full = patch_size[sup] - 1 - local if transform[sup][1] < 0 else local
    ras_spacing = [float(spacing[src_of[a]]) for a in range(3)]
    extent = plane_extent(ct.shape, ras_spacing, "axial")
    colors = class_colors(labels, lesion_classes, organ_classes)

    n = len(preds)
    fig, axes = plt.subplots(2, n, figsize=(3.4 * n + 0.6, 7.6), layout="constrained", squeeze=False)
    ct2d = plane(ct, "axial", k_full)
    for h, (pred, target, scale) in enumerate(zip(preds, targets, scales, strict=True)):
        pred_ras, target_ras = ras(pred), ras(target)
        f = [scale[src_of[a]] for a in range(3)]
        k = k_full // f[2]
        dice = dice_by_class(target, pred, labels)
        shown = ", ".join(f"{name} {v:.2f}" for name, v in dice.items() if not math.isnan(v)) or "n/a"
        size = "×".join(str(s) for s in pred_ras.shape)
        mm = "×".join(f"{ras_spacing[a] * f[a]:g}" for a in range(3))
        for r, labels2d in enumerate((plane(pred_ras, "axial", k), plane(target_ras, "axial", k))):
            ax = axes[r, h]
            image_artist = show_ct(ax, ct2d, extent, window)
            draw_labels(ax, labels2d, extent, colors, fill=True, contour=False, alpha=0.5)
            ax.set(xticks=[], yticks=[])
        axes[0, h].set_title(f"head {h}: {size} voxels\n{mm} mm/voxel (1/{'×'.join(map(str, f))})\n"
                             f"Dice vs target: {shown}", fontsize=9)
    axes[0, 0].set_ylabel("head prediction (argmax)", fontsize=10)
    shown_mode = "max" if target_mode == "max" else "nearest-exact"
    axes[1, 0].set_ylabel(f"head target\n(reference, {shown_mode})", fontsize=10)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colors[v], alpha=0.6, label=labels[v]) for v in colors]
    fig.legend(handles=handles, loc="outside lower center", ncol=max(1, len(handles)), fontsize=9)
    fig.colorbar(image_artist, ax=axes, shrink=0.6, pad=0.01, label=f"HU (W{window[0]:g}/L{window[1]:g})")
    fig.suptitle(title or f"deep supervision: every head at its native scale\naxial slice through the {why}",
                 fontsize=11)
    return save_figure(fig, path)
