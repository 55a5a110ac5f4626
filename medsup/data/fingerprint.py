"""Dataset fingerprint (spacings, shapes, foreground HU statistics) and ``medsup plan``.

The fingerprint is computed after exact reorientation to ``data.orientation``, so spacings and shapes are
in the axis order training will see. Foreground HU statistics sample up to ``data.fingerprint_samples``
labelled voxels per case (nnU-Net: 10,000), skipping scanner padding below ``data.ct_padding_threshold``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import medsup
from medsup.config import Config
from medsup.data.datalist import Case, load_datalist
from medsup.data.files import atomic_path
from medsup.data.io import ImageReadError, read_image
from medsup.data.memo import CaseMemo
from medsup.data.planning import Plan, make_plan
from medsup.data.splits import make_splits, save_splits, split_seed

log = logging.getLogger(__name__)


def case_fingerprint(case: Case, cfg: Config, index: int) -> dict[str, Any]:
    """Spacing, shape, per-class voxel counts and a foreground HU sample of one case."""
    assert case.label is not None
    image = read_image(case.image, cfg.data.orientation)
    label = read_image(case.label, cfg.data.orientation)
    if image.array.shape != label.array.shape:
        raise ImageReadError(f"{case.label}: shape {label.array.shape} differs from image {image.array.shape}")
    fg = (label.array > 0) & (image.array > cfg.data.ct_padding_threshold)
    values = image.array[fg]
    rng = np.random.default_rng([cfg.seed, index])
    n = min(cfg.data.fingerprint_samples, values.size)
    sample = rng.choice(values, size=n, replace=False) if n else values[:0]
    classes, counts = np.unique(label.array, return_counts=True)
    return {
        "case_id": case.case_id,
        "spacing": list(image.geometry.spacing),
        "shape": list(image.geometry.shape),
        "class_voxels": {str(int(c)): int(k) for c, k in zip(classes, counts, strict=True)},
        "sample": sample.astype(np.float32),
    }


def fingerprint_dataset(root: Path | str, cfg: Config, memo: CaseMemo | None = None) -> dict[str, Any]:
    """Fingerprint every labelled training case of ``root`` (a case fingerprinted before with the same files
    and settings is taken from ``memo`` when given: see :mod:`medsup.data.memo`).

    Returns:
        ``{"cases", "spacings" (N,3), "shapes" (N,3), "foreground": {p0.5, p99.5, mean, std, median},
        "class_voxels", "hash"}``; ``hash`` identifies the data (a sha256 of the rest).

    Raises:
        ValueError: no labelled case, or unreadable cases (all of them named).
    """
    datalist = load_datalist(root)
    cases = sorted(datalist.labelled, key=lambda c: c.case_id)
    if not cases:
        raise ValueError(f"{root}: no training case with a label (run `medsup data check {root}`)")

    def one(item: tuple[int, Case]) -> dict[str, Any] | str:
        index, case = item
        # the sample is drawn with (seed, index): a case at another index draws another sample
        settings = {"orientation": cfg.data.orientation, "ct_padding_threshold": cfg.data.ct_padding_threshold,
                    "samples": cfg.data.fingerprint_samples, "seed": cfg.seed, "index": index,
                    "medsup": medsup.__version__}
        if memo is not None and (hit := memo.get("fingerprint", case, settings)) is not None:
            return {**hit[0], "sample": hit[1]["sample"]}
        try:
            result = case_fingerprint(case, cfg, index)
        except ImageReadError as err:
            return f"{case.case_id}: {err}"
        if memo is not None:
            memo.put("fingerprint", case, settings, {k: v for k, v in result.items() if k != "sample"},
                     {"sample": result["sample"]})
        return result

    with ThreadPoolExecutor(max_workers=cfg.data.check_workers) as pool:
        results = list(pool.map(one, enumerate(cases)))
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        raise ValueError("cannot fingerprint the dataset:\n  " + "\n  ".join(errors))
    per_case = [r for r in results if isinstance(r, dict)]
    samples = np.concatenate([r.pop("sample") for r in per_case])
    if samples.size == 0:
        raise ValueError(f"{root}: no foreground voxels in any label; cannot derive CT normalisation")
    lo, hi = np.percentile(samples, [0.5, 99.5])
    fingerprint: dict[str, Any] = {
        "orientation": cfg.data.orientation,
        "cases": [r["case_id"] for r in per_case],
        "spacings": [r["spacing"] for r in per_case],
        "shapes": [r["shape"] for r in per_case],
        "class_voxels": {r["case_id"]: r["class_voxels"] for r in per_case},
        "foreground": {
            "p0.5": float(lo), "p99.5": float(hi), "mean": float(samples.mean()), "std": float(samples.std()),
            "median": float(np.median(samples)), "samples": int(samples.size),
        },
    }
    fingerprint["hash"] = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return fingerprint


def plan_dataset(root: Path | str, cfg: Config, out: Path | str | None = None, memo: CaseMemo | None = None) -> Plan:
    """Fingerprint, plan and split ``root``; write plan.json, fingerprint.json and splits.json beside ``out``.

    Args:
        out: plan path; default ``root/plan.json``.
    """
    fingerprint = fingerprint_dataset(root, cfg, memo)
    plan = make_plan(cfg, fingerprint)
    out = Path(out) if out is not None else Path(root) / "plan.json"
    try:
        plan.save(out)
        with atomic_path(out.parent / "fingerprint.json") as tmp:
            tmp.write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
        save_splits(make_splits(fingerprint["cases"], cfg.data.num_folds, split_seed(cfg)),
                    out.parent / "splits.json")
    except OSError as err:
        raise ValueError(f"cannot write the plan to {out.parent}: {err.strerror or err}; use --out") from None
    log.info("wrote %s, fingerprint.json and splits.json", out)
    return plan
