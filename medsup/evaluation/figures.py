"""Figures people would rather look at than tables (matplotlib, PNG, written atomically)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from medsup.data.io import atomic_path


def training_curves(history: Sequence[dict[str, float]], path: Path) -> Path:
    """Total and per-head training loss, head weights alpha(t), LR and validation Dice per class vs epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    keys = sorted({k for h in history for k in h})

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(h["epoch"], h[key]) for h in history if key in h and not math.isnan(h[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax = axes[0, 0]
    for key in [k for k in keys if k.startswith("train.loss.head") or k == "train.loss.total"]:
        ax.plot(*series(key), label=key.removeprefix("train.loss."), lw=2.5 if key.endswith("total") else 1)
    ax.set(title="training loss", xlabel="epoch", yscale="log")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for key in [k for k in keys if k.startswith("train.loss.weight") or k == "train.loss.alpha"]:
        ax.plot(*series(key), label=key.removeprefix("train.loss."))
    ax.set(title="head weights / alpha(t)", xlabel="epoch")
    if ax.lines:
        ax.legend(fontsize=7)
    ax = axes[1, 0]
    for key in [k for k in keys if k.startswith("val.dice")]:
        ax.plot(*series(key), marker="o", ms=3, label=key.removeprefix("val."))
    ax.set(title="validation Dice", xlabel="epoch", ylim=(0, 1))
    if ax.lines:
        ax.legend(fontsize=7)
    ax = axes[1, 1]
    ax.plot(*series("train.lr"))
    ax.set(title="learning rate", xlabel="epoch")
    fig.suptitle(f"training curves ({len(epochs)} epochs)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
