"""Batch inference over files, folders, globs or path lists, robust to bad cases.

- The next case is read and preprocessed in a background thread while the current one is on the device.
- A bad case (unreadable, 2-D, 4-D, NaN, ...) is reported and skipped; the rest go on (``fail_fast`` stops).
- Outputs are written atomically (temp file + rename): Ctrl-C or a kill leaves no partial file, and
  ``resume`` skips cases whose output exists with the input's exact geometry.
- The JSON report is rewritten atomically after every case, so even a killed job leaves one.
"""

from __future__ import annotations

import glob
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsup.data.io import (
    ImageReadError,
    atomic_path,
    image_suffix,
    is_image_path,
    read_header,
    strip_suffix,
    write_image,
)
from medsup.inference.predictor import CaseError, Predictor, Prepared

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseJob:
    """One input and where its output goes."""

    input: Path
    output: Path


@dataclass
class BatchReport:
    """What a batch run did, case by case (the JSON report)."""

    header: dict[str, Any]
    cases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Cases that did not succeed."""
        return [c for c in self.cases if c["status"] == "error"]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready report."""
        counts = {s: sum(1 for c in self.cases if c["status"] == s) for s in ("ok", "skipped", "error")}
        return {**self.header, "summary": counts, "cases": self.cases}

    def write(self, path: Path) -> None:
        """Atomically (re)write the report."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.as_dict(), indent=2, default=str) + "\n")


def discover_inputs(spec: str | Path, recursive: bool = False) -> list[tuple[Path, Path]]:
    """Expand an input spec into ``(path, base)`` pairs; ``base`` anchors relative output names.

    ``spec`` may be an image file, a DICOM series folder, a folder of images (and DICOM series
    sub-folders; ``recursive`` descends further), a glob pattern, or a ``.txt`` file listing paths.
    """
    spec = Path(spec)
    if spec.is_file() and spec.suffix == ".txt":
        lines = [ln.strip() for ln in spec.read_text().splitlines()]
        return [(Path(ln), Path(ln).parent) for ln in lines if ln and not ln.startswith("#")]
    if spec.is_file():
        return [(spec, spec.parent)]
    if spec.is_dir():
        if is_image_path(spec) and not any(image_suffix(p) for p in spec.iterdir()):
            return [(spec, spec.parent)]  # the folder itself is a DICOM series
        return [(p, spec) for p in _walk(spec, recursive)]
    matches = sorted(glob.glob(str(spec), recursive=True))
    if matches:
        return [(Path(m), Path(m).parent) for m in matches]
    raise FileNotFoundError(f"{spec}: no such file, folder or matching glob")


def _walk(folder: Path, recursive: bool) -> Iterator[Path]:
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and image_suffix(entry):
            yield entry
        elif entry.is_dir():
            if is_image_path(entry):
                yield entry  # a DICOM series folder is one case
            elif recursive:
                yield from _walk(entry, recursive)


def plan_outputs(inputs: list[tuple[Path, Path]], out_dir: Path, fmt: str = "nii.gz") -> list[CaseJob]:
    """Output path per input: ``OUT/<relative folder>/<name>.<fmt>`` (``fmt="keep"``: the input's suffix).

    Raises:
        ValueError: an output would overwrite an input, escape ``out_dir``, or collide with another.
    """
    jobs: list[CaseJob] = []
    seen: dict[Path, Path] = {}
    resolved_inputs = {p.resolve() for p, _ in inputs}
    out_root = out_dir.resolve()
    for path, base in inputs:
        suffix = image_suffix(path) if fmt == "keep" and image_suffix(path) else "." + fmt.lstrip(".")
        try:
            rel = path.parent.relative_to(base) if path.is_file() or not is_image_path(path) else Path()
        except ValueError:
            rel = Path()
        name = strip_suffix(path) if path.is_file() else path.name
        name = name.removesuffix("_0000")
        target = (out_dir / rel / f"{name}{suffix}").resolve()
        if not target.is_relative_to(out_root):
            raise ValueError(f"{path}: output name {target} would escape the output folder {out_root}")
        if target in resolved_inputs:
            raise ValueError(f"{path}: output {target} would overwrite an input; choose another output folder")
        if target in seen:
            raise ValueError(f"{path} and {seen[target]} would both write {target}")
        seen[target] = path
        jobs.append(CaseJob(path, target))
    return jobs


def output_complete(job: CaseJob) -> bool:
    """True when ``job.output`` exists, is readable and has exactly the input's grid (``--resume``)."""
    if not job.output.is_file():
        return False
    try:
        return not read_header(job.output).geometry.mismatches(read_header(job.input).geometry, 1e-4)
    except ImageReadError:
        return False


def run_batch(predictor: Predictor, jobs: list[CaseJob], report: BatchReport, report_path: Path | None, *,
              resume: bool = False, fail_fast: bool = False, progress: Any = None) -> BatchReport:
    """Predict every job in order, prefetching the next case while the current one runs."""
    todo = []
    for job in jobs:
        if resume and output_complete(job):
            report.cases.append({"input": str(job.input), "output": str(job.output), "status": "skipped",
                                 "reason": "output exists with the input's geometry (--resume)"})
        else:
            todo.append(job)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsup-prefetch") as pool:
        pending: Future[Prepared] | None = pool.submit(predictor.prepare, todo[0].input) if todo else None
        for i, job in enumerate(todo):
            assert pending is not None
            current = pending
            pending = pool.submit(predictor.prepare, todo[i + 1].input) if i + 1 < len(todo) else None
            entry = _one(predictor, job, current)
            report.cases.append(entry)
            if report_path is not None:
                report.write(report_path)
            if progress is not None:
                progress(entry)
            if entry["status"] == "error" and fail_fast:
                if pending is not None:
                    pending.cancel()
                log.error("stopping at the first failure (--fail-fast)")
                break
    if report_path is not None:
        report.write(report_path)
    return report


def _one(predictor: Predictor, job: CaseJob, prepared: Future[Prepared]) -> dict[str, Any]:
    entry: dict[str, Any] = {"input": str(job.input), "output": str(job.output)}
    started = time.perf_counter()
    try:
        case = prepared.result()
        prediction = predictor.predict(case)
        t0 = time.perf_counter()
        write_image(job.output, prediction.labels, prediction.geometry)
        if prediction.probability is not None:
            entry["probabilities"] = _write_probabilities(predictor, job, prediction)
        seconds = {**prediction.seconds, "write": time.perf_counter() - t0}
        entry.update({
            "status": "ok", "shape": list(prediction.geometry.shape), "spacing": list(prediction.geometry.spacing),
            "orientation": prediction.geometry.orientation, "seconds": {k: round(v, 4) for k, v in seconds.items()},
            "volumes_ml": {k: round(v, 3) for k, v in prediction.volumes_ml.items()},
        })
        if prediction.exit_level is not None:
            entry["exit_level"] = prediction.exit_level
            entry["note"] = f"early-exit preview from head {prediction.exit_level}: coarser than full inference"
        found = [name for name, ml in prediction.volumes_ml.items() if ml > 0]
        log.info("%s -> %s (%.1f s, found %s)", job.input.name, job.output, time.perf_counter() - started,
                 ", ".join(found) or "no foreground")
    except (CaseError, ImageReadError) as err:  # expected: the message names the file and the problem
        entry.update({"status": "error", "error": str(err)})
        log.error("%s", err)
    except Exception as err:  # anything else still must not stop the batch; keep the type for the report
        entry.update({"status": "error", "error": f"{job.input}: {type(err).__name__}: {err}"})
        log.exception("%s: unexpected failure", job.input)
    entry["seconds_total"] = round(time.perf_counter() - started, 4)
    return entry


def _write_probabilities(predictor: Predictor, job: CaseJob, prediction: Any) -> dict[str, str]:
    """One float32 softmax map per class beside the label file: ``<name>_prob_<class>.nii.gz``."""
    written = {}
    suffix = image_suffix(job.output)
    stem = job.output.name[: -len(suffix)]
    for channel, name in sorted(predictor.bundle.labels.items()):
        path = job.output.with_name(f"{stem}_prob_{name}{suffix}")
        write_image(path, prediction.probability(channel), prediction.geometry)
        written[name] = str(path)
    return written
