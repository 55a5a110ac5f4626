"""``run_training(cfg, data_dir)``: the composition root of a training run. Reads top to bottom:

check data -> plan -> split -> track -> datasets -> model, loss, optimiser -> engine + handlers -> (resume)
-> run -> final checkpoint, model bundle, figures (``figures/``, logged as MLflow artifacts).

Under ``torchrun`` (WORLD_SIZE > 1) the same function runs on every rank through ``ignite.distributed``:
cases are sharded per rank, metrics all-reduced, and only rank 0 logs to MLflow and writes files.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import CacheDataset

import medsup
from medsup.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medsup.config import Config, from_json
from medsup.data import preprocessed as pre
from medsup.data.batch_augment import BatchAugment
from medsup.data.check import check_dataset
from medsup.data.datalist import load_datalist
from medsup.data.fingerprint import plan_dataset
from medsup.data.loaders import training_loaders
from medsup.data.memo import CaseMemo
from medsup.data.planning import Plan
from medsup.data.splits import fold_split, save_splits
from medsup.data.transforms import augment_in_step, background_value
from medsup.device import autocast_dtype, autotune_convolutions, inference_memory_format, resolve_device
from medsup.engine.handlers import BestTracker, attach_step_handlers
from medsup.engine.steps import StepEvents, build_optimizer, load_optimizer_state, make_train_step
from medsup.engine.validation import summarise, validate
from medsup.evaluation.history import (
    HISTORY,
    VALIDATION,
    read_validation,
    validation_rows,
    write_history,
    write_validation,
)
from medsup.hostmem import tune_host_allocator
from medsup.inference.bundle import write_bundle
from medsup.inference.window import SlidingWindow, sliding_window_logits
from medsup.losses import build_loss, heads_may_go_unused
from medsup.models.unet import DeepSupervisedUNet, build_model
from medsup.tasks import get_task
from medsup.tracking import RunTracker, check_reachable, resolve_tracking_uri
from medsup.tracking.run_info import plan_params, run_tags

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message says which case or setting to fix."""


@dataclass
class TrainResult:
    """What a finished training run leaves behind."""

    output_dir: Path
    run_id: str | None
    tracking_uri: str
    best_dice: float
    best_epoch: int
    epochs_done: int
    bundle_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    model_version: int | None = None


@dataclass
class _Options:
    data_dir: Path
    output: Path | None
    tracking_uri: str | None
    experiment: str | None
    run_name: str | None
    resume: str | None
    device: str | None
    plan_path: Path | None


def run_training(cfg: Config, data_dir: Path | str, *, output: Path | str | None = None,
                 tracking_uri: str | None = None, experiment: str | None = None, run_name: str | None = None,
                 resume: str | None = None, device: str | None = None,
                 plan_path: Path | str | None = None) -> TrainResult:
    """Train ``cfg.task`` on the dataset at ``data_dir`` (see the module docstring).

    Args:
        output: run folder (checkpoints, plan, bundle); default ``runs/<task>-fold<k>-<time>``.
        tracking_uri: MLflow URI (else $MLFLOW_TRACKING_URI, config, ``sqlite:///<cwd>/mlflow.db``).
        resume: a checkpoint file, a run folder, or an MLflow run id whose run folder still exists.
        device: ``cpu`` / ``cuda``; default ``cfg.train.device``.
        plan_path: reuse this plan.json instead of planning the dataset.

    Raises:
        TrainingError: bad data, unreachable tracking server, unusable checkpoint, out of GPU memory.
    """
    opts = _Options(Path(data_dir), Path(output) if output else None, tracking_uri, experiment, run_name,
                    resume, device, Path(plan_path) if plan_path else None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and idist.model_name() != "native-dist":
        result: list[TrainResult] = []
        backend = "nccl" if torch.cuda.is_available() and (device or cfg.train.device) != "cpu" else "gloo"
        with idist.Parallel(backend=backend) as parallel:
            parallel.run(lambda _rank: result.append(_train_and_release(cfg, opts)))
        return result[0]
    return _train_and_release(cfg, opts)


def _train_and_release(cfg: Config, opts: _Options) -> TrainResult:
    """``_train``, then free what it leaves in reference cycles before the caller goes on.

    The engines' handlers and closures form cycles that hold the (DDP-wrapped) model, the optimiser and the
    loaders past ``_train``'s return: on a GPU that memory stays taken until the garbage collector happens to
    run, and under DDP the wrapper holds the gloo process group, so the group outlived
    ``destroy_process_group`` and was freed at interpreter exit, where gloo's threads aborted the rank
    ("terminate called without an active exception", SIGABRT; ~1 in 12 two-rank CPU runs).
    """
    result = _train(cfg, opts)
    gc.collect()
    return result


def _train(cfg: Config, opts: _Options) -> TrainResult:
    tune_host_allocator()  # in every rank's process, and for callers of the Python API (the CLI did it already)
    rank0 = idist.get_rank() == 0
    checkpoint = _load_resume(opts) if opts.resume else None
    if checkpoint is not None:
        cfg = from_json(checkpoint["config"])  # a resumed run keeps the config it started with
    task = get_task(cfg.task)

    # data: every case must pass the check before a single step is taken, and before the run folder is made
    # (a refused dataset leaves nothing behind)
    if not opts.data_dir.is_dir():
        raise TrainingError(f"data folder {opts.data_dir} does not exist")
    # where the dataset has a disk cache, the check and the fingerprint remember each unchanged case
    memo = CaseMemo.for_dataset(cfg.train.cache, cfg.train.cache_dir, opts.data_dir)
    try:
        report = check_dataset(opts.data_dir, cfg, memo)
    except (FileNotFoundError, ValueError) as err:  # no recognisable layout, a bad dataset.json
        raise TrainingError(f"dataset {opts.data_dir}: {err}") from None
    if not report.ok:
        raise TrainingError(f"dataset {opts.data_dir} fails `medsup data check`:\n{report.render()}")
    output = _output_dir(cfg, opts, checkpoint)

    # plan and split (rank 0 writes, the others read after a barrier)
    plan = _plan(cfg, opts, output, checkpoint, rank0, memo)
    datalist = load_datalist(opts.data_dir)
    cases = {c.case_id: c for c in datalist.labelled}
    splits, fold, split = fold_split(sorted(cases), cfg)  # split: at most data.max_train_cases training cases
    if rank0:
        save_splits(splits, output / "splits.json")
        (output / "config.json").write_text(cfg.to_json() + "\n", encoding="utf-8")

    dev = _device(opts.device or cfg.train.device)
    try:  # before the MLflow run starts: a GPU without bf16 asked for it
        autocast_dtype(dev, cfg.train.amp, cfg.train.amp_dtype)
    except ValueError as err:
        raise TrainingError(f"train.amp_dtype: {err}") from None
    # a resumed run goes back to the store it was started in (its checkpoint says where), unless
    # --tracking-uri or $MLFLOW_TRACKING_URI says otherwise: the default store lives beside the working
    # directory of the first start, which a resume from elsewhere would not find
    started_in = checkpoint.get("tracking_uri") if checkpoint else None
    uri, source = resolve_tracking_uri(opts.tracking_uri, started_in or cfg.tracking.uri, Path.cwd())
    if started_in and source == "config":
        source = "the resumed checkpoint"
    if rank0:
        try:
            check_reachable(uri)
        except Exception as err:
            raise TrainingError(f"MLflow tracking store unavailable ({source}: {uri}): {err}") from None
    tracker = RunTracker(
        # a resumed run stays in its experiment, which may have been named by --experiment, not the config
        uri, opts.experiment or (None if checkpoint else cfg.tracking.experiment or f"medsup-{cfg.task}"),
        opts.run_name or output.name, run_id=checkpoint.get("run_id") if checkpoint else None,
        spool_dir=output, enabled=rank0, flush_interval_s=cfg.tracking.flush_interval_s,
    )
    with tracker:
        if checkpoint is None:
            tracker.log_params({**cfg.flat(), **{f"planned.{k}": v for k, v in plan_params(plan).items()},
                                "data.dir": str(opts.data_dir.resolve()), "data.fold_used": fold})
        tracker.set_tags({**run_tags(cfg, plan, fold, dev, output, idist.get_world_size()), "seed": str(cfg.seed),
                          "n_train": str(len(split["train"])), "n_val": str(len(split["val"]))})
        for name in ("config.json", "plan.json", "splits.json"):
            if rank0:
                tracker.log_artifact(output / name)
        result = _fit(cfg, plan, task.labels, cases, split, dev, output, tracker, checkpoint)
        result.tracking_uri = uri
    return result


def _fit(cfg: Config, plan: Plan, labels: dict[int, str], cases: dict[str, Any], split: dict[str, list[str]],
         dev: torch.device, output: Path, tracker: RunTracker, checkpoint: dict[str, Any] | None) -> TrainResult:
    rank0 = idist.get_rank() == 0
    torch.manual_seed(cfg.seed + idist.get_rank())
    np.random.seed((cfg.seed + idist.get_rank()) % 2**32)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    autotune_convolutions(dev, cfg.train.deterministic)

    try:
        train_loader, val_items = training_loaders(cfg, plan, cases, split, dev, rank=idist.get_rank(),
                                                   world=idist.get_world_size(),
                                                   nproc_per_node=idist.get_nproc_per_node())
    except pre.PreprocessError as err:
        raise TrainingError(str(err)) from None
    # what train.num_workers: null and train.cache: auto chose
    # the augmentation in the training step, on the device (augment.runs_in), instead of the loader's workers
    augment = BatchAugment(cfg, plan, cfg.seed + idist.get_rank()) if augment_in_step(cfg, dev) else None
    tracker.set_tags({"num_workers": str(train_loader.num_workers),
                      "train_cache": "memory" if isinstance(train_loader.dataset, CacheDataset) else "disk",
                      "augment_runs_in": "step" if augment else "loader"})
    model = build_model(cfg, plan).to(dev)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    net = idist.auto_model(model, find_unused_parameters=heads_may_go_unused(cfg.loss))
    if cfg.train.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    loss_fn = build_loss(cfg)
    optimizer = build_optimizer(cfg, model)
    step = make_train_step(net, loss_fn, optimizer, dev, amp=cfg.train.amp, amp_dtype=cfg.train.amp_dtype,
                           grad_clip=cfg.train.grad_clip, channels_last=cfg.train.channels_last, augment=augment)
    trainer = Engine(step)
    trainer.register_events(*StepEvents)
    if augment is not None:  # draws seeded per epoch: a resumed run goes on as the uninterrupted one would
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: augment.reseed(engine.state.epoch))
    epoch_metrics, grad_norms = attach_step_handlers(trainer, cfg, model.named_stages(), loss_fn, optimizer,
                                                     plan.batch_size)
    best = BestTracker("val.dice", cfg.train.early_stop_patience)
    history: list[dict[str, float]] = []
    window = SlidingWindow(plan.patch_size, cfg.infer.overlap, cfg.infer.sw_batch_size, cfg.infer.blend,
                           background_value(plan.normalization))

    def inferer(image: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
        return sliding_window_logits(image, model, window)

    train_format = torch.channels_last_3d if cfg.train.channels_last else torch.contiguous_format
    val_format = inference_memory_format(dev)

    def inference_model() -> DeepSupervisedUNet:
        # validation and the end-of-training figures predict as `medsup infer` does, in the inference layout (on
        # a CPU channels-last, ~1.35x per sliding-window call: bench/infer_layout.py), from a copy of the weights
        # where training keeps another layout: so validation Dice, the postprocessing fit, the figures and the
        # bundle's inference agree
        if val_format == train_format:
            return model
        copy = build_model(cfg, plan).to(dev)
        copy.load_state_dict(model.state_dict())
        return copy.to(memory_format=val_format)  # type: ignore[call-overload]

    def validation_net() -> torch.nn.Module:
        return net if val_format == train_format else inference_model()  # net: the compiled / distributed one

    fg_names = [labels[c] for c in sorted(labels) if c != 0]
    fg_classes = [c for c in sorted(labels) if c != 0]
    lesion_classes = get_task(cfg.task).lesion_classes
    ckpt_dir = output / "checkpoints"
    case_files = {str(c.image): c for c in cases.values()}
    last_validation: list[dict[str, Any]] = []  # per case, for validation.json and the case figures

    def payload() -> dict[str, Any]:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": step.scaler.state_dict(),  # type: ignore[attr-defined]
            "trainer": trainer.state_dict(), "epoch": trainer.state.epoch, "best": best.state_dict(),
            "history": history,
            "rng": rng_state(), "run_id": tracker.run_id or "", "tracking_uri": tracker.uri, "config": cfg.to_json(),
            "plan": plan.model_dump_json(), "medsup_version": medsup.__version__,
            "loss_running": loss_fn.get_extra_state(),
        }

    @trainer.on(Events.EPOCH_COMPLETED)
    def end_of_epoch(engine: Engine) -> None:
        epoch = engine.state.epoch
        metrics = epoch_metrics.compute(engine)
        if grad_norms is not None:
            metrics.update(grad_norms.compute())
        if epoch % cfg.train.val_every == 0 or epoch == cfg.train.epochs:
            started = time.perf_counter()
            results = validate(validation_net(), val_items, inferer, dev, fg_classes, cfg.train.amp, lesion_classes,
                               plan.target_spacing, cfg.evaluate.lesion_min_overlap)
            if idist.get_world_size() > 1:  # every rank validated its shard of cases
                gathered = cast(list[list[dict[str, Any]]], idist.all_gather(results))
                results = [r for part in gathered for r in part]
            metrics.update(summarise(results, fg_names))
            last_validation[:] = validation_rows(results, case_files, fg_names)
            if rank0:
                write_validation(output / VALIDATION, last_validation)
            metrics["val.seconds"] = time.perf_counter() - started
            if best.update(engine, metrics) and rank0:
                save_checkpoint(ckpt_dir / "best.pt", payload())
        metrics["epoch"] = float(epoch)
        history.append(metrics)
        tracker.log_metrics(metrics, step=epoch)
        if rank0:
            save_checkpoint(ckpt_dir / "last.pt", payload())
            write_history(output / HISTORY, history)
        dice = ", ".join(f"{k.removeprefix('val.dice.')} {v:.3f}" for k, v in metrics.items()
                         if k.startswith("val.dice."))
        log.info("epoch %d/%d: loss %.4f%s, %.1f s", epoch, cfg.train.epochs, metrics.get("train.loss.total", 0),
                 f", dice {dice}" if dice else "", metrics["train.epoch_seconds"])

    if rank0 and sys.stderr.isatty():  # a live bar for people; logs stay line-based for files and CI
        _attach_progress(trainer, history, cfg.train.sync_every)

    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        step.scaler.load_state_dict(checkpoint["scaler"])  # type: ignore[attr-defined]
        trainer.load_state_dict(checkpoint["trainer"])
        best.load_state_dict(checkpoint["best"])
        history.extend(checkpoint["history"])
        if (output / VALIDATION).is_file():  # the case figures need the last validation even if none is left
            last_validation[:] = read_validation(output)
        loss_fn.set_extra_state(checkpoint["loss_running"].to(dev))
        set_rng_state(checkpoint["rng"])
        log.info("resumed at epoch %d (iteration %d)", trainer.state.epoch, trainer.state.iteration)

    # A checkpoint of a finished training (killed between the last epoch and the export) has nothing left to
    # train: Ignite would start a finished engine over from epoch 0, training every epoch a second time.
    finished = checkpoint is not None and (trainer.state.epoch >= cfg.train.epochs or best.stopped)
    try:
        if finished:
            log.info("the checkpoint ends the training (epoch %d of %d): only the export is left",
                     trainer.state.epoch, cfg.train.epochs)
        else:
            trainer.run(train_loader, max_epochs=cfg.train.epochs)
    except FloatingPointError as err:  # the loss's finiteness check: before this epoch validated or saved anything
        last = ckpt_dir / "last.pt"
        saved = (f"{last} holds epoch {trainer.state.epoch - 1}" if last.is_file() and trainer.state.epoch > 1
                 else "no checkpoint was written")
        raise TrainingError(
            f"training diverged in epoch {trainer.state.epoch} (checked at iteration {trainer.state.iteration}, "
            f"every train.sync_every = {cfg.train.sync_every} and at each epoch's end): {err}. Nothing of this "
            f"epoch was saved ({saved}). A lower train.lr, train.grad_clip or train.amp=false may help"
        ) from None
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            f"out of GPU memory with patch {list(plan.patch_size)} x batch {plan.batch_size}: lower "
            "plan.memory_budget_gb (re-plan), or set plan.patch_size / plan.batch_size smaller"
        ) from None

    bundle = output / "model"
    model_version: int | None = None
    if rank0:
        best_path = ckpt_dir / "best.pt" if (ckpt_dir / "best.pt").is_file() else ckpt_dir / "last.pt"
        write_bundle(bundle, load_checkpoint(best_path)["model"], cfg, plan, labels)
        val_ids = split["val"][: cfg.train.val_max_cases] if cfg.train.val_max_cases else split["val"]
        if cfg.postprocess.fit and val_ids:  # before registering: the registered bundle carries the rules
            _fit_postprocessing(bundle, [(cases[c].image, cases[c].label) for c in val_ids], cfg, dev, tracker,
                                trainer.state.epoch)
        if cfg.tracking.register_best and tracker.run_id:
            model_version = _register(tracker, bundle, cfg.task, best.best)
        if cfg.train.figures:
            _figures(output, history, last_validation, inference_model(), cfg, plan, dev, tracker)
    # the other ranks wait for rank 0's export: a rank that tears its process group down and exits while rank 0
    # still holds it open can abort in gloo's teardown ("terminate called without an active exception", exit
    # -6), which torchrun reports as a failed run (seen in ~1 of 5 two-rank CPU runs before this barrier)
    idist.barrier()
    return TrainResult(output, tracker.run_id, "", best.best, best.best_epoch, trainer.state.epoch, bundle, history,
                       model_version)


def _figures(output: Path, history: list[dict[str, float]], validation: list[dict[str, Any]],
             model: DeepSupervisedUNet, cfg: Config, plan: Plan, dev: torch.device, tracker: RunTracker) -> None:
    """``figures/``: curves, gradient norms, overlays of the best and worst last-validation case and the
    deep-supervision panel (final network), each logged as an MLflow artifact under ``figures/``."""
    from medsup.evaluation.run_figures import run_figures  # matplotlib, only at the end

    cases = [c for c in validation if c["label"]]
    for path in run_figures(output / "figures", history, model=model, cfg=cfg, plan=plan, cases=cases, device=dev):
        tracker.log_artifact(path, "figures")


def _attach_progress(trainer: Engine, history: list[dict[str, float]], every: int) -> None:
    """tqdm bar per epoch (loss, ETA), moved every ``every`` iterations (reading the loss makes the host wait
    for the GPU); the last validation Dice per class is shown beside the loss."""
    from ignite.handlers import ProgressBar

    def shown(output: dict[str, torch.Tensor]) -> dict[str, float]:
        last = next((h for h in reversed(history) if "val.dice" in h), {})
        dice = {k.removeprefix("val.dice."): round(v, 3) for k, v in last.items() if k.startswith("val.dice.")}
        return {"loss": float(output["loss"]), **dice}

    ProgressBar(persist=False).attach(trainer, output_transform=shown,
                                      event_name=Events.ITERATION_COMPLETED(every=every))


def _fit_postprocessing(bundle: Path, cases: list[tuple[Path, Path]], cfg: Config, dev: torch.device,
                        tracker: RunTracker, epoch: int) -> None:
    """Fit the postprocessing rules on the validation cases into the bundle (``postprocessing.json``) and log
    them: tag ``postprocess.rules``, metrics ``postprocess.dice_before.<class>`` / ``dice_after.<class>``
    (mean per-case Dice on the cases' own grids) and ``postprocess.seconds``. A fit that fails costs the
    training nothing: the bundle keeps the task rule and the error is logged."""
    from medsup.inference.postprocess_fit import fit_bundle

    started = time.perf_counter()
    try:
        rules = fit_bundle(bundle, cases, dev, cfg.postprocess.min_lesion_diameters_mm)
    except Exception as err:  # the model is trained; a failed fit must not lose it
        log.error("postprocessing not fitted (%s); the bundle %s keeps the task rule", err, bundle)
        return
    tracker.set_tags({"postprocess.rules": rules.describe(get_task(cfg.task).labels)})
    metrics = {f"postprocess.{when}.{name}": value for when in ("dice_before", "dice_after")
               for name, value in rules.fit.get(when, {}).items() if math.isfinite(value)}
    tracker.log_metrics({**metrics, "postprocess.seconds": time.perf_counter() - started}, step=epoch)


def _register(tracker: RunTracker, bundle: Path, task: str, score: float) -> int | None:
    """Log the bundle as the run's pyfunc model and register it as ``medsup-<task>`` @candidate.

    A registry that fails here must not cost the finished training: the bundle stays on disk and the
    error says so.
    """
    from medsup.tracking.registry import log_bundle_model, register, with_patience

    assert tracker.run_id is not None
    run_id, uri, patience = tracker.run_id, tracker.uri, tracker.outage_tolerance_s
    try:
        # a server that is down right now gets the same patience as the metrics (retries with backoff)
        model_uri = with_patience(lambda: log_bundle_model(uri, run_id, bundle), patience, "log the model")
        version = with_patience(lambda: register(uri, run_id, task, model_uri, score if math.isfinite(score) else None),
                                patience, "register the model")
    except Exception as err:
        log.error("model not registered (%s); the bundle is kept in %s", err, bundle)
        return None
    log.info("registered medsup-%s version %d (alias candidate) from run %s", task, version, tracker.run_id)
    return version


def _device(name: str) -> torch.device:
    try:
        return resolve_device(name, idist.get_local_rank() if idist.get_world_size() > 1 else 0)
    except ValueError as err:
        raise TrainingError(str(err)) from None


def _load_resume(opts: _Options) -> dict[str, Any]:
    assert opts.resume is not None
    target = Path(opts.resume)
    if not target.exists():
        from medsup.tracking import run_output_dir

        try:
            found = run_output_dir(resolve_tracking_uri(opts.tracking_uri, None, Path.cwd())[0], opts.resume)
        except Exception as err:
            raise TrainingError(f"--resume {opts.resume}: neither a checkpoint/run folder nor a known MLflow run "
                                f"({err})") from None
        target = found
    try:
        checkpoint = load_checkpoint(target)
    except CheckpointError as err:
        raise TrainingError(f"--resume: {err}") from None
    checkpoint["_path"] = str(target)
    return checkpoint


def _output_dir(cfg: Config, opts: _Options, checkpoint: dict[str, Any] | None) -> Path:
    if checkpoint is not None:
        path = Path(checkpoint["_path"])
        path = path.parent if path.is_file() else path
        out = path.parent if path.name == "checkpoints" else path
    elif opts.output is not None:
        out = opts.output
    else:
        out = Path("runs") / f"{cfg.task}-fold{cfg.data.fold}-{time.strftime('%Y%m%d-%H%M%S')}"
    if idist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def _plan(cfg: Config, opts: _Options, output: Path, checkpoint: dict[str, Any] | None, rank0: bool,
          memo: CaseMemo | None = None) -> Plan:
    if checkpoint is not None:
        return Plan.model_validate_json(checkpoint["plan"])
    if opts.plan_path is not None:
        plan = Plan.load(opts.plan_path)
        if plan.task != cfg.task:
            raise TrainingError(f"{opts.plan_path} plans task {plan.task!r}, not {cfg.task!r}")
        if rank0:
            plan.save(output / "plan.json")
        return plan
    if rank0:
        plan_dataset(opts.data_dir, cfg, output / "plan.json", memo)
    idist.barrier()
    return Plan.load(output / "plan.json")
