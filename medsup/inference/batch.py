"""Batch inference over files, folders, globs or path lists, robust to bad cases.

- The next case is read and preprocessed in a background thread while the current one is on the device, and
  the case before is written in another.
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
from typing import Any, Protocol

from medsup.data.files import IMAGE_SUFFIXES, DiskFullError, atomic_path, image_suffix, real_path, strip_suffix
from medsup.data.io import ImageReadError, is_image_path, read_header, write_image
from medsup.inference.predictor import CaseError, Prediction, Predictor, Prepared
from medsup.inference.window import TileHook

log = logging.getLogger(__name__)


class BatchProgress(Protocol):
    """What a batch run reports as it goes (the CLI draws an overall and a per-case bar from it)."""

    def cases(self, total: int) -> None:
        """The number of cases this run will go through (resumed ones included)."""

    def case_started(self, path: Path) -> None:
        """A case enters the network."""

    def tiles(self, done: int, total: int) -> None:
        """Sliding-window tiles of the current case done so far."""

    def case_finished(self, entry: dict[str, Any]) -> None:
        """A case is done (ok, skipped or error); ``entry`` is its report entry."""


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
        """Cases that did not succeed: failed, or not attempted because the batch stopped (full disk)."""
        return [c for c in self.cases if c["status"] in ("error", "not_run")]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready report."""
        counts = {s: sum(1 for c in self.cases if c["status"] == s) for s in ("ok", "skipped", "error", "not_run")}
        return {**self.header, "summary": counts, "cases": self.cases}

    def write(self, path: Path) -> None:
        """Atomically (re)write the report.

        Raises:
            OSError: naming the report (a failed ``write()`` alone names no file), e.g. on a full disk.
        """
        try:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(self.as_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        except OSError as err:
            raise OSError(err.errno, f"{path}: cannot write the report ({err.strerror or err})") from None


def discover_inputs(spec: str | Path, recursive: bool = False) -> list[tuple[Path, Path]]:
    """Expand an input spec into ``(path, base)`` pairs; ``base`` anchors relative output names.

    ``spec`` may be an image file, a DICOM series folder, a folder of images (and DICOM series
    sub-folders; ``recursive`` descends further), a glob pattern, or a ``.txt`` file listing paths.

    Raises:
        FileNotFoundError: nothing matches, or a folder or list holds no images (an empty batch is a mistake).
    """
    spec = Path(spec)
    if spec.is_file() and spec.suffix == ".txt":
        lines = [ln.strip() for ln in spec.read_text(encoding="utf-8").splitlines()]
        listed = [(Path(ln), Path(ln).parent) for ln in lines if ln and not ln.startswith("#")]
        if not listed:
            raise FileNotFoundError(f"{spec}: the list names no images")
        return listed
    if spec.is_file():
        return [(spec, spec.parent)]
    if spec.is_dir():
        if is_image_path(spec) and not any(image_suffix(p) for p in spec.iterdir()):
            return [(spec, spec.parent)]  # the folder itself is a DICOM series
        found = [(p, spec) for p in _walk(spec, recursive)]
        if not found:
            raise FileNotFoundError(f"{spec}: no images in this folder ({', '.join(IMAGE_SUFFIXES)} or DICOM "
                                    f"series folders{'' if recursive else '; --recursive searches sub-folders'})")
        return found
    matches = sorted(glob.glob(str(spec), recursive=True))
    if matches:
        return [(Path(m), Path(m).parent) for m in matches]
    raise FileNotFoundError(f"{spec}: no such file, folder or matching glob")


def _walk(folder: Path, recursive: bool, seen: set[Path] | None = None) -> Iterator[Path]:
    seen = set() if seen is None else seen
    real = real_path(folder)
    if real in seen:  # a symlink back up the tree: search each folder once instead of ~40 times over
        log.warning("%s: already searched (a symbolic link loop?); skipped", folder)
        return
    seen.add(real)
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if is_image_path(entry):
                yield entry  # a DICOM series folder is one case
            elif recursive:
                yield from _walk(entry, recursive, seen)
        elif image_suffix(entry):
            # a regular file, or a dangling symlink, a symlink loop, a FIFO: reading reports those as bad
            # cases instead of skipping them in silence
            yield entry


def plan_outputs(inputs: list[tuple[Path, Path]], out_dir: Path, fmt: str = "nii.gz") -> list[CaseJob]:
    """Output path per input: ``OUT/<relative folder>/<name>.<fmt>`` (``fmt="keep"``: the input's suffix).

    Raises:
        ValueError: an unknown ``fmt``; an output would overwrite an input, escape ``out_dir``, or collide
            with another; an input (``.``, ``..``) gives no name for its output.
    """
    if fmt != "keep" and "." + fmt.lstrip(".") not in IMAGE_SUFFIXES:  # refuse now, not after every case ran
        raise ValueError(f"--format {fmt!r}: use one of nii.gz, nii, nrrd, mha, keep")
    jobs: list[CaseJob] = []
    seen: dict[Path, Path] = {}
    resolved_inputs = {real_path(p) for p, _ in inputs}
    out_root = real_path(out_dir)
    for path, base in inputs:
        keep = image_suffix(path) or ".nii.gz"  # a DICOM series folder has no suffix to keep
        suffix = keep if fmt == "keep" else "." + fmt.lstrip(".")
        # a FIFO or dangling link named like an image is a (bad) case file too, not a folder
        name = path.name if path.is_dir() else strip_suffix(path)
        name = name.removesuffix("_0000")
        if not name.strip("."):  # "", "." or "..": no file name to give the output
            raise ValueError(f"{path}: cannot name an output after {path.name!r}; name the file or folder")
        try:
            rel = path.parent.relative_to(base) if not path.is_dir() or not is_image_path(path) else Path()
        except ValueError:
            rel = Path()
        target = real_path(out_dir / rel / f"{name}{suffix}")
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
              resume: bool = False, fail_fast: bool = False, progress: BatchProgress | None = None,
              write_behind: bool = True) -> BatchReport:
    """Predict every job in order: the next case is read while the current one runs, and (``write_behind``)
    the previous case's output is written while the current one runs.

    The report keeps the jobs' order and is rewritten as each case is written. Writing behind holds one
    case's labels (``(I, J, K)`` uint8) beside the running one; with ``probabilities`` the maps are written
    before the next case starts (they close over the case's logits, which must not wait beside the next).
    """
    if progress is not None:
        progress.cases(len(jobs))
    todo = []
    for job in jobs:
        if resume and output_complete(job):
            report.cases.append({"input": str(job.input), "output": str(job.output), "status": "skipped",
                                 "reason": "output exists with the input's geometry (--resume)"})
            if progress is not None:
                progress.case_finished(report.cases[-1])
        else:
            todo.append(job)
    behind = write_behind and not predictor.options.probabilities
    on_tiles = progress.tiles if progress is not None else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsup-prefetch") as reader, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsup-write") as writer:
        pending: Future[Prepared] | None = reader.submit(predictor.prepare, todo[0].input) if todo else None
        writing: Future[tuple[dict[str, Any], bool]] | None = None  # the case before, while it is written
        for i, job in enumerate(todo):
            assert pending is not None
            current = pending
            pending = reader.submit(predictor.prepare, todo[i + 1].input) if i + 1 < len(todo) else None
            if progress is not None:
                progress.case_started(job.input)
            entry, prediction, started = _predict(predictor, job, current, on_tiles)
            if writing is not None and _finished(writing.result(), todo[i:], report, report_path, fail_fast,
                                                 progress, computed=prediction is not None):
                return _stopped(pending, report)
            writing = writer.submit(_write, predictor, job, entry, prediction, started)
            if not behind or prediction is None:  # a failed case at once: --fail-fast must not predict the next
                done, writing = writing, None
                if _finished(done.result(), todo[i + 1:], report, report_path, fail_fast, progress):
                    return _stopped(pending, report)
        if writing is not None:
            _finished(writing.result(), [], report, report_path, fail_fast, progress)
    if report_path is not None:
        report.write(report_path)
    return report


def _finished(written: tuple[dict[str, Any], bool], rest: list[CaseJob], report: BatchReport,
              report_path: Path | None, fail_fast: bool, progress: BatchProgress | None,
              computed: bool = False) -> bool:
    """Report a written (or failed) case; True when the batch must stop there.

    ``rest``: the jobs after it (``computed``: the first of them has been predicted, not yet written).
    """
    entry, disk_full = written
    report.cases.append(entry)
    if progress is not None:
        progress.case_finished(entry)
    if disk_full:  # every later output would fail too: stop rather than compute what cannot be kept
        for k, later in enumerate(rest):
            why = "predicted, not written" if computed and k == 0 else "not attempted"
            report.cases.append({"input": str(later.input), "output": str(later.output), "status": "not_run",
                                 "error": f"{later.input}: {why}: the output disk is full"})
        log.error("the output disk is full: stopping the batch with %d case(s) not attempted; free space, "
                  "then run the same command with --resume", len(rest))
        _write_anyway(report, report_path)
        return True
    if report_path is not None:
        report.write(report_path)
    if entry["status"] == "error" and fail_fast:
        log.error("stopping at the first failure (--fail-fast)")
        return True
    return False


def _stopped(pending: Future[Prepared] | None, report: BatchReport) -> BatchReport:
    if pending is not None:
        pending.cancel()
    return report


def _write_anyway(report: BatchReport, path: Path | None) -> None:
    """Write the report of a batch stopped by a full disk, which the report may not fit on either."""
    if path is None:
        return
    try:
        report.write(path)
    except OSError as err:
        log.error("%s (the case list is still printed with --json)", err)


def _predict(predictor: Predictor, job: CaseJob, prepared: Future[Prepared],
             on_tiles: TileHook | None = None) -> tuple[dict[str, Any], Prediction | None, float]:
    """Predict one case: its report entry so far, the prediction (None when the case failed), its start time."""
    entry: dict[str, Any] = {"input": str(job.input), "output": str(job.output)}
    started = time.perf_counter()
    try:
        return entry, predictor.predict(prepared.result(), on_tiles), started
    except Exception as err:  # _failed sorts it: a bad case must not stop the batch
        _failed(entry, job, err)
        return entry, None, started


def _write(predictor: Predictor, job: CaseJob, entry: dict[str, Any],
           prediction: Prediction | None, started: float) -> tuple[dict[str, Any], bool]:
    """Write one predicted case (the writer thread): its finished report entry, and whether it failed on a
    full output disk. A case whose prediction failed passes through with its error."""
    disk_full = False
    if prediction is not None:
        try:
            t0 = time.perf_counter()
            if prediction.probability is not None:
                entry["probabilities"] = _write_probabilities(predictor, job, prediction)
            # the label file last: --resume takes its presence as "case done", so it must not precede a failed map
            write_image(job.output, prediction.labels, prediction.geometry)
            seconds = {**prediction.seconds, "write": time.perf_counter() - t0}
            entry.update({
                "status": "ok", "shape": list(prediction.geometry.shape),
                "spacing": list(prediction.geometry.spacing), "orientation": prediction.geometry.orientation,
                "seconds": {k: round(v, 4) for k, v in seconds.items()},
                "volumes_ml": {k: round(v, 3) for k, v in prediction.volumes_ml.items()},
            })
            if prediction.exit_level is not None:
                entry["exit_level"] = prediction.exit_level
                entry["note"] = f"early-exit preview from head {prediction.exit_level}: coarser than full inference"
            found = [name for name, ml in prediction.volumes_ml.items() if ml > 0]
            log.info("%s -> %s (%.1f s, found %s)", job.input.name, job.output, time.perf_counter() - started,
                     ", ".join(found) or "no foreground")
        except Exception as err:  # as in _predict
            disk_full = _failed(entry, job, err)
    # from the case's start to its file: with writing behind, this overlaps the next case's prediction
    entry["seconds_total"] = round(time.perf_counter() - started, 4)
    return entry, disk_full


def _failed(entry: dict[str, Any], job: CaseJob, err: Exception) -> bool:
    """Record a failed case in its report entry; True when it failed on a full output disk."""
    if isinstance(err, (CaseError, ImageReadError)):  # expected: the message names the file and the problem
        entry.update({"status": "error", "error": str(err)})
        log.error("%s", err)
    elif isinstance(err, OSError):  # a full disk, an unwritable OUT: expected too, and the message names the file
        entry.update({"status": "error", "error": f"{job.input}: {err}"})
        log.error("%s: %s", job.input, err)
        return isinstance(err, DiskFullError)
    else:  # anything else still must not stop the batch; keep the type for the report
        entry.update({"status": "error", "error": f"{job.input}: {type(err).__name__}: {err}"})
        log.error("%s: unexpected failure", job.input, exc_info=err)
    return False


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
