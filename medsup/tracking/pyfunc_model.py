"""The MLflow pyfunc face of a medsup model bundle, logged with MLflow's models-from-code.

MLflow copies this file into the logged model (``code/pyfunc_model.py``) together with the medsup package
(``code/medsup``) and the bundle folder (``artifacts/<bundle>``); loading it executes this file, so no
pickled Python object is ever stored or unpickled. Keep the top of this file light: it is executed at
log time too (MLflow loads it to validate it), so medsup's inference stack is imported only when a model
is loaded.

Input (``predict``): image paths (NIfTI, NRRD, MHA), as

- a pandas DataFrame with a ``path`` column (or a single unnamed column), optionally an ``output_dir``
  column that sends each row to its own folder, or
- a list of strings (or one string).

Output folder, first found: ``params={"output_dir": ...}``, the row's ``output_dir`` column,
``$MEDSUP_OUTPUT_DIR``, ``./medsup-predictions``.

Output: a DataFrame with one row per image, in input order (grouped by output folder when rows name
different ones): ``input``, ``output``, ``status``, ``error``. A missing or unreadable image is an
``error`` row, not a failed request.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import mlflow.models
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

log = logging.getLogger(__name__)

BUNDLE_ARTIFACT = "bundle"  # key of the bundle folder in the logged model's artifacts
OUTPUT_ENV = "MEDSUP_OUTPUT_DIR"
DEFAULT_OUTPUT_DIR = "medsup-predictions"
COLUMNS = ("input", "output", "status", "error")


def parse_input(model_input: Any, params: dict[str, Any] | None = None) -> list[tuple[Path, Path]]:
    """Normalise pyfunc input to ``(image path, output folder)`` pairs, in input order.

    Raises:
        ValueError: input that is neither paths nor a DataFrame of paths.
    """
    param_dir = str((params or {}).get("output_dir") or "").strip()  # "" is the params schema's "unset"
    fallback = Path(param_dir or os.environ.get(OUTPUT_ENV) or DEFAULT_OUTPUT_DIR)
    if isinstance(model_input, str | os.PathLike):
        model_input = [model_input]
    if isinstance(model_input, dict) and "path" in model_input:
        model_input = pd.DataFrame({k: v if isinstance(v, list) else [v] for k, v in model_input.items()})
    if isinstance(model_input, pd.Series):
        model_input = model_input.to_frame("path")
    if isinstance(model_input, pd.DataFrame):
        if "path" in model_input.columns:
            paths = model_input["path"].tolist()
        elif len(model_input.columns) == 1:  # a plain list sent as JSON "inputs" may arrive as column 0
            paths = model_input.iloc[:, 0].tolist()
        else:
            raise ValueError(f"input DataFrame needs a 'path' column; it has {list(model_input.columns)}")
        if "output_dir" in model_input.columns and not param_dir:
            dirs = [_cell(d) for d in model_input["output_dir"].tolist()]
            return [(Path(_path(p)), Path(d) if d else fallback) for p, d in zip(paths, dirs, strict=True)]
        return [(Path(_path(p)), fallback) for p in paths]
    if isinstance(model_input, list | tuple):
        return [(Path(_path(p)), fallback) for p in model_input]
    raise ValueError(f"expected image paths (a list of str, or a DataFrame with a 'path' column), "
                     f"got {type(model_input).__name__}")


def _path(value: Any) -> str:
    text = _cell(value)
    if not text:
        raise ValueError(f"empty or missing image path: {value!r}")
    return text


def _cell(value: Any) -> str:
    """A DataFrame cell as text; None/NaN (a missing optional value) as ''."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


class MedsupSegmenter(PythonModel):
    """Segment CT images with the bundle logged next to this file (see the module docstring)."""

    def __init__(self) -> None:
        self.bundle_dir: Path | None = None

    def load_context(self, context: PythonModelContext) -> None:
        """Find the bundle folder (weights.pt + plan.json) among the model's artifacts."""
        folder = Path(context.artifacts[BUNDLE_ARTIFACT])
        if not (folder / "weights.pt").is_file() or not (folder / "plan.json").is_file():
            raise FileNotFoundError(f"{folder}: the model's bundle lacks weights.pt or plan.json")
        self.bundle_dir = folder
        log.info("medsup bundle at %s", folder)

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Segment every input image; one row per image (see the module docstring).

        Rows come in input order, grouped by output folder when rows name different ones. A path that
        cannot be read gives an ``error`` row; the other images are still segmented.

        The ``pd.DataFrame`` hint is deliberate: MLflow infers no signature from it (the logged one, with
        its ``output_dir`` param, stays in force) and does not coerce input, so lists still reach us.
        """
        if self.bundle_dir is None:
            raise RuntimeError("load_context was not called: no bundle loaded")
        # one predict_files call per output folder, so the bundle's network is built once per folder
        groups: dict[Path, list[Path]] = {}
        for path, out in parse_input(model_input, params):
            groups.setdefault(out, []).append(path)
        rows: list[dict[str, Any]] = []
        for out, paths in groups.items():
            out.mkdir(parents=True, exist_ok=True)
            rows.extend(self._predict(paths, out))
        return pd.DataFrame([{c: _text(r.get(c)) for c in COLUMNS} for r in rows], columns=list(COLUMNS))

    def _predict(self, paths: list[Path], out: Path) -> list[dict[str, Any]]:
        from medsup.inference.api import predict_files  # heavy (torch, MONAI): only when predicting

        assert self.bundle_dir is not None
        try:
            return predict_files(self.bundle_dir, paths, out)
        except (OSError, ValueError) as err:
            # a missing or unreadable path refuses the whole list up front: isolate it, keep the rest
            if len(paths) == 1:
                log.warning("%s: %s", paths[0], err)
                return [{"input": str(paths[0]), "output": None, "status": "error", "error": str(err)}]
            return [row for path in paths for row in self._predict([path], out)]


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


mlflow.models.set_model(MedsupSegmenter())
