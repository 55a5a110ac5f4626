"""Figures people would rather look at than tables (matplotlib Agg, PNG, written atomically).

Curves drawn from a run's per-epoch history (``history.json``, see :mod:`medsup.evaluation.history`):

- :func:`training_curves`: loss (total and per head), head weights / alpha(t), validation Dice per class,
  learning rate, gradient norms (total, first and bottleneck encoder stage), epoch time and throughput.
- :func:`grad_norm_curves`: the per-epoch mean gradient norm of every encoder stage, decoder stage and head
  (metrics ``train.grad_norm.<stage>``, see :meth:`medsup.models.unet.DeepSupervisedUNet.named_stages`).

Case figures live in :mod:`medsup.evaluation.overlays` (CT slices with reference and prediction) and
:mod:`medsup.evaluation.ds_panel` (every decoder head at its native scale).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsup.data.files import atomic_path

#: figure resolution; a figure of ``w x h`` inches is ``100 w x 100 h`` pixels
DPI = 100
#: file names under a run's ``figures/`` folder
FIGURES = {"curves": "training_curves.png", "grad_norms": "grad_norms.png", "overlays": "overlays.png",
           "deep_supervision": "deep_supervision.png"}
GRAD_NORM_PREFIX = "train.grad_norm."

log = logging.getLogger(__name__)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed; safe in threads-free batch jobs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically (``DPI``; the size is the figure's, no tight cropping) and close it."""
    plt = pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def _series(history: Sequence[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    pts = [(h["epoch"], h[key]) for h in history if key in h and h[key] is not None and not math.isnan(h[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _stage_index(key: str, kind: str) -> int | None:
    m = re.fullmatch(re.escape(GRAD_NORM_PREFIX + kind) + r"(\d+)", key)
    return int(m.group(1)) if m else None


def _stages(keys: Sequence[str], kind: str) -> list[tuple[int, str]]:
    """``[(index, key)]`` of ``train.grad_norm.<kind><index>`` keys, by index."""
    found = [(_stage_index(k, kind), k) for k in keys]
    return sorted((i, k) for i, k in found if i is not None)


def _legend(ax: Any, **kwargs: Any) -> None:
    if ax.lines:
        ax.legend(fontsize=7, **kwargs)


def _mark_points(ax: Any, epochs: Sequence[float]) -> None:
    """Dots on plain lines while there are few epochs (a one-epoch line is otherwise invisible)."""
    if len(epochs) <= 30:
        for line in ax.lines:
            if line.get_marker() in (None, "None", "", " "):
                line.set_marker("o")
                line.set_markersize(3)


def _epoch_axis(ax: Any, epochs: Sequence[float]) -> None:
    """Whole epochs on the x axis; log-scaled y ticks as plain numbers (0.2, not 2x10^-1)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _mark_points(ax, epochs)
    if len(set(epochs)) == 1:  # a single epoch: one tick, not a fractional axis around it
        ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        ax.set_xticks([epochs[0]])
    if ax.get_yscale() != "log":
        return

    def minor(value: float, _pos: int) -> str:
        low, high = ax.get_ylim()
        decades = math.log10(high / low) if low > 0 and high > low else math.inf
        mantissa = round(value / 10 ** math.floor(math.log10(value)))
        # few decades shown: label 2x and 5x between the powers of ten (and 3x when under one decade)
        shown = (2, 3, 5) if decades < 1 else (2, 5) if decades < 2.5 else ()
        return f"{value:.3g}" if mantissa in shown else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:.3g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def training_curves(history: Sequence[dict[str, float]], path: Path) -> Path:
    """Six panels against epoch, written to ``path`` (1500 x 800 px).

    Training loss (total, thick, and each head's raw loss, log scale); head weights and DSN alpha(t); validation
    Dice per class and mean; learning rate; gradient norms (total, first encoder stage, bottleneck); epoch
    time and samples/s. Missing metrics leave their panel empty with a note.
    """
    plt = pyplot()
    keys = sorted({k for h in history for k in h})
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)

    ax = axes[0, 0]
    for key in [k for k in keys if re.fullmatch(r"train\.loss\.head\d+", k)]:
        ax.plot(*_series(history, key), label=key.removeprefix("train.loss."), lw=1)
    if "train.loss.total" in keys:
        ax.plot(*_series(history, "train.loss.total"), label="total (weighted)", lw=2.5, color="black")
    ax.set(title="training loss (raw per head)", xlabel="epoch", ylabel="DiceCE loss", yscale="log")
    _legend(ax)

    ax = axes[0, 1]
    for key in [k for k in keys if k.startswith("train.loss.weight") or k == "train.loss.alpha"]:
        ax.plot(*_series(history, key), label=key.removeprefix("train.loss."),
                lw=2.5 if key.endswith("alpha") else 1, ls="--" if key.endswith("alpha") else "-")
    ax.set(title="head weights / alpha(t)", xlabel="epoch", ylabel="weight")
    _legend(ax)

    ax = axes[0, 2]
    for key in [k for k in keys if k == "val.dice" or k.startswith("val.dice.")]:
        mean, cls = key == "val.dice", key.removeprefix("val.dice.")
        line = ax.plot(*_series(history, key), marker="o", ms=3, lw=2.5 if mean else 1,
                       color="black" if mean else None, label="mean" if mean else cls)[0]
        if not mean and f"val.dice_global.{cls}" in keys:  # same class, same colour
            ax.plot(*_series(history, f"val.dice_global.{cls}"), ls="--", lw=1, color=line.get_color(),
                    label=f"{cls} (global)")
        if not mean and f"val.lesion_recall.{cls}" in keys:
            ax.plot(*_series(history, f"val.lesion_recall.{cls}"), ls=":", lw=1.5, color=line.get_color(),
                    label=f"{cls} (lesions found)")
    ax.set(title="validation Dice (per-case mean; dashed: global)\ndotted: lesion-wise recall", xlabel="epoch",
           ylabel="Dice / recall", ylim=(0, 1))
    _legend(ax, loc="lower right")

    ax = axes[1, 0]
    ax.plot(*_series(history, "train.lr"))
    ax.set(title="learning rate", xlabel="epoch", ylabel="lr")

    ax = axes[1, 1]
    encoders = _stages(keys, "encoder")
    shown = [(GRAD_NORM_PREFIX + "total", "total (pre-clip)", "black", 2.5)]
    if encoders:
        shown.append((encoders[0][1], f"encoder{encoders[0][0]} (first stage)", "tab:blue", 1.5))
        if len(encoders) > 1:
            shown.append((encoders[-1][1], f"encoder{encoders[-1][0]} (bottleneck)", "tab:orange", 1.5))
    for key, label, color, lw in shown:
        x, y = _series(history, key)
        if x:
            ax.plot(x, y, label=label, color=color, lw=lw)
    ax.set(title="gradient L2 norm (mean per epoch)", xlabel="epoch", ylabel="norm")
    if ax.lines:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not recorded\n(train.grad_norm_every: 0)", ha="center", va="center",
                transform=ax.transAxes, color="grey")

    ax = axes[1, 2]
    ax.plot(*_series(history, "train.epoch_seconds"), color="tab:blue", label="training s / epoch")
    ax.plot(*_series(history, "val.seconds"), color="tab:blue", ls="--", label="validation s")
    ax.set(title="speed", xlabel="epoch", ylabel="seconds")
    twin = ax.twinx()
    twin.plot(*_series(history, "train.samples_per_s"), color="tab:green", label="training samples/s")
    twin.set_ylabel("training samples / s", color="tab:green")
    _mark_points(twin, [h["epoch"] for h in history])
    # on the twin: the axes drawn last, so no line of it runs over the legend box
    twin.legend(handles=[*ax.lines, *twin.lines], fontsize=7, loc="best", framealpha=0.9)

    for ax in axes.flat:
        _epoch_axis(ax, [h["epoch"] for h in history])

    fig.suptitle(f"training curves ({len(history)} epoch{'s' if len(history) != 1 else ''})")
    return save_figure(fig, path)


def has_grad_norms(history: Sequence[dict[str, float]]) -> bool:
    """Whether any epoch recorded ``train.grad_norm.*`` metrics."""
    return any(k.startswith(GRAD_NORM_PREFIX) for h in history for k in h)


def grad_norm_curves(history: Sequence[dict[str, float]], path: Path) -> Path:
    """Per-epoch mean gradient L2 norm of every encoder stage, decoder stage and head (log scale), written
    to ``path`` (1500 x 480 px). Colours run from the full-resolution stage (dark) to the coarsest (light);
    the total norm is the dashed black line in every panel. A zero norm (a head without gradient, e.g. the
    ``none`` scheme's companions) cannot sit on a log axis and is drawn as a marker on the bottom edge.

    Raises:
        ValueError: no epoch recorded gradient norms.
    """
    if not has_grad_norms(history):
        raise ValueError("no train.grad_norm.* metrics in the history (train.grad_norm_every: 0?)")
    plt = pyplot()
    keys = sorted({k for h in history for k in h})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), constrained_layout=True, sharey=True)
    total = _series(history, GRAD_NORM_PREFIX + "total")
    positive = [v for k in keys if k.startswith(GRAD_NORM_PREFIX) for v in _series(history, k)[1] if v > 0]
    floor = min(positive) / 3 if positive else 1e-6
    titles = {"encoder": "encoder stages (0 = full resolution)", "decoder": "decoder stages (0 = finest)",
              "head": "segmentation heads (0 = full resolution)"}
    cmap = plt.get_cmap("viridis")
    for ax, (kind, title) in zip(axes, titles.items(), strict=True):
        stages = _stages(keys, kind)
        for rank, (index, key) in enumerate(stages):
            x, y = _series(history, key)
            color = cmap(0.85 * rank / max(1, len(stages) - 1))
            ax.plot(x, [max(v, floor) for v in y], color=color, marker="o", ms=3, label=f"{kind}{index}")
            zeros = [xi for xi, v in zip(x, y, strict=True) if v <= 0]
            if zeros:
                ax.plot(zeros, [floor] * len(zeros), ls="none", marker="v", ms=7, color=color)
        if total[0]:
            ax.plot(*total, color="black", ls="--", marker="_", ms=10, lw=1.5, label="total")
        ax.set(title=title, xlabel="epoch", yscale="log")
        _epoch_axis(ax, [h["epoch"] for h in history])
        if any(v <= 0 for k in (k for _, k in stages) for v in _series(history, k)[1]):
            ax.text(0.02, 0.02, "▼ = no gradient (norm 0)", transform=ax.transAxes, fontsize=7, color="grey")
        _legend(ax, ncol=2)
    axes[0].set_ylabel("mean gradient L2 norm")
    fig.suptitle("gradient norm per stage (train.grad_norm.<stage>, after AMP unscaling, before clipping)")
    return save_figure(fig, path)


def curve_figures(out_dir: Path, history: Sequence[dict[str, float]]) -> list[Path]:
    """``training_curves.png`` and (when recorded) ``grad_norms.png`` in ``out_dir``; a figure that fails is
    logged as a warning and skipped. Returns the files written (none for an empty history)."""
    if not history:
        return []
    jobs = [("training curves", training_curves, FIGURES["curves"])]
    if has_grad_norms(history):
        jobs.append(("gradient norms", grad_norm_curves, FIGURES["grad_norms"]))
    written = []
    for name, draw, file_name in jobs:
        try:
            written.append(draw(history, Path(out_dir) / file_name))
        except Exception as err:  # a figure must never cost a finished training
            log.warning("%s not drawn: %s: %s", name, type(err).__name__, err)
    return written
