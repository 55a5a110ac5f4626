"""Summarise the deep-supervision ablation (``pipelines/ablation.sh``) into a Markdown report and a figure.

Input: the training runs of one MLflow experiment (read through :func:`medsup.tracking.experiments.
experiment_runs`, passed in as :class:`~medsup.tracking.experiments.RunRecord`) and, optionally, a folder of
early-exit inferences (``<anything>/report.json`` from ``medsup infer --exit-level K`` with
``evaluation/summary.json`` from ``medsup evaluate`` beside it), plus the runs and early exits of arm records
(:mod:`medsup.evaluation.ablation_records`) whose store is gone. An arm is (scheme, seed, n_train), read
from the run's params and tags (``loss.scheme``, ``seed``, tag ``n_train``); when an arm was run more than
once, its latest finished run counts. Unfinished runs are listed, not scored.

Output (:func:`medsup.evaluation.ablation_report.write_report`, every file atomic): ``ablation.md`` with

1. convergence: epochs until the validation metric (default ``val.dice.liver``) first reaches the threshold
   (0.9 for liver), mean +- std over the seeds that reached it, and how many did;
2. low data: best and final validation metric per scheme and training-set size;
3. gradient flow: ``train.grad_norm.encoder0`` (the first encoder stage, farthest from the loss) at the first
   and last epoch, or "not logged" where the runs lack it;
4. early exit: test Dice and seconds per case for each exit level;

then a "default scheme" paragraph computed from those numbers, the figure ``ablation.png`` and the commands
that reproduce it; ``ablation.json`` holds the numbers behind it all.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

log = logging.getLogger(__name__)

GRAD_KEY = "train.grad_norm.encoder0"
#: below this test-set lesion recall (every arm's full-resolution model) the report says the lesions are missed
LOW_LESION_RECALL = 0.2
CLASS_PREFIX = "val.dice."  # per-class validation Dice: val.dice.liver, val.dice.tumour, ...
#: per task: the validation metric the convergence and low-data tables use, and the convergence threshold
TASK_METRICS: dict[str, tuple[str, float]] = {
    "liver": ("val.dice.liver", 0.9),
    # the global Dice: five of the six validation cases of pipelines/ablation.sh hold one 3-6 mm nodule (2-11
    # voxels at 2 mm) or none, which pins their per-case Dice near 0 or 1 whatever the network does elsewhere
    "lung": ("val.dice_global.tumour", 0.5),
    "tiny": ("val.dice.organ", 0.8),
}
MARKDOWN, FIGURE, NUMBERS = "ablation.md", "ablation.png", "ablation.json"
#: the run param that names the training data (the dataset fingerprint the plan was made from)
DATASET_PARAM = "planned.fingerprint_hash"
#: a run read back from an arm record carries this tag: the record's path (medsup.evaluation.ablation_records)
RECORD_TAG = "medsup.ablation.record"


class RunLike(Protocol):
    """What is read from a run (:class:`medsup.tracking.experiments.RunRecord` fits)."""

    run_id: str
    name: str
    status: str
    start_time: int
    params: dict[str, str]
    tags: dict[str, str]
    history: dict[str, list[tuple[int, float]]]


@dataclass
class Arm:
    """One finished training run of the ablation, reduced to what the tables need."""

    scheme: str
    seed: int
    n_train: int
    run_id: str
    name: str
    budget: str  # "E epochs x I iterations x batch B"
    curve: list[tuple[int, float]]
    grad: list[tuple[int, float]] | None
    epochs_to_threshold: int | None
    best: float | None
    final: float | None
    #: best of every other per-class validation metric (``val.dice.<class>``): what the main metric hides
    others: dict[str, float] = field(default_factory=dict)
    #: the arm record it was read from (``arms/<run name>.json``), "" when read from the MLflow store
    record: str = ""
    #: the dataset fingerprint of its plan (:data:`DATASET_PARAM`), "" when the run does not name it
    dataset: str = ""


@dataclass
class ExitResult:
    """One early-exit inference of one trained model on the test images."""

    scheme: str
    seed: int
    n_train: int
    level: int
    dice: float | None
    network_s: float | None
    total_s: float | None
    cases: int
    folder: str
    #: lesion-wise recall and precision per lesion class (``medsup evaluate``'s pooled ``lesions`` block)
    lesion_recall: dict[str, float | None] = field(default_factory=dict)
    lesion_precision: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Summary:
    """Everything the report shows; ``ablation.json`` is this as JSON."""

    experiment: str
    task: str
    metric: str
    threshold: float
    arms: list[Arm]
    skipped: list[str]
    early_exit: list[ExitResult] = field(default_factory=list)
    default_scheme: str | None = None
    conclusion: list[str] = field(default_factory=list)

    @property
    def schemes(self) -> list[str]:
        order = ["none", "nnunet", "dsn", "uniform"]
        found = {a.scheme for a in self.arms} | {e.scheme for e in self.early_exit}
        return sorted(found, key=lambda s: (order.index(s) if s in order else len(order), s))

    @property
    def sizes(self) -> list[int]:
        return sorted({a.n_train for a in self.arms})

    def select(self, scheme: str, n_train: int | None = None) -> list[Arm]:
        return [a for a in self.arms if a.scheme == scheme and (n_train is None or a.n_train == n_train)]


# ----------------------------------------------------------------------------------------- reading


def metric_class(metric: str) -> tuple[str, str]:
    """``(class, aggregate)`` of a validation metric: ``val.dice.liver`` -> ``("liver", "mean")``,
    ``val.dice_global.tumour`` -> ``("tumour", "global")``, ``val.dice`` -> ``("", "mean")`` ("" = all classes).
    The aggregate names the matching block of an evaluation summary (``dice.mean`` per case, ``dice.global``)."""
    for prefix, aggregate in (("val.dice_global", "global"), ("val.dice", "mean")):
        if metric == prefix or metric.startswith(prefix + "."):
            return metric.removeprefix(prefix).lstrip("."), aggregate
    raise ValueError(f"{metric!r} is not a validation Dice (val.dice[.CLASS] or val.dice_global[.CLASS])")


def task_metric(task: str, metric: str | None = None, threshold: float | None = None) -> tuple[str, float]:
    """The validation metric and convergence threshold: the arguments, else the task's defaults."""
    default_metric, default_threshold = TASK_METRICS.get(task, ("val.dice", 0.9))
    return metric or default_metric, default_threshold if threshold is None else threshold


def collect_arms(runs: Iterable[RunLike], task: str, metric: str, threshold: float) -> tuple[list[Arm], list[str]]:
    """The arms among ``runs`` (those of ``task``; the latest finished run per arm), and what was skipped."""
    latest: dict[tuple[str, int, int], RunLike] = {}
    skipped = []
    for run in sorted(runs, key=lambda r: r.start_time):
        p, t = run.params, run.tags
        if p.get("task", t.get("task")) != task:
            continue
        try:
            key = (p.get("loss.scheme") or t["loss_scheme"], int(p.get("seed") or t["seed"]),
                   int(t.get("n_train") or p["data.max_train_cases"]))
        except (KeyError, ValueError):
            skipped.append(f"{run.name} ({run.run_id}): no scheme/seed/n_train in its params and tags")
            continue
        if run.status != "FINISHED":
            skipped.append(f"{run.name} ({run.run_id}): status {run.status}")
            continue
        latest[key] = run
    arms = []
    for (scheme, seed, n_train), run in sorted(latest.items()):
        curve = run.history.get(metric, [])
        values = [v for _, v in curve if math.isfinite(v)]
        reached = next((step for step, v in curve if v >= threshold), None)
        budget = (f"{run.params.get('train.epochs', '?')} epochs x {run.params.get('train.iterations_per_epoch', '?')}"
                  f" iterations x batch {run.params.get('planned.batch_size', '?')}")
        others = {key: max(finite) for key, points in run.history.items()
                  if key.startswith(CLASS_PREFIX) and key != metric
                  and (finite := [v for _, v in points if math.isfinite(v)])}
        arms.append(Arm(scheme, seed, n_train, run.run_id, run.name, budget, curve, run.history.get(GRAD_KEY),
                        reached, max(values) if values else None, values[-1] if values else None, others,
                        run.tags.get(RECORD_TAG, ""), run.params.get(DATASET_PARAM, "")))
    return arms, skipped


@dataclass
class ExitSource:
    """What one early-exit result is computed from, trimmed to what :func:`exit_result` reads: the inference
    ``report.json`` (settings.exit_level, model, per-case status and seconds), the model bundle's config (scheme,
    seed, max_train_cases) and the per-class blocks of ``evaluation/summary.json`` (None when unreadable). Arm
    records (:mod:`medsup.evaluation.ablation_records`) store these, so a result outlives the folder it came from."""

    folder: str
    report: dict[str, Any]
    config: dict[str, Any]
    classes: dict[str, dict[str, Any]] | None


def exit_sources(root: Path) -> list[ExitSource]:
    """Every ``report.json`` under ``root`` with its ``evaluation/summary.json``; the model's own bundle
    ``config.json`` says which arm it is. Reports whose bundle cannot be read are skipped with a warning."""
    out = []
    for report_path in sorted(Path(root).rglob("report.json")):
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
            config = json.loads((_bundle_dir(Path(report["model"])) / "config.json").read_text(encoding="utf-8"))
            trimmed_config = {"loss": {"scheme": config["loss"]["scheme"]}, "seed": config["seed"],
                              "data": {"max_train_cases": config["data"].get("max_train_cases")}}
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("%s: skipped, its model's config cannot be read (%s)", report_path, err)
            continue
        cases = [{k: c[k] for k in ("case", "status", "seconds", "seconds_total") if k in c}
                 for c in report.get("cases", [])]
        trimmed_report = {"model": report["model"], "cases": cases,
                          "settings": {"exit_level": report.get("settings", {}).get("exit_level")}}
        out.append(ExitSource(str(report_path.parent), trimmed_report, trimmed_config,
                              _eval_classes(report_path.parent / "evaluation" / "summary.json")))
    return out


def exit_result(source: ExitSource, metric: str) -> ExitResult:
    """One early-exit result: mean seconds per ok case, and the evaluation's Dice of ``metric``'s class and
    aggregate (``val.dice.liver`` -> the per-case mean liver Dice; ``val.dice_global.tumour`` -> the global)."""
    cls, aggregate = metric_class(metric)
    ok = [c for c in source.report.get("cases", []) if c.get("status") == "ok"]
    network = [float(c["seconds"]["network"]) for c in ok if "network" in c.get("seconds", {})]
    total = [float(c["seconds_total"]) for c in ok if "seconds_total" in c]
    level = source.report.get("settings", {}).get("exit_level")
    config, classes = source.config, source.classes
    lesions = {name: b["lesions"] for name, b in (classes or {}).items() if isinstance(b.get("lesions"), dict)}
    return ExitResult(
        scheme=config["loss"]["scheme"], seed=int(config["seed"]),
        n_train=int(config["data"].get("max_train_cases") or 0), level=0 if level is None else int(level),
        dice=_eval_dice(classes, cls, aggregate),
        network_s=statistics.fmean(network) if network else None,
        total_s=statistics.fmean(total) if total else None, cases=len(ok), folder=source.folder,
        lesion_recall={name: b.get("recall") for name, b in lesions.items()},
        lesion_precision={name: b.get("precision") for name, b in lesions.items()},
    )


def read_early_exit(root: Path, metric: str) -> list[ExitResult]:
    """The early-exit results of every inference under ``root`` (:func:`exit_sources`, :func:`exit_result`)."""
    return [exit_result(source, metric) for source in exit_sources(root)]


def _bundle_dir(model: Path) -> Path:
    return model / "model" if (model / "model" / "config.json").is_file() else model


def _eval_classes(summary_path: Path) -> dict[str, dict[str, Any]] | None:
    """The per-class blocks of a ``medsup evaluate`` summary.json; None (with a warning) when unreadable."""
    try:
        classes = json.loads(summary_path.read_text(encoding="utf-8"))["classes"]
    except (OSError, ValueError, KeyError):
        log.warning("%s: no evaluation summary; Dice left empty", summary_path)
        return None
    return cast(dict[str, dict[str, Any]], classes)


def _eval_dice(classes: dict[str, dict[str, Any]] | None, cls: str, aggregate: str = "mean") -> float | None:
    if classes is None:
        return None
    means = [b["dice"].get(aggregate) for name, b in classes.items() if not cls or name == cls]
    means = [m for m in means if m is not None]
    return statistics.fmean(means) if means else None


def summarize(runs: Iterable[RunLike], experiment: str, task: str, metric: str | None = None,
              threshold: float | None = None, early_exit_dir: Path | None = None,
              current_default: str | None = None, recorded_exits: Sequence[ExitSource] = ()) -> Summary:
    """Reduce the experiment's runs (and early-exit folder) to a :class:`Summary` with its conclusion.

    ``recorded_exits`` (from arm records) add the early exits of models whose folders are gone; where the
    folder and a record hold the same arm and level, the folder's counts.

    Raises:
        ValueError: no finished run of ``task`` carries the ablation's params.
    """
    metric, threshold = task_metric(task, metric, threshold)
    arms, skipped = collect_arms(runs, task, metric, threshold)
    if not arms:
        raise ValueError(f"experiment {experiment!r} has no finished {task} runs with loss.scheme, seed and n_train"
                         + (f" ({len(skipped)} skipped: {'; '.join(skipped[:3])})" if skipped else ""))
    exits = read_early_exit(early_exit_dir, metric) if early_exit_dir is not None else []
    seen = {(e.scheme, e.seed, e.n_train, e.level) for e in exits}
    for result in (exit_result(source, metric) for source in recorded_exits):
        if (key := (result.scheme, result.seed, result.n_train, result.level)) not in seen:
            seen.add(key)
            exits.append(result)
    summary = Summary(experiment, task, metric, threshold, arms, skipped, exits)
    summary.default_scheme, summary.conclusion = conclude(summary, current_default)
    return summary


def load_summary(path: Path) -> Summary:
    """A report's ``ablation.json`` (written by :func:`~medsup.evaluation.ablation_report.write_report`) back
    as a :class:`Summary`.

    Raises:
        ValueError: naming ``path``: it cannot be read, is not JSON, or is not an ablation summary.
    """
    def pairs(points: list[list[Any]] | None) -> list[tuple[int, float]] | None:
        # JSON holds NaN/inf as null (medsup.data.io.finite_or_none): such points are dropped, as in the tables
        return None if points is None else [(int(e), float(v)) for e, v in points if v is not None]

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        arms = [Arm(**{**a, "curve": pairs(a["curve"]) or [], "grad": pairs(a["grad"])}) for a in data["arms"]]
        exits = [ExitResult(**e) for e in data.get("early_exit", [])]
        return Summary(str(data["experiment"]), str(data["task"]), str(data["metric"]), float(data["threshold"]),
                       arms, list(data.get("skipped", [])), exits, data.get("default_scheme"),
                       list(data.get("conclusion", [])))
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror or err})") from None
    except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not an ablation.json written by `medsup ablation summarize` ({err!r})") from None


# ----------------------------------------------------------------------------------------- numbers


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (None for one value) and count of the finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs)


def conclude(s: Summary, current_default: str | None) -> tuple[str | None, list[str]]:
    """The winning scheme and the sentences that say by how much, all computed from ``s``."""
    largest, smallest = max(s.sizes), min(s.sizes)
    best = {sch: mean_std(a.best for a in s.select(sch, largest)) for sch in s.schemes}
    ranked = sorted(((m, sd, n, sch) for sch, (m, sd, n) in best.items() if m is not None), reverse=True)
    if not ranked:
        return None, ["No run logged the validation metric, so no scheme can be recommended."]
    win_mean, win_std, win_n, winner = ranked[0]
    seeds = {a.seed for a in s.arms}
    lines = [f"At n_train = {largest}, `{winner}` has the highest best validation {s.metric} "
             f"({win_mean:.3f}, mean of {win_n} seed{'s' if win_n != 1 else ''})."]
    for mean, std, _, sch in ranked[1:]:
        gap = win_mean - mean
        spread = max(x for x in (win_std, std, 0.0) if x is not None)
        verdict = "more than" if gap > spread else "within"
        lines.append(f"It leads `{sch}` by {gap:+.3f}, {verdict} one standard deviation over seeds "
                     f"({spread:.3f})." if spread > 0 else f"It leads `{sch}` by {gap:+.3f} (one seed: no spread).")
    if smallest != largest:
        low = sorted(((m, sch) for sch in s.schemes
                      if (m := mean_std(a.best for a in s.select(sch, smallest))[0]) is not None), reverse=True)
        if len(low) > 1:
            lines.append(f"With n_train = {smallest}, `{low[0][1]}` is best ({low[0][0]:.3f}), "
                         f"{low[0][0] - low[1][0]:+.3f} ahead of `{low[1][1]}`.")
    fastest = []
    for sch in s.schemes:
        arms = s.select(sch, largest)
        reached = [a.epochs_to_threshold for a in arms if a.epochs_to_threshold is not None]
        fastest.append((statistics.fmean(reached) if reached else math.inf, len(reached), len(arms), sch))
    fastest.sort()
    if math.isfinite(fastest[0][0]):
        lines.append(f"`{fastest[0][3]}` reaches {s.metric} >= {s.threshold:g} first, after "
                     f"{fastest[0][0]:.1f} epochs on average ({fastest[0][1]} of {fastest[0][2]} seeds reached it).")
    else:
        lines.append(f"No run reached {s.metric} >= {s.threshold:g} at n_train = {largest}.")
    lines += _coarse_exit_lines(s)
    lines += _lesion_caveats(s)
    if len(seeds) < 2:
        lines.append("Only one seed was run: treat these differences as anecdotal.")
    if current_default:
        lines.append(f"The configured default (`loss.scheme: {current_default}` in configs/defaults.yaml) "
                     + ("agrees with this." if current_default == winner else
                        f"differs: these numbers favour `{winner}`."))
    return winner, lines


def _coarse_exit_lines(s: Summary) -> list[str]:
    """A sentence per scheme whose best coarser exit has a higher mean test Dice than its full-resolution head
    (models of the largest n_train with early exits), with the lesion precision of the metric's class beside it
    when evaluated: a coarse head that merges or drops small false positives can outscore the fine one."""
    cls = metric_class(s.metric)[0]
    out = []
    for sch in s.schemes:
        rows = [e for e in s.early_exit if e.scheme == sch]
        if not rows:
            continue
        n = max(e.n_train for e in rows)
        at = {level: [e for e in rows if e.n_train == n and e.level == level] for level in {e.level for e in rows}}
        dice = {level: mean_std(e.dice for e in exits)[0] for level, exits in at.items()}
        full = dice.get(0)
        better = [(d, level) for level, d in dice.items() if level > 0 and d is not None and full is not None
                  and d > full]
        if not better:
            continue
        best, level = max(better)
        precision = [mean_std(e.lesion_precision.get(cls) for e in at[k])[0] for k in (level, 0)]
        extra = (f"; {cls} lesion precision {precision[0]:.3f} vs {precision[1]:.3f}"
                 if None not in precision else "")
        out.append(f"On the test images `{sch}`'s exit level {level} scores a higher Dice than its full-resolution "
                   f"head ({best:.3f} vs {full:.3f}, n_train = {n}{extra}).")
    return out


def _lesion_caveats(s: Summary) -> list[str]:
    """A sentence per lesion class that the full-resolution models of every arm mostly miss on the test images:
    a Dice ranking of such models says little about that class."""
    full = [e for e in s.early_exit if e.level == 0]
    cls = metric_class(s.metric)[0]
    out = []
    for name in sorted({k for e in full for k in e.lesion_recall}):
        recalls = [r for e in full if (r := e.lesion_recall.get(name)) is not None]
        if recalls and max(recalls) < LOW_LESION_RECALL:
            about = (f"the Dice above is that of models that miss most {name} lesions" if name == cls else
                     f"this ranking is about {cls or 'the mean over classes'}, not {name}")
            out.append(f"On the test images the full-resolution models find few {name} lesions (lesion recall at "
                       f"most {max(recalls):.2f} over every scheme and seed): {about}.")
    return out
