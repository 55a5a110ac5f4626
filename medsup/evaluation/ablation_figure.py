"""The ablation figures: four panels drawn from a :class:`~medsup.evaluation.ablation.Summary`, 2 x 2 for one
task (``ablation.png``) or one row per task (the overview's figure, :func:`overview_figure`).

(a) the validation metric per epoch at the largest training-set size, mean over seeds, with the threshold;
(b) best validation metric against n_train; (c) ``train.grad_norm.encoder0`` per epoch (log scale);
(d) early exit: test Dice against seconds per case, one point per exit level. A panel without data says so.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsup.evaluation.figures import pyplot, save_figure

if TYPE_CHECKING:
    from medsup.evaluation.ablation import Summary

COLOURS = {"none": "tab:gray", "nnunet": "tab:blue", "dsn": "tab:orange", "uniform": "tab:green"}


def _mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """Per step, the mean over the curves that have it."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for curve in curves:
        for step, value in curve:
            by_step[step].append(value)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def draw_panels(s: Summary, axes: Sequence[Any], label: str = "") -> None:
    """Draw the four panels of ``s`` into ``axes`` (curve, size, gradient, early exit), titles prefixed by
    ``label`` (a task name in the overview's rows)."""
    from matplotlib.ticker import MaxNLocator

    from medsup.evaluation.ablation import GRAD_KEY, mean_std

    curve_ax, size_ax, grad_ax, exit_ax = axes
    largest = max(s.sizes)
    for scheme in s.schemes:
        colour = COLOURS.get(scheme)
        arms = s.select(scheme, largest)
        steps, values = _mean_curve([a.curve for a in arms if a.curve])
        if steps:
            curve_ax.plot(steps, values, marker=".", color=colour, label=scheme)
        points = [(n, *mean_std(a.best for a in s.select(scheme, n))[:2]) for n in s.sizes]
        points = [(n, m, sd or 0.0) for n, m, sd in points if m is not None]
        if points:
            size_ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                             marker="o", capsize=3, color=colour, label=scheme)
        steps, values = _mean_curve([a.grad for a in arms if a.grad])
        if steps:
            grad_ax.plot(steps, values, marker=".", color=colour, label=scheme)
        exits = [e for e in s.early_exit if e.scheme == scheme and e.dice is not None and e.total_s is not None]
        for level in sorted({e.level for e in exits}):
            at = [e for e in exits if e.level == level]
            x = statistics.fmean(e.total_s for e in at if e.total_s is not None)
            y = statistics.fmean(e.dice for e in at if e.dice is not None)
            exit_ax.scatter([x], [y], color=colour, label=scheme if level == min(e.level for e in exits) else None)
            exit_ax.annotate(f"K={level}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    curve_ax.axhline(s.threshold, color="black", linestyle=":", linewidth=1)
    curve_ax.set(title=f"{label}(a) {s.metric} per epoch, n_train = {largest}", xlabel="epoch", ylabel=s.metric)
    size_ax.set(title=f"{label}(b) best {s.metric} vs training-set size", xlabel="n_train (training cases)",
                ylabel=f"best {s.metric}")
    size_ax.set_xticks(s.sizes)
    for ax in (curve_ax, grad_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    grad_ax.set(title=f"{label}(c) {GRAD_KEY}, n_train = {largest}", xlabel="epoch", ylabel="gradient L2 norm")
    exit_ax.set(title=f"{label}(d) early exit on the test images", xlabel="seconds per case", ylabel="test Dice")
    for ax, empty in ((curve_ax, "no validation curves"), (size_ax, "no validation results"),
                      (grad_ax, f"{GRAD_KEY} not logged"), (exit_ax, "no early-exit results")):
        if ax.has_data():
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        else:
            _empty(ax, empty)
    if grad_ax.has_data():
        grad_ax.set_yscale("log")


def ablation_figure(s: Summary, path: Path) -> Path:
    """Draw the four panels of one task into ``path`` (2 x 2, PNG, atomic)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    draw_panels(s, axes.flatten())
    fig.suptitle(f"Deep-supervision ablation: {s.task}, experiment {s.experiment}")
    fig.tight_layout()
    return save_figure(fig, path)


def overview_figure(summaries: Sequence[Summary], path: Path) -> Path:
    """One row of the four panels per task (PNG, atomic): the figure of ``docs/ablation.md``."""
    plt = pyplot()
    fig, axes = plt.subplots(len(summaries), 4, figsize=(20, 4.2 * len(summaries)), squeeze=False)
    for row, s in zip(axes, summaries, strict=True):
        draw_panels(s, row, label=f"{s.task} ")
    fig.suptitle("Deep-supervision ablation: " + ", ".join(s.task for s in summaries))
    fig.tight_layout()
    return save_figure(fig, path)
