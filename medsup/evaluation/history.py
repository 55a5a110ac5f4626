"""A run folder's JSON records, rewritten atomically by training (rank 0):

- ``history.json`` after every epoch: one object per epoch, ``{"epoch": 1.0, "train.loss.total": ...,
  "val.dice.liver": ...}``, the same points the MLflow run receives;
- ``validation.json`` after every validation: the last validation per case (:func:`validation_rows`),
  ``[{"case", "image", "label", "dice": {class: value}, "voxels": {class: {"tp", "predicted", "reference"}},
  "lesions": {lesion class: counts}}]`` (what ``medsup figures --run DIR --cases`` redraws the case figures
  from).

Non-finite values are stored as ``null`` (strict JSON) and read back as NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medsup.data.files import write_json

HISTORY = "history.json"
VALIDATION = "validation.json"


def _write(path: Path, rows: list[Any]) -> Path:
    return write_json(path, rows, indent=1)


def write_history(path: Path, history: Sequence[dict[str, float]]) -> Path:
    """Write ``history`` to ``path`` atomically (NaN/Inf as ``null``)."""
    return _write(path, list(history))


def write_validation(path: Path, cases: Sequence[dict[str, Any]]) -> Path:
    """Write the last validation's per-case results (``case``, ``image``, ``label``, ``dice`` by class)."""
    return _write(path, list(cases))


def validation_rows(results: Sequence[dict[str, Any]], cases_by_image: Mapping[str, Any],
                    names: Sequence[str]) -> list[dict[str, Any]]:
    """:func:`medsup.engine.validation.validate`'s results as ``validation.json`` rows: case id (from
    ``cases_by_image``: image path -> datalist case), image and label paths, Dice by class name (``names``:
    the foreground classes in order), the voxel counts behind it (true positives, predicted, reference: what a
    global Dice sums) and, for lesion classes, the lesion-wise detection counts."""
    rows = []
    for r in results:
        case = cases_by_image.get(r["case"])
        rows.append({"case": case.case_id if case else r["case"], "image": r["case"],
                     "label": str(case.label) if case else "", "dice": dict(zip(names, r["dice"], strict=True)),
                     "voxels": {n: dict(zip(("tp", "predicted", "reference"), c, strict=True))
                                for n, c in zip(names, r["counts"], strict=True)},
                     "lesions": {n: c for n, c in zip(names, r.get("lesions") or [None] * len(names), strict=True)
                                 if c is not None}})
    return rows


def read_validation(run_dir: Path) -> list[dict[str, Any]]:
    """``<run_dir>/validation.json`` with ``null`` Dice read back as NaN.

    Raises:
        FileNotFoundError: the run has not validated yet (or predates the file).
    """
    path = Path(run_dir) / VALIDATION
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-case validation results (a run folder of this medsup version "
                                "that validated at least once has it)")
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [{**r, "dice": {k: (math.nan if v is None else float(v)) for k, v in r.get("dice", {}).items()}}
            for r in rows]


def read_history(run_dir: Path) -> list[dict[str, float]]:
    """A run folder's history: ``history.json``, else the one saved in ``checkpoints/last.pt``.

    Raises:
        FileNotFoundError: the folder has neither.
        ValueError: ``history.json`` is not a list of objects.
    """
    path = Path(run_dir) / HISTORY
    if path.is_file():
        rows: Any = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: expected a JSON list of per-epoch objects")
        return [{k: (math.nan if v is None else float(v)) for k, v in r.items()} for r in rows]
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if last.is_file():
        from medsup.checkpoint import load_checkpoint  # torch: only for runs that predate history.json

        return [dict(h) for h in load_checkpoint(last).get("history", [])]
    raise FileNotFoundError(f"{run_dir}: no {HISTORY} and no checkpoints/last.pt (is it a medsup run folder?)")
