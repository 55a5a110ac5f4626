"""``docs/ablation.md``: the deep-supervision ablation across tasks, from each task's ``ablation.json``.

``medsup ablation summarize`` writes one report per task (``docs/ablation/<task>/``); this module reads their
``ablation.json`` files back (:func:`~medsup.evaluation.ablation.load_summary`) and puts the tasks side by
side: best validation Dice per scheme and training-set size, epochs to the convergence threshold, the first
encoder stage's gradient norm, early exit, one figure with a row per task, and a verdict on the default
``loss.scheme`` computed from the numbers:

- per (task, n_train) cell, the schemes are ranked by their mean best validation metric over seeds (1 = best);
  the recommended scheme has the lowest mean rank over all cells (ties: the larger mean paired gap);
- paired comparisons say how consistent the lead is: the same task, n_train and seed (so the same validation
  cases and the same training subset) trained with two schemes, best metric of one minus the other's.
  A lead that holds in fewer than :data:`CONSISTENT` of the pairs is called within noise.

It also holds each claim of the seed paper up against the numbers (:func:`paper_claims`): every deep-supervised
scheme against ``none`` on the same task, training subset and seed, marked as agreeing, against the paper, or
untested where nothing can be compared (no arm reached the threshold, a curve was not logged).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from medsup.data.files import atomic_path, write_json
from medsup.evaluation.ablation import GRAD_KEY, NUMBERS, Arm, ExitResult, Summary, load_summary, mean_std
from medsup.evaluation.ablation_report import fmt, grad_mean, reached_cell

log = logging.getLogger(__name__)

#: the share of paired arms a scheme must win for its lead to be called consistent
CONSISTENT = 2 / 3


def _schemes(summaries: Sequence[Summary]) -> list[str]:
    seen: list[str] = []
    for s in summaries:
        seen += [x for x in s.schemes if x not in seen]
    return seen


def _cells(summaries: Sequence[Summary]) -> list[tuple[Summary, int]]:
    return [(s, n) for s in summaries for n in s.sizes]


def mean_ranks(summaries: Sequence[Summary]) -> dict[str, float]:
    """Per scheme, its mean rank (1 = best mean best-metric over seeds) over the (task, n_train) cells that
    scored every scheme. Ties share the mean of their ranks."""
    schemes = _schemes(summaries)
    ranks: dict[str, list[float]] = {x: [] for x in schemes}
    for s, n in _cells(summaries):
        found = {x: mean_std(a.best for a in s.select(x, n))[0] for x in schemes}
        means = {x: m for x, m in found.items() if m is not None}
        if len(means) < len(schemes):
            continue  # a cell without every scheme cannot rank them
        for x in schemes:
            better = sum(1 for y in schemes if means[y] > means[x])
            equal = sum(1 for y in schemes if means[y] == means[x])
            ranks[x].append(better + (equal + 1) / 2)
    return {x: statistics.fmean(r) for x, r in ranks.items() if r}


def paired(s: Summary, a: str, b: str, n_train: int, value: Callable[[Arm], float | None]) -> list[tuple[float, float]]:
    """``(value of a's arm, value of b's arm)`` for every seed that trained both at ``n_train`` (same training
    subset, same validation cases) and has a finite value for both, by seed."""
    def by_seed(scheme: str) -> dict[int, float]:
        found = {arm.seed: value(arm) for arm in s.select(scheme, n_train)}
        return {k: float(v) for k, v in found.items() if v is not None and math.isfinite(v)}
    mine, theirs = by_seed(a), by_seed(b)
    return [(mine[seed], theirs[seed]) for seed in sorted(mine.keys() & theirs.keys())]


def paired_gaps(summaries: Sequence[Summary], a: str, b: str) -> list[float]:
    """Best metric of ``a`` minus that of ``b`` for every (task, n_train, seed) that trained both."""
    return [x - y for s, n in _cells(summaries) for x, y in paired(s, a, b, n, lambda arm: arm.best)]


def verdict(summaries: Sequence[Summary], current_default: str | None) -> tuple[str | None, list[str]]:
    """The recommended ``loss.scheme`` and the sentences that say why, all computed from ``summaries``."""
    ranks = mean_ranks(summaries)
    if not ranks:
        return None, ["No (task, n_train) cell has every scheme scored, so no scheme can be recommended."]

    def gap_sum(x: str) -> float:
        return sum(g for y in ranks if y != x for g in paired_gaps(summaries, x, y))

    order = sorted(ranks, key=lambda x: (ranks[x], -gap_sum(x)))
    winner = order[0]
    cells = sum(1 for s, n in _cells(summaries) if all(s.select(x, n) for x in ranks))
    lines = [f"Over {cells} (task, n_train) cells, the mean rank of each scheme's best validation Dice (1 = best) "
             "is " + ", ".join(f"`{x}` {ranks[x]:.2f}" for x in order) + f": `{winner}` ranks first."]
    consistent: dict[str, bool] = {}  # per other scheme: does the winner's lead over it hold in the pairs?
    for other in order[1:]:
        gaps = paired_gaps(summaries, winner, other)
        if not gaps:
            continue
        wins = sum(1 for g in gaps if g > 0)
        held = consistent[other] = wins >= CONSISTENT * len(gaps)
        lines.append(f"Against `{other}`, it is better in {wins} of {len(gaps)} paired arms (same task, n_train and "
                     f"seed), by {statistics.fmean(gaps):+.3f} on average (median {statistics.median(gaps):+.3f})"
                     + ("." if held else f": not consistent (under {CONSISTENT:.0%} of the pairs)."))
    for s in summaries:
        largest = max(s.sizes)
        speeds = [f"`{x}` {reached_cell(s.select(x, largest))}" for x in order]
        lines.append(f"{s.task}: epochs to {s.metric} >= {s.threshold:g} at n_train = {largest}: "
                     + ", ".join(speeds) + ".")
    if current_default:
        if current_default == winner:
            lines.append(f"The configured default (`loss.scheme: {current_default}`) agrees with this.")
        else:
            lines.append(f"The configured default (`loss.scheme: {current_default}`) differs"
                         + (f": these numbers favour `{winner}`." if consistent.get(current_default) else
                            f"; `{winner}` leads it, but not consistently enough to call the difference real."))
    return winner, lines


#: the scheme without deep supervision, the baseline of every claim
BASELINE = "none"


def _tag(holds: bool | None) -> str:
    return "untested" if holds is None else ("agrees" if holds else "against the paper")


def _convergence(s: Summary, x: str) -> tuple[str, bool | None]:
    """Epochs to the threshold of ``x`` against the baseline over every (n_train, seed) pair: faster when it reaches
    the threshold in more arms, or in as many and in fewer epochs where both reached it."""
    def reached(scheme: str) -> tuple[int, int]:
        arms = s.select(scheme)
        return sum(a.epochs_to_threshold is not None for a in arms), len(arms)
    (mine, runs), (theirs, _) = reached(x), reached(BASELINE)
    both = [a - b for n in s.sizes
            for a, b in paired(s, x, BASELINE, n, lambda arm: None if arm.epochs_to_threshold is None
                               else float(arm.epochs_to_threshold))]
    delta = statistics.fmean(both) if both else None
    pairs = f"{len(both)} pair" + ("s" if len(both) > 1 else "")
    text = (f"`{x}` in {mine}/{runs} arms (`{BASELINE}` {theirs})"
            + (f", {delta:+.1f} epochs where both reached it ({pairs})" if delta is not None else ""))
    if mine == theirs == 0:
        return text, None
    return text, mine > theirs or (mine == theirs and delta is not None and delta < 0)


def _low_data(s: Summary, x: str) -> tuple[str, bool | None]:
    """The mean paired gain of ``x``'s best metric over the baseline at each n_train: the paper's claim holds when
    the gain at the smallest n_train is positive and larger than at the largest."""
    gains = {n: [a - b for a, b in paired(s, x, BASELINE, n, lambda arm: arm.best)] for n in s.sizes}
    means = {n: statistics.fmean(g) for n, g in gains.items() if g}
    text = f"`{x}` " + " / ".join(f"{means[n]:+.3f}" if n in means else "–" for n in s.sizes)
    small, large = min(s.sizes), max(s.sizes)
    if small == large or small not in means or large not in means:
        return text, None
    return text, means[small] > 0 and means[small] > means[large]


def _gradients(s: Summary, x: str) -> tuple[str, bool | None]:
    """The first encoder stage's mean gradient norm of ``x`` over the baseline's at the largest n_train, and in how
    many seeds it is larger: the claim holds when it is larger in at least :data:`CONSISTENT` of them."""
    pairs = paired(s, x, BASELINE, max(s.sizes), lambda arm: grad_mean(arm.grad) if arm.grad else None)
    if not pairs:
        return f"`{x}` not logged", None
    ratio = statistics.fmean(a for a, _ in pairs) / statistics.fmean(b for _, b in pairs)
    larger = sum(a > b for a, b in pairs)
    return f"`{x}` x{ratio:.2f} (larger in {larger} of {len(pairs)} seeds)", larger >= CONSISTENT * len(pairs)


def _early_exit(s: Summary, x: str) -> str:
    """Per coarser exit level of ``x``: speed-up of the whole case and paired Dice change against level 0 of the
    same model (n_train and seed)."""
    def at(level: int) -> dict[tuple[int, int], ExitResult]:
        return {(e.n_train, e.seed): e for e in s.early_exit if e.scheme == x and e.level == level}
    full = at(0)
    parts = []
    for level in sorted({e.level for e in s.early_exit if e.scheme == x and e.level > 0}):
        coarse = at(level)
        seeds = sorted(full.keys() & coarse.keys())
        times = [(a, b) for a, b in ((full[k].total_s, coarse[k].total_s) for k in seeds) if a and b]
        dice = [b - a for a, b in ((full[k].dice, coarse[k].dice) for k in seeds) if a is not None and b is not None]
        speed = f"{statistics.fmean(a for a, _ in times) / statistics.fmean(b for _, b in times):.2f}x" if times \
            else "–"
        parts.append(f"level {level} {speed}, Dice {statistics.fmean(dice):+.3f}" if dice else f"level {level} {speed}")
    return f"`{x}` " + ("; ".join(parts) if parts else "no coarser exit run")


def _budget_caveat(s: Summary) -> str:
    """How many arms of ``s`` scored their best at their last validation, i.e. were still improving when the
    budget ran out: where most were, the comparisons are of progress within the budget, not of converged models."""
    last = [(a.curve, a.best) for a in s.arms if a.curve and a.best is not None]
    rising = sum(len(curve) > 1 and curve[-1][1] >= best > curve[-2][1] for curve, best in last)
    note = (": still improving when the budget ran out, so these are comparisons of progress within the budget, "
            "not of converged models" if rising * 2 > len(last) else "")
    return (f"- {s.task}: {rising} of {len(last)} arms scored their best {s.metric} at their last validation, "
            f"higher than the one before{note}.")


def paper_claims(summaries: Sequence[Summary]) -> list[str]:
    """Markdown bullets, one per claim of the seed paper, each task's figures and whether they agree with it
    (``agrees``, ``against the paper`` or ``untested``), all computed from ``summaries`` against ``none``."""
    schemes = [x for x in _schemes(summaries) if x != BASELINE]
    if not schemes or not any(s.select(BASELINE) for s in summaries):
        return [f"- No `{BASELINE}` arm next to a deep-supervised one: the claims need both."]
    claims: list[tuple[str, str, Callable[[Summary, str], tuple[str, bool | None]]]] = [
        ("Faster convergence", "arms reaching the threshold, and epochs against `none` on the same seed",
         _convergence),
        ("Largest gains with little data", "mean paired gain of the best validation Dice over `none` at n_train = "
         "{sizes}", _low_data),
        ("Larger gradients in the first layers (without raising the learning rate)",
         "first encoder stage's mean gradient norm against `none` at the largest n_train", _gradients),
    ]
    lines = [_budget_caveat(s) for s in summaries]
    for title, what, measure in claims:
        per_task = []
        for s in summaries:
            if not s.select(BASELINE):
                continue
            found = [(x, *measure(s, x)) for x in schemes if s.select(x)]
            per_task.append(f"{s.task}: " + "; ".join(f"{text}: {_tag(holds)}" for _, text, holds in found))
        sizes = " / ".join(str(n) for n in sorted({n for s in summaries for n in s.sizes}))
        lines.append(f"- **{title}** ({what.format(sizes=sizes)}). " + ". ".join(per_task) + ".")
    exits = [f"{s.task}: " + "; ".join(_early_exit(s, x) for x in _schemes([s])
                                       if any(e.scheme == x for e in s.early_exit))
             for s in summaries if s.early_exit]
    if exits:
        lines.append("- **Every head a usable segmenter** (early exit: speed-up of the whole case and Dice change "
                     "against the full-resolution head, same model and seed). " + ". ".join(exits) + ".")
    return lines


def render_overview(summaries: Sequence[Summary], reports: Sequence[Path], out: Path, figure: str,
                    commands: Sequence[str], why: Sequence[str]) -> str:
    """The Markdown overview; ``reports`` (each task's report folder) are linked relative to ``out``, ``why`` is
    :func:`verdict`'s sentences."""
    schemes = _schemes(summaries)
    seeds = sorted({a.seed for s in summaries for a in s.arms})
    cells = _cells(summaries)
    head = ("| scheme | " + " | ".join(f"{s.task}, n = {n}" for s, n in cells) + " |\n|---|"
            + "---|" * len(cells))
    links = ", ".join(f"[{s.task}]({(Path(os.path.relpath(r, out.parent)) / 'ablation.md').as_posix()})"
                      for s, r in zip(summaries, reports, strict=True))
    lines = [
        "# Deep-supervision ablation: overview", "",
        f"Generated by `medsup ablation overview` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from the "
        f"per-task reports ({links}). Schemes {', '.join(f'`{x}`' for x in schemes)}; seeds "
        f"{', '.join(map(str, seeds))}; every arm of a task trains on the same plan for the same budget and "
        "validates on the same cases (see each report for its budget, tables and runs).", "",
        "## Verdict: the default `loss.scheme`", "", " ".join(why), "",
        "## The seed paper's claims, measured", "",
        "Each deep-supervised scheme against `none` (no deep supervision) on the same task, training subset and "
        "seed; `agrees` / `against the paper` / `untested` (nothing to compare: no arm reached the threshold, or "
        "the curve was not logged).", "",
        *paper_claims(summaries), "",
        f"![ablation overview]({figure})", "",
        "## Best validation Dice", "",
        "The best validation Dice of each arm (" + "; ".join(f"{s.task}: `{s.metric}`" for s in summaries)
        + "), mean ± std over seeds.", "", head,
    ]
    for x in schemes:
        lines.append(f"| `{x}` | " + " | ".join(fmt(a.best for a in s.select(x, n)) if s.select(x, n) else "–"
                                               for s, n in cells) + " |")
    lines += ["", "## Convergence: epochs to the threshold", "",
              "Epochs until the validation metric first reaches the task's threshold ("
              + "; ".join(f"{s.task} {s.threshold:g}" for s in summaries)
              + "), mean ± std over the seeds that reached it; (reached/runs).", "", head]
    for x in schemes:
        lines.append(f"| `{x}` | " + " | ".join(reached_cell(s.select(x, n)) for s, n in cells) + " |")
    lines += ["", f"## Gradient flow: `{GRAD_KEY}`", "",
              "Mean over training of the first encoder stage's per-epoch gradient norm at each task's largest "
              "n_train, mean ± std over seeds, and its ratio to `none` (no deep supervision) of the same task.", "",
              "| scheme | " + " | ".join(s.task for s in summaries) + " |", "|---|" + "---|" * len(summaries)]
    for x in schemes:
        row = []
        for s in summaries:
            largest = max(s.sizes)
            values = [grad_mean(a.grad) for a in s.select(x, largest) if a.grad]
            mine = mean_std(values)[0]
            base = mean_std(grad_mean(a.grad) for a in s.select("none", largest) if a.grad)[0]
            ratio = f" (x{mine / base:.2f})" if mine is not None and base else ""
            row.append(fmt(values, 4) + ratio if values else "not logged")
        lines.append(f"| `{x}` | " + " | ".join(row) + " |")
    # per task: Dice, seconds, and the lesion recall of each lesion class its evaluations hold
    lesion_classes = [sorted({k for e in s.early_exit for k in e.lesion_recall}) for s in summaries]
    columns = [[f"{s.task} Dice", f"{s.task} s/case"] + [f"{s.task} {k} lesion recall" for k in classes]
               for s, classes in zip(summaries, lesion_classes, strict=True)]
    lines += ["", "## Early exit", "",
              "Test Dice and seconds per case when inference stops at decoder head K (0 = the full-resolution "
              "head), models of each task's largest n_train, mean over seeds; lesion recall from `medsup "
              "evaluate`'s lesion-wise detection (see each report for precision).", "",
              "| scheme | exit level | " + " | ".join(c for cols in columns for c in cols) + " |",
              "|---|---|" + "---|" * sum(len(cols) for cols in columns)]
    levels = sorted({e.level for s in summaries for e in s.early_exit})
    for x in schemes:
        for level in levels:
            row = []
            for s, classes in zip(summaries, lesion_classes, strict=True):
                at = [e for e in s.early_exit if e.scheme == x and e.level == level]
                row += [fmt(e.dice for e in at), fmt((e.total_s for e in at), 2)] if at else ["–", "–"]
                row += [fmt(e.lesion_recall.get(k) for e in at) for k in classes]
            lines.append(f"| `{x}` | {level} | " + " | ".join(row) + " |")
    if not levels:
        lines.append("| – | – | " + " | ".join("–" for cols in columns for _ in cols) + " |")
    lines += ["", "## Reproduce", "", "```bash", *commands, "```", ""]
    return "\n".join(lines)


def find_reports(paths: Sequence[Path]) -> list[Path]:
    """The report folders among ``paths``: a folder holding ``ablation.json``, an ``ablation.json`` file, or a
    folder whose subfolders hold one (``docs/ablation``), in that order, without duplicates."""
    found: list[Path] = []
    for p in paths:
        if p.is_file():
            candidates = [p.parent]
        elif (p / NUMBERS).is_file():
            candidates = [p]
        else:
            candidates = sorted(q.parent for q in p.glob(f"*/{NUMBERS}"))
        found += [c for c in candidates if c not in found]
    return found


def write_overview(reports: Sequence[Path], out: Path, commands: Sequence[str],
                   current_default: str | None = None) -> dict[str, Path]:
    """Read each report's ``ablation.json``; write ``out`` (Markdown) and its figure (``out`` with ``.png``),
    each atomically. Tasks appear in the order of ``reports``.

    Raises:
        ValueError: no report was given, one cannot be read (named), or two reports are of the same task.
    """
    from medsup.evaluation.ablation_figure import overview_figure  # matplotlib, only here

    if not reports:
        raise ValueError(f"no {NUMBERS} found: run `medsup ablation summarize` (pipelines/ablation.sh) first")
    summaries = [load_summary(r / NUMBERS) for r in reports]
    tasks = [s.task for s in summaries]
    if len(set(tasks)) < len(tasks):
        raise ValueError("two reports of the same task: " + ", ".join(
            f"{r} ({s.task})" for r, s in zip(reports, summaries, strict=True)))
    out = Path(out)
    figure = out.with_suffix(".png")
    overview_figure(summaries, figure)
    winner, why = verdict(summaries, current_default)
    with atomic_path(out) as tmp:
        tmp.write_text(render_overview(summaries, reports, out, figure.name, commands, why), encoding="utf-8")
    numbers = write_json(out.with_suffix(".json"), {"tasks": tasks, "reports": [str(r) for r in reports],
                                                     "default_scheme": winner, "mean_ranks": mean_ranks(summaries)})
    log.info("wrote %s, %s and %s", out, figure, numbers)
    return {"markdown": out, "figure": figure, "numbers": numbers}

