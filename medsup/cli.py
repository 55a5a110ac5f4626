"""The ``medsup`` command line. Each command parses, builds a config, calls ONE library function.

Heavy imports (torch, MONAI, SimpleITK, MLflow) live inside the commands so that ``medsup tasks`` and
``medsup --help`` answer instantly.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from medsup.cli_common import emit, fail

app = typer.Typer(
    name="medsup",
    help="CT segmentation with a deeply-supervised 3D U-Net: synth, check, plan, preprocess, train, infer, register.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Dataset tools.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")


def _models_app() -> typer.Typer:
    from medsup.cli_models import models_app  # light: mlflow is imported inside its commands

    return models_app


app.add_typer(_models_app(), name="models", help="MLflow model registry: list, promote, pull.")


def _ablation_app() -> typer.Typer:
    from medsup.cli_ablation import ablation_app  # light: mlflow and matplotlib load inside its command

    return ablation_app


app.add_typer(_ablation_app(), name="ablation", help="Deep-supervision ablation: summarize its runs, overview.")

log = logging.getLogger("medsup")

TaskOpt = Annotated[str, typer.Option("--task", "-t", help="Task name (see `medsup tasks`).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a setting: a.b=value (repeatable).")
]
PresetOpt = Annotated[list[str] | None, typer.Option("--preset", help="Config preset layer (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    from medsup.hostmem import tune_host_allocator  # torch-free: `medsup tasks` must not import torch

    tune_host_allocator()  # before any tensor: training and inference reuse freed memory instead of faulting it in


def _config(task: str | None, overrides: list[str] | None, presets: list[str] | None = None) -> Any:
    from medsup.config import ConfigError, load

    try:
        return load(task, overrides or [], presets or [])
    except ConfigError as err:
        fail(str(err))


@app.command()
def tasks(as_json: JsonOpt = False) -> None:
    """List the segmentation tasks."""
    from medsup.tasks import TASKS

    if as_json:
        emit([t.as_dict() for t in TASKS.values()])
        return
    for t in TASKS.values():
        labels = ", ".join(f"{k}={v}" for k, v in sorted(t.labels.items()))
        typer.echo(f"{t.name:<6} {t.modality}  {labels:<40} {t.description}")


@config_app.command("show")
def config_show(task: TaskOpt = "liver", overrides: SetOpt = None, preset: PresetOpt = None,
                as_json: JsonOpt = False) -> None:
    """Print the resolved configuration (defaults + task + presets + --set)."""
    import yaml

    cfg = _config(task, overrides, preset)
    data = cfg.model_dump(mode="json")
    typer.echo(json.dumps(data, indent=2) if as_json else yaml.safe_dump(data, sort_keys=False).rstrip())


@app.command()
def synth(
    task: TaskOpt = "liver",
    cases: Annotated[int, typer.Option(min=1, help="Training cases (imagesTr + labelsTr).")] = 20,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dataset folder (MSD layout).")] = Path("synth"),
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same files.")] = 0,
    test_cases: Annotated[int | None, typer.Option(min=0, help="Images in imagesTs (default from config).")] = None,
    full_size: Annotated[bool, typer.Option("--full-size", help="Clinical 512x512 in-plane size.")] = False,
    overrides: SetOpt = None,
) -> None:
    """Write a synthetic CT dataset (MSD layout) with realistic anatomy and lesions."""
    from medsup.data.synth import synthesize

    cfg = _config(task, overrides)
    try:
        root = synthesize(cfg.task, cases, out, seed=seed, full_size=full_size,
                          test_cases=cfg.synth.test_cases if test_cases is None else test_cases,
                          voxel_mm=cfg.synth.voxel_mm)
    except (OSError, ValueError) as err:  # OUT is a file or unwritable; a bad --set synth.* value
        fail(str(err))
    typer.echo(f"wrote {cases} training cases to {root}")


@data_app.command("check")
def data_check(
    data: Annotated[Path, typer.Argument(help="Dataset folder (MSD layout or images/ + labels/).")],
    task: TaskOpt = "liver",
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a dataset: pairing, geometry agreement, 3-D scalar, label values, finite voxels."""
    from medsup.data.check import check_dataset

    cfg = _config(task, overrides)
    try:
        report = check_dataset(data, cfg)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    if as_json:
        emit(report.as_dict())
    else:
        typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("split")
def data_split(
    data: Annotated[Path, typer.Argument(help="Dataset folder (MSD layout or images/ + labels/).")],
    task: TaskOpt = "liver",
    fold: Annotated[int | None, typer.Option(help="Cross-validation fold (default data.fold).")] = None,
    subset: Annotated[str, typer.Option(help="val or train.")] = "val",
    labels: Annotated[bool, typer.Option("--labels", help="Print label paths instead of image paths.")] = False,
    preset: PresetOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print one fold's validation (or training) cases, one path per line: the split `medsup train` uses
    with the same task, preset and --set (data.num_folds, seed, data.split_seed, data.max_train_cases)."""
    from medsup.data.splits import fold_cases

    if subset not in ("val", "train"):
        fail(f"--subset must be val or train, not {subset!r}")
    cfg = _config(task, list(overrides or []) + ([f"data.fold={fold}"] if fold is not None else []), preset)
    try:
        result = fold_cases(data, cfg)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    if as_json:
        emit(result)
        return
    for case in result[subset]:
        typer.echo(case["label" if labels else "image"])


@app.command()
def plan(
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset folder.")],
    task: TaskOpt = "liver",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="plan.json path (default DATA/plan.json).")] = None,
    preset: PresetOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fingerprint a dataset and plan spacing, patch, batch and topology (writes plan.json)."""
    from medsup.data.fingerprint import plan_dataset

    cfg = _config(task, overrides, preset)
    try:
        result = plan_dataset(data, cfg, out)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    if as_json:
        emit(result.model_dump(mode="json"))
    else:
        p = result
        typer.echo(f"plan for {p.task}: {p.num_cases} cases, spacing {list(p.target_spacing)} mm, "
                   f"patch {list(p.patch_size)}, batch {p.batch_size}, {len(p.strides)} stages, "
                   f"filters {list(p.filters)}, ~{p.memory_estimate_gb:.2f} GB")
        typer.echo(f"normalisation: clip [{p.normalization.clip_low:.1f}, {p.normalization.clip_high:.1f}] HU, "
                   f"mean {p.normalization.mean:.1f}, std {p.normalization.std:.1f}")
        typer.echo(f"wrote {out or Path(data) / 'plan.json'}")


@app.command()
def preprocess(
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset folder (MSD or images/ + labels/).")],
    task: TaskOpt = "liver",
    plan_file: Annotated[Path | None, typer.Option("--plan", help="plan.json (default: plan the dataset, as "
                                                   "`medsup train` does).")] = None,
    workers: Annotated[int, typer.Option(help="Cases preprocessed at a time.")] = 2,
    preset: PresetOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the dataset, then preprocess every labelled case once into the disk cache that `medsup train --set
    train.cache=disk` reads (resample, normalise, pad, locate foreground; `train.cache_dir` or
    $MEDSUP_PREPROCESSED says where). Exit 1 with the check's report if any case is bad."""
    from medsup.data.check import check_dataset
    from medsup.data.fingerprint import fingerprint_dataset
    from medsup.data.memo import CaseMemo
    from medsup.data.planning import Plan, make_plan
    from medsup.data.preprocessed import PreprocessError, preprocess_dataset

    cfg = _config(task, overrides, preset)
    try:
        # checked and planned as training does, without writing into the dataset folder (it may be read-only);
        # each case's check and fingerprint are memoised beside the store, so a training start reads no case
        memo = CaseMemo.for_dataset("disk", cfg.train.cache_dir, data)
        report = check_dataset(data, cfg, memo)
        if not report.ok:
            fail(report.render(), code=1)
        the_plan = Plan.load(plan_file) if plan_file else make_plan(cfg, fingerprint_dataset(data, cfg, memo))
        result = preprocess_dataset(cfg, data, the_plan, workers)
    except (FileNotFoundError, ValueError, PreprocessError) as err:
        fail(str(err))
    if as_json:
        emit(result)
    else:
        typer.echo(f"preprocessed {result['cases']} case(s) ({result['written']} written, {result['reused']} "
                   f"already there) in {result['seconds']:.1f} s: {result['bytes'] / 1e9:.2f} GB in {result['root']}")


@app.command()
def model(
    task: TaskOpt = "liver",
    plan_file: Annotated[
        Path | None, typer.Option("--plan", help="plan.json (default: the task's reference plan).")
    ] = None,
    overrides: SetOpt = None,
    preset: PresetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the deep-supervised U-Net for a plan: parameters, stages, one head per decoder scale."""
    from medsup.data.planning import Plan, default_plan
    from medsup.models.summary import describe, render

    cfg = _config(task, overrides, preset)
    try:
        the_plan = Plan.load(plan_file) if plan_file else default_plan(cfg)
        summary = describe(cfg, the_plan)
    except ValueError as err:
        fail(str(err))
    if as_json:
        emit(summary)
    else:
        typer.echo(render(summary))


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset folder (MSD or images/ + labels/).")],
    task: TaskOpt = "liver",
    fold: Annotated[int | None, typer.Option(help="Cross-validation fold (default data.fold).")] = None,
    preset: PresetOpt = None,
    overrides: SetOpt = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (http://..., sqlite:///...).")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default medsup-<task>).")] = None,
    run_name: Annotated[str | None, typer.Option(help="MLflow run name (default: the output folder's name).")] = None,
    resume: Annotated[str | None, typer.Option(help="Checkpoint, run folder or MLflow run id to resume.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default train.device).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run folder (default runs/...).")] = None,
    plan_file: Annotated[Path | None, typer.Option("--plan", help="Reuse this plan.json.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the deep-supervised U-Net: plan, split, train with validation, checkpoints and MLflow tracking."""
    from medsup.train import TrainingError, run_training

    extra = list(overrides or []) + ([f"data.fold={fold}"] if fold is not None else [])
    cfg = _config(task, extra, preset)
    try:
        result = run_training(cfg, data, output=output, tracking_uri=tracking_uri, experiment=experiment,
                              run_name=run_name, resume=resume, device=device, plan_path=plan_file)
    except TrainingError as err:
        fail(str(err), code=1)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun only rank 0 reports
    summary = {"output_dir": str(result.output_dir), "run_id": result.run_id, "tracking_uri": result.tracking_uri,
               "best_val_dice": result.best_dice, "best_epoch": result.best_epoch, "epochs": result.epochs_done,
               "bundle": str(result.bundle_dir)}
    if as_json:
        emit(summary)
    else:
        typer.echo(f"trained {result.epochs_done} epochs: best val Dice {result.best_dice:.4f} at epoch "
                   f"{result.best_epoch}; run {result.run_id} in {result.tracking_uri}; model in {result.bundle_dir}")


@app.command()
def infer(
    inputs: Annotated[list[str], typer.Option("--input", "-i", help="File, folder, glob or .txt list (repeatable).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (created).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Bundle folder, checkpoint, models:/NAME@ALIAS, "
                                       "models:/NAME/N or runs:/ID/model.")],
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="Output suffix: nii.gz, nrrd, mha or keep.")] = "nii.gz",
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write softmax maps.")] = False,
    overlap: Annotated[float | None, typer.Option(help="Sliding-window overlap (default: the bundle's).")] = None,
    sw_batch_size: Annotated[int | None, typer.Option(help="Windows per forward pass.")] = None,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="Mirror TTA (all 8 flips).")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="bf16 network on CUDA and on CPUs with native "
                                             "bf16 (default: the bundle's train.amp).")] = None,
    postprocess: Annotated[bool | None, typer.Option("--postprocess/--no-postprocess",
                                                     help="Postprocessing: the bundle's fitted rules, else the "
                                                     "task rule.")] = None,
    exit_level: Annotated[int | None, typer.Option(help="Early-exit preview from head K (faster, coarser).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip cases whose output is complete.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failed case.")] = False,
    shard: Annotated[str | None, typer.Option(help="I/N: take every N-th case from the I-th (job arrays).")] = None,
    report: Annotated[Path | None, typer.Option(help="JSON report path (default OUT/report.json).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI for models:/ and runs:/ models.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Segment CT volumes with a trained model; output labels land exactly on each input's grid."""
    from medsup.inference.api import MODEL_URI_PREFIXES, InferRequest, PeerRankError, parse_shard
    from medsup.inference.api import infer as run_infer
    from medsup.inference.bundle import BundleError
    from medsup.inference.progress import RichBatchProgress

    errors: tuple[type[Exception], ...] = (BundleError, OSError, ValueError, PeerRankError)
    if model.startswith(MODEL_URI_PREFIXES):  # mlflow (~2 s to import) only where a store is asked
        from medsup.tracking import TrackingUnavailable

        errors = (*errors, TrackingUnavailable)

    try:
        request = InferRequest(
            inputs=inputs, output_dir=output, model=model, tracking_uri=tracking_uri, recursive=recursive, fmt=fmt,
            device=device, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, amp=amp, postprocess=postprocess,
            exit_level=exit_level, resume=resume, fail_fast=fail_fast, probabilities=probabilities,
            shard=parse_shard(shard) if shard else None, report=report,
        )
        with RichBatchProgress(disable=as_json or not sys.stderr.isatty()) as progress:
            result = run_infer(request, progress=progress)
    # OSError: unreadable input folder, full disk; PeerRankError: under torchrun, another rank's error;
    # TrackingUnavailable: the model URI's store does not answer
    except errors as err:
        fail(str(err))
    summary = result.as_dict()
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank holds the merged report: one tells
    if as_json and rank0:
        emit(summary)
    elif rank0:
        counts = summary["summary"]
        not_run = f", {counts['not_run']} not attempted" if counts["not_run"] else ""
        typer.echo(f"{counts['ok']} segmented, {counts['skipped']} skipped, {counts['error']} failed{not_run}; "
                   f"outputs in {output}, report {report or output / 'report.json'}")
        for case in result.failed:
            typer.secho(f"  failed: {case['input']}: {case['error']}", fg=typer.colors.RED, err=True)
    if result.failed:
        raise typer.Exit(1)


@app.command("postprocess")
def postprocess_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="Bundle folder (a run's model/) or run folder.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="The dataset the model was trained on.")],
    fold: Annotated[int | None, typer.Option(help="Fold whose validation cases to fit on (default: the "
                                             "model's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Fit a model's postprocessing on its fold's validation cases, as training does at its end, and write it
    into the bundle (postprocessing.json): for bundles trained without it, or to refit on the whole fold."""
    from medsup.inference.bundle import BundleError
    from medsup.inference.postprocess_fit import fit_model

    try:
        rules, labels = fit_model(model, data, fold, device)
    except (BundleError, OSError, ValueError) as err:
        fail(str(err))
    if as_json:
        emit(rules.fit | {"rules": rules.describe(labels)})
        return
    typer.echo(f"fitted on {rules.fit.get('cases', 0)} validation case(s): {rules.describe(labels)}")
    for name, before in rules.fit.get("dice_before", {}).items():
        typer.echo(f"  {name:<10} mean Dice {before:.4f} -> {rules.fit['dice_after'][name]:.4f}")


from medsup.cli_evaluate import evaluate_command  # noqa: E402  (light: numpy/ITK/MLflow load inside it)

app.command("evaluate")(evaluate_command)

from medsup.cli_figures import figures_command  # noqa: E402  (light: torch/matplotlib load inside it)

app.command("figures")(figures_command)


def main() -> None:
    """Entry point for ``python -m medsup``."""
    app()
