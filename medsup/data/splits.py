"""Deterministic seeded k-fold splits (``splits.json``), nnU-Net style: sorted ids, seeded shuffle, k folds.

:func:`fold_split` is what training uses: the folds from ``data.split_seed`` (else ``seed``), the fold
``data.fold``, and at most ``data.max_train_cases`` of its training cases. The subset is drawn in a seeded
order, so smaller sizes are nested in larger ones, and the validation cases are never touched: a
training-set-size ablation compares every size on the same validation set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsup.data.datalist import load_datalist
from medsup.data.files import atomic_path

if TYPE_CHECKING:
    from medsup.config import Config

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


def split_seed(cfg: Config) -> int:
    """The seed of the k-fold split: ``data.split_seed``, else the global ``seed``."""
    return cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed


def limit_training(split: Split, max_cases: int | None, seed: int) -> Split:
    """``split`` with at most ``max_cases`` training cases (sorted), its validation cases unchanged.

    The cases kept are the first ``max_cases`` of a permutation seeded by ``seed`` alone, so for one seed
    the subset for N cases contains the subset for any smaller N.
    """
    train = sorted(split["train"])
    if max_cases is None or max_cases >= len(train):
        return {"train": train, "val": list(split["val"])}
    order = np.random.default_rng(seed).permutation(len(train))
    return {"train": sorted(train[i] for i in order[:max_cases]), "val": list(split["val"])}


def fold_split(case_ids: list[str], cfg: Config) -> tuple[list[Split], int, Split]:
    """The splits of ``case_ids`` under ``cfg``, the fold used and its (size-limited) split.

    Returns:
        ``(splits, fold, split)``: all folds (for ``splits.json``), ``data.fold`` clamped to the folds that
        exist (a dataset smaller than ``data.num_folds`` has fewer), and that fold's split with at most
        ``data.max_train_cases`` training cases (see :func:`limit_training`).
    """
    seed = split_seed(cfg)
    splits = make_splits(case_ids, cfg.data.num_folds, seed)
    fold = min(cfg.data.fold, len(splits) - 1)
    return splits, fold, limit_training(splits[fold], cfg.data.max_train_cases, seed)


def fold_cases(root: Path | str, cfg: Config) -> dict[str, Any]:
    """The cases ``medsup train`` uses for ``cfg``'s fold of the dataset at ``root`` (``medsup data split``).

    Returns:
        ``{"fold", "num_folds", "train": [...], "val": [...]}``, each case ``{"case", "image", "label"}`` with
        absolute paths.

    Raises:
        FileNotFoundError: no dataset at ``root``.
        ValueError: an unreadable dataset, or no labelled case in it.
    """
    cases = {c.case_id: c for c in load_datalist(root).labelled}
    if not cases:
        raise ValueError(f"{root}: no labelled training cases")
    splits, fold, split = fold_split(sorted(cases), cfg)

    def rows(ids: list[str]) -> list[dict[str, str]]:
        return [{"case": i, "image": str(cases[i].image.resolve()), "label": str(Path(str(cases[i].label)).resolve())}
                for i in ids]

    return {"fold": fold, "num_folds": len(splits), "train": rows(split["train"]), "val": rows(split["val"])}


def save_splits(splits: list[Split], path: Path | str) -> Path:
    """Write ``splits.json`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(splits, indent=2) + "\n", encoding="utf-8")
    return path


def load_splits(path: Path | str) -> list[Split]:
    """Read ``splits.json``; a malformed file raises a ValueError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in data):
            raise ValueError("expected a list of {train, val} objects")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a valid splits file ({err})") from None
    return data
