"""Deterministic seeded k-fold splits (``splits.json``), nnU-Net style: sorted ids, seeded shuffle, k folds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medsup.data.io import atomic_path

Split = dict[str, list[str]]


def make_splits(case_ids: list[str], num_folds: int, seed: int) -> list[Split]:
    """Split ``case_ids`` into ``num_folds`` folds of ``{"train": [...], "val": [...]}``.

    Deterministic: the same ids (in any order), k and seed give the same folds. With fewer cases than
    folds, k drops to the number of cases; a single case trains and validates on itself.
    """
    ids = sorted(set(case_ids))
    if not ids:
        raise ValueError("cannot split an empty dataset")
    if len(ids) == 1:
        return [{"train": ids, "val": ids}]
    k = max(2, min(num_folds, len(ids))) if num_folds > 1 else 1
    if k == 1:
        return [{"train": ids, "val": ids}]
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = np.array_split(order, k)
    return [
        {
            "train": sorted(ids[i] for j, f in enumerate(folds) if j != v for i in f),
            "val": sorted(ids[i] for i in folds[v]),
        }
        for v in range(k)
    ]


def save_splits(splits: list[Split], path: Path | str) -> Path:
    """Write ``splits.json`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(splits, indent=2) + "\n")
    return path


def load_splits(path: Path | str) -> list[Split]:
    """Read ``splits.json``; a malformed file raises a ValueError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in data):
            raise ValueError("expected a list of {train, val} objects")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a valid splits file ({err})") from None
    return data
