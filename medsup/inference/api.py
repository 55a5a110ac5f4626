"""Entry points: ``infer`` (what ``medsup infer`` calls) and ``predict_files`` (what the MLflow pyfunc calls).

Both go through the same :class:`~medsup.inference.predictor.Predictor` and batch runner.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import medsup
from medsup.device import resolve_device
from medsup.inference.batch import BatchProgress, BatchReport, discover_inputs, plan_outputs, run_batch
from medsup.inference.bundle import Bundle, load_bundle
from medsup.inference.interrupt import sigterm_exits_cleanly
from medsup.inference.predictor import Predictor

if TYPE_CHECKING:  # importing mlflow costs ~2 s: only where a model URI is resolved
    from medsup.tracking.resolve import ResolvedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferRequest:
    """Everything ``medsup infer`` was asked for."""

    inputs: list[str]
    output_dir: Path
    model: str  # a bundle folder or checkpoint, or an MLflow ``models:/`` / ``runs:/`` URI
    model_path: Path | None = None  # the local bundle; None: found from ``model`` (downloaded for a URI)
    tracking_uri: str | None = None  # the store of a model URI (default: $MLFLOW_TRACKING_URI)
    recursive: bool = False
    fmt: str = "nii.gz"
    device: str = "auto"
    overlap: float | None = None
    sw_batch_size: int | None = None
    tta: bool | None = None
    amp: bool | None = None
    postprocess: bool | None = None
    exit_level: int | None = None
    resume: bool = False
    fail_fast: bool = False
    shard: tuple[int, int] | None = None
    report: Path | None = None
    model_version: str | None = None
    probabilities: bool = False


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``: this job takes every 8th case starting at index 2."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


MODEL_URI_PREFIXES = ("models:/", "runs:/")


def _distributed() -> tuple[int, int, bool]:
    """(rank, world, created) under torchrun, else (0, 1, False); creates the process group for the ranks'
    agreement on the model and the final report gather, and says whether it did (then ``infer`` destroys it
    again). Always gloo: only small host objects travel, and NCCL would build a communicator (GPU memory,
    seconds) on whichever GPU is current, cuda:0 on every rank unless something set it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    return dist.get_rank(), world, created


class PeerRankError(RuntimeError):
    """Under torchrun: another rank failed (this rank's cases may be done, its shard report written)."""


def infer(request: InferRequest, progress: BatchProgress | None = None) -> BatchReport:
    """Run batch inference; returns the (merged, under torchrun) report. Bad cases never stop the others.

    A model URI is resolved here (under torchrun by rank 0 alone, every rank then downloading the model it
    resolved: an alias moved between two ranks' lookups cannot split a batch across two models).

    Raises:
        ValueError, TrackingUnavailable: a bad or unreachable model URI.
        PeerRankError: under torchrun, when another rank raised (its message included); a rank that raises
            raises its own error, as without torchrun.
    """
    rank, world, created = _distributed()
    try:
        if world == 1:
            return _infer(request, _resolved(request), progress, rank, world)
        model = _agreed_model(request, rank)
        try:
            report: BatchReport | None = _infer(request, model, progress, rank, world)
            failure: Exception | None = None
        except Exception as err:  # still joins the gather: the other ranks learn why, not a gloo error
            report, failure = None, err
        return _gather(report, failure, rank, request.report or request.output_dir / "report.json")
    finally:
        if created:  # a group left to interpreter exit can abort the process in gloo's teardown (SIGABRT)
            import torch.distributed as dist

            dist.destroy_process_group()


def _resolved(request: InferRequest) -> tuple[str, ResolvedModel] | None:
    """``(store URI, what the model URI points at now)``; None for a local bundle."""
    if request.model_path is not None or not request.model.startswith(MODEL_URI_PREFIXES):
        return None
    from medsup.tracking import resolve_tracking_uri
    from medsup.tracking.resolve import resolve_reference

    uri = resolve_tracking_uri(request.tracking_uri, None, Path.cwd())[0]
    return uri, resolve_reference(uri, request.model)


def _located(request: InferRequest, model: tuple[str, ResolvedModel] | None) -> tuple[Path, str | None]:
    """The local bundle folder (a resolved model downloaded, once per cache) and its registry version."""
    if request.model_path is not None or model is None:
        return request.model_path or Path(request.model), request.model_version
    from medsup.tracking.resolve import fetch

    uri, resolved = model
    return fetch(uri, resolved), str(resolved.version) if resolved.version is not None else None


def _agreed_model(request: InferRequest, rank: int) -> tuple[str, ResolvedModel] | None:
    """Rank 0's resolution of the model URI, on every rank; rank 0's failure raised on every rank (its own
    error there, a :class:`PeerRankError` naming it elsewhere), so that no rank waits for a gather."""
    import torch.distributed as dist

    box: list[Any] = [None]
    error: Exception | None = None
    if rank == 0:
        try:
            box = [(_resolved(request), None)]
        except Exception as err:  # every rank learns it before anyone starts on a case
            error, box = err, [(None, str(err))]
    dist.broadcast_object_list(box, src=0)
    model, message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise PeerRankError(f"rank {rank}: rank 0 could not resolve {request.model}: {message}")
    return model


def _infer(request: InferRequest, model: tuple[str, ResolvedModel] | None, progress: BatchProgress | None,
           rank: int, world: int) -> BatchReport:
    """``infer`` as rank ``rank`` of ``world`` with the resolved ``model``: this rank's share of the cases."""
    bundle_dir, version = _located(request, model)
    bundle = load_bundle(bundle_dir)
    device = resolve_device(request.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":  # what runs on "the current device" (the allocator's cache, autocast) is this rank's
        torch.cuda.set_device(device)
    options = Predictor.options_from(bundle, overlap=request.overlap, sw_batch_size=request.sw_batch_size,
                                     tta=request.tta, amp=request.amp, postprocess=request.postprocess,
                                     exit_level=request.exit_level, probabilities=request.probabilities)
    found = [pair for spec in request.inputs for pair in discover_inputs(spec, request.recursive)]
    jobs = plan_outputs(found, request.output_dir, request.fmt)
    index, count = request.shard or (0, 1)
    index, count = index * world + rank, count * world
    jobs = jobs[index::count]
    report_path = request.report or request.output_dir / "report.json"
    if count > 1:  # each shard keeps its own report; rank 0 merges under torchrun
        report_path = report_path.with_name(f"{report_path.stem}.shard{index}of{count}{report_path.suffix}")
    predictor = Predictor(bundle, device, options)
    report = BatchReport(header={
        "model": request.model, "model_version": version, "bundle": bundle.describe(),
        "medsup_version": medsup.__version__, "device": str(device), "network_dtype": predictor.network_dtype,
        "settings": {**options.__dict__, "format": request.fmt, "shard": f"{index}/{count}"},
    })
    log.info("%d case(s) for shard %d/%d on %s", len(jobs), index, count, device)
    with sigterm_exits_cleanly():  # a killed job leaves no temp file in OUT
        run_batch(predictor, jobs, report, report_path, resume=request.resume, fail_fast=request.fail_fast,
                  progress=progress)
    return report


def _gather(report: BatchReport | None, failure: Exception | None, rank: int, path: Path) -> BatchReport:
    """Every rank's cases (or its error) to every rank; rank 0 writes the merged report at ``path``. A rank
    whose ``_infer`` raised (``failure``) gathers too, so that each rank ends with a medsup error naming it."""
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (report.cases, None) if report is not None else (None, str(failure)))
    failed = [f"rank {r}: {error}" for r, (_, error) in enumerate(parts) if error is not None]
    if failure is not None:
        raise failure
    if failed or report is None:
        raise PeerRankError(f"rank {rank} finished its cases, but {'; '.join(failed)}: no merged report "
                             f"(each shard's report.shard*.json holds its cases)")
    merged = BatchReport(header={**report.header, "settings": {**report.header["settings"], "shard": "all"}},
                         cases=[c for cases, _ in parts for c in cases])
    if rank == 0:
        merged.write(path)
    dist.barrier()
    return merged


def predict_files(bundle_dir: Path, paths: list[Path], output_dir: Path) -> list[dict[str, Any]]:
    """Predict ``paths`` with the bundle at ``bundle_dir`` into ``output_dir`` (the MLflow pyfunc's path).

    Returns one dict per input with ``input``, ``output``, ``status`` and ``error`` keys.
    """
    request = InferRequest(inputs=[str(p) for p in paths], output_dir=Path(output_dir), model=str(bundle_dir),
                           model_path=Path(bundle_dir))
    report = infer(request)
    return [{"input": c["input"], "output": c["output"] if c["status"] != "error" else None,
             "status": c["status"], "error": c.get("error")} for c in report.cases]


__all__ = ["MODEL_URI_PREFIXES", "Bundle", "InferRequest", "PeerRankError", "infer", "parse_shard", "predict_files"]
