"""``medsup data check``: find every bad case of a dataset before training meets it.

Per case: image and label both exist and are readable, 3-D, single-channel; they agree on shape, spacing,
origin and direction (within ``data.geometry_tolerance``); the image has no NaN/Inf; the label holds only
integer values the task defines. All problems of all cases are collected; nothing stops at the first.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import medsup
from medsup.config import Config
from medsup.data.datalist import Case, Problem, load_datalist
from medsup.data.geometry import Geometry
from medsup.data.io import ImageReadError, read_header, read_image
from medsup.data.memo import CaseMemo
from medsup.tasks import get_task

log = logging.getLogger(__name__)


@dataclass
class CaseStats:
    """What a good case contributes to the summary."""

    case_id: str
    geometry: Geometry
    label_fractions: dict[int, float]
    hu_range: tuple[float, float]


@dataclass
class CheckReport:
    """Result of checking a dataset: per-case problems and a summary of the good cases."""

    root: Path
    task: str
    layout: str
    num_cases: int
    num_test: int
    problems: list[Problem] = field(default_factory=list)
    stats: list[CaseStats] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no case has a problem and there is at least one case."""
        return not self.problems and self.num_cases > 0

    @property
    def bad_cases(self) -> list[str]:
        """Ids of the cases with problems, sorted, each once."""
        return sorted({p.case_id for p in self.problems})

    def summary(self) -> dict[str, Any]:
        """Spacing/shape min/median/max per axis, orientations, mean label voxel fraction per class."""
        if not self.stats:
            return {}
        spacing = np.array([s.geometry.spacing for s in self.stats])
        shape = np.array([s.geometry.shape for s in self.stats])
        labels = sorted({k for s in self.stats for k in s.label_fractions})
        orientations: dict[str, int] = {}
        for s in self.stats:
            orientations[s.geometry.orientation] = orientations.get(s.geometry.orientation, 0) + 1

        def mmm(a: np.ndarray) -> dict[str, list[float]]:
            return {k: np.round(f(a, axis=0), 4).tolist() for k, f in
                    (("min", np.min), ("median", np.median), ("max", np.max))}

        return {
            "spacing_mm": mmm(spacing),
            "shape": mmm(shape),
            "orientations": orientations,
            "label_voxel_fraction": {
                str(k): float(np.mean([s.label_fractions.get(k, 0.0) for s in self.stats])) for k in labels
            },
            "cases_with_label": {
                str(k): int(sum(s.label_fractions.get(k, 0.0) > 0 for s in self.stats)) for k in labels
            },
            "hu_min": float(min(s.hu_range[0] for s in self.stats)),
            "hu_max": float(max(s.hu_range[1] for s in self.stats)),
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready report (what ``--json`` prints)."""
        return {
            "root": str(self.root),
            "task": self.task,
            "layout": self.layout,
            "ok": self.ok,
            "cases": self.num_cases,
            "good_cases": len(self.stats),
            "test_images": self.num_test,
            "bad_cases": self.bad_cases,
            "problems": [{"case": p.case_id, "problem": p.message} for p in self.problems],
            "summary": self.summary(),
        }

    def render(self) -> str:
        """Human-readable report."""
        lines = [f"{self.root} ({self.layout} layout, task {self.task}): {self.num_cases} training cases, "
                 f"{self.num_test} test images, {len(self.stats)} good"]
        s = self.summary()
        if s:
            for key, unit in (("spacing_mm", " mm"), ("shape", "")):
                parts = ", ".join(f"{k} {v}" for k, v in s[key].items())
                lines.append(f"  {key.split('_')[0]}{unit}: {parts}")
            lines.append("  orientations: " + ", ".join(f"{k} x{v}" for k, v in s["orientations"].items()))
            lines.append("  label voxel fraction (mean): " + ", ".join(
                f"{k}: {v:.4f} (in {s['cases_with_label'][k]} cases)" for k, v in s["label_voxel_fraction"].items()))
            lines.append(f"  HU range: {s['hu_min']:.0f} .. {s['hu_max']:.0f}")
        if self.problems:
            lines.append(f"{len(self.bad_cases)} bad case(s):")
            lines += [f"  {p.case_id}: {p.message}" for p in self.problems]
        elif self.num_cases == 0:
            lines.append("no training cases found")
        else:
            lines.append("all cases OK")
        return "\n".join(lines)


def check_case(case: Case, allowed: set[int], tol: float) -> tuple[list[str], CaseStats | None]:
    """Check one case; returns its problems (empty when good) and, when good, its statistics."""
    problems: list[str] = []
    try:
        image_header = read_header(case.image)
    except ImageReadError as err:
        problems.append(f"image: {err}")
        image_header = None
    label_header = None
    if case.label is None:
        problems.append(f"no label for image {case.image}")
    else:
        try:
            label_header = read_header(case.label)
        except ImageReadError as err:
            problems.append(f"label: {err}")
    if image_header is not None and label_header is not None:
        mismatch = image_header.geometry.mismatches(label_header.geometry, tol)
        if mismatch:
            problems.append(f"image {case.image} and label {case.label} geometry differ: {'; '.join(mismatch)}")
    if problems:
        return problems, None
    assert case.label is not None and image_header is not None
    try:
        image = read_image(case.image)
        label = read_image(case.label)
    except ImageReadError as err:
        return [str(err)], None
    if np.issubdtype(image.array.dtype, np.floating) and not np.isfinite(image.array).all():
        bad = int(np.size(image.array) - np.isfinite(image.array).sum())
        problems.append(f"image {case.image} has {bad} NaN/Inf voxels")
    values, counts = np.unique(label.array, return_counts=True)
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            problems.append(f"label {case.label} has NaN/Inf voxels")
            return problems, None
        fractional = values[values != np.round(values)]
        if fractional.size:
            problems.append(f"label {case.label} has non-integer values {_few(fractional)}; labels must be integers")
    unknown = [v for v in values.tolist() if v not in allowed]
    if unknown:
        problems.append(f"label {case.label} has values {_few(np.asarray(unknown))} outside the task's "
                        f"{sorted(allowed)}")
    if problems:
        return problems, None
    total = float(label.array.size)
    fractions = {int(v): float(c) / total for v, c in zip(values.tolist(), counts.tolist(), strict=True)}
    hu = (float(image.array.min()), float(image.array.max()))
    return [], CaseStats(case.case_id, image_header.geometry, fractions, hu)


def _check_safely(case: Case, allowed: set[int], tol: float,
                  memo: CaseMemo | None = None) -> tuple[list[str], CaseStats | None]:
    """:func:`check_case`, with a failure nobody foresaw reported against its case instead of ending the check;
    a case that passed before with the same files and settings is taken from ``memo`` without reading it."""
    settings = {"allowed": sorted(allowed), "tolerance": tol, "medsup": medsup.__version__}
    if memo is not None and (hit := memo.get("check", case, settings)) is not None:
        record = hit[0]
        return [], CaseStats(case.case_id, Geometry.from_dict(record["geometry"]),
                             {int(k): v for k, v in record["fractions"].items()}, (record["hu"][0], record["hu"][1]))
    try:
        problems, stats = check_case(case, allowed, tol)
        if memo is not None and stats is not None:  # only a pass is memoised: a problem is read again each time
            memo.put("check", case, settings, {"geometry": stats.geometry.as_dict(), "hu": list(stats.hu_range),
                                               "fractions": {str(k): v for k, v in stats.label_fractions.items()}})
        return problems, stats
    except Exception as err:  # MemoryError included: one huge case must not hide the others' problems
        log.exception("%s: unexpected failure while checking", case.case_id)
        return [f"{case.image}: unexpected {type(err).__name__} while checking: {err}"], None


def _few(values: np.ndarray, n: int = 6) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:n].tolist())
    return f"[{shown}{', ...' if values.size > n else ''}]"


def check_dataset(root: Path | str, cfg: Config, memo: CaseMemo | None = None) -> CheckReport:
    """Check every case of the dataset at ``root`` for ``cfg.task`` (cases that passed before with the same
    files are taken from ``memo`` when given: see :mod:`medsup.data.memo`).

    Raises:
        FileNotFoundError: the folder is missing or holds no recognisable layout.
    """
    datalist = load_datalist(root)
    task = get_task(cfg.task)
    allowed = set(task.labels)
    report = CheckReport(Path(root), task.name, datalist.layout, len(datalist.training), len(datalist.test))
    report.problems.extend(datalist.problems)
    already_bad = {p.case_id for p in datalist.problems}
    to_check = [c for c in datalist.training if c.label is not None or c.case_id not in already_bad]
    with ThreadPoolExecutor(max_workers=cfg.data.check_workers) as pool:
        results = list(pool.map(lambda c: _check_safely(c, allowed, cfg.data.geometry_tolerance, memo), to_check))
    for case, (problems, stats) in zip(to_check, results, strict=True):
        report.problems.extend(Problem(case.case_id, m) for m in problems)
        if stats is not None:
            report.stats.append(stats)
    for test_case in datalist.test:
        try:
            read_header(test_case.image)
        except ImageReadError as err:
            report.problems.append(Problem(test_case.case_id, f"test image: {err}"))
    report.problems.sort(key=lambda p: p.case_id)
    log.debug("checked %d cases under %s: %d problems", len(to_check), root, len(report.problems))
    return report
