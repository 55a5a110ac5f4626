"""End-to-end per-case inference: medsup vs nnU-Net v2 vs a MONAI-tutorial pipeline, side by side.

Per case and pipeline: wall seconds of read, preprocess, network, export (logits back onto the input grid +
argmax) and write, and the peak host RSS (VmHWM) of a child process that ran just that case (plus the peak
CUDA memory on a GPU). All three pipelines get the same files, the same target spacing, patch, overlap,
Gaussian blending, sliding-window batch and TTA setting, and networks of the same topology:

- ``medsup``: :class:`medsup.inference.predictor.Predictor` (what ``medsup infer`` runs per case), with a
  random-weights bundle; postprocessing off (neither competitor has one by default).
- ``nnunet``: nnU-Net v2's ``nnUNetPredictor`` on a model folder generated here (3d_fullres plans.json,
  dataset.json, fold_0/checkpoint_final.pth) holding a ``PlainConvUNet`` with the plan's stages, kernels,
  strides and features, random weights; the stages are nnU-Net's own functions called one after another
  (reader, ``preprocessor.run_case_npy``, ``predict_logits_from_preprocessed_data``,
  ``convert_predicted_logits_to_segmentation_with_correct_shape``, ``write_seg``).
- ``monai``: LoadImaged, EnsureChannelFirstd, Orientationd, Spacingd, ScaleIntensityRanged,
  sliding_window_inference, Invertd, AsDiscreted, SaveImage (the MONAI tutorials' chain) around medsup's own
  network with the same weights, so the difference is the pipeline alone.

Each pipeline-case pair runs in a fresh child process that sets the pipeline up once and runs the case
``--repeats`` times (interpreter start-up would otherwise dominate a loaded machine); the pipeline order
rotates from case to case. The table shows medians and the ratio medsup / other of the median totals.
nnU-Net runs only where ``nnunetv2`` imports in the child interpreter (``--python``, default
``.venv-bench/bin/python`` when it exists: see BENCHMARKS.md); otherwise its rows read ``n/a (reason)``.

    .venv-bench/bin/python bench/infer_e2e.py --quick                    # seconds: tiny synthetic cases
    .venv-bench/bin/python bench/infer_e2e.py --sizes 100,300,600 --repeats 3 [--tta]
    .venv-bench/bin/python bench/infer_e2e.py --device cuda --plan liver --sizes 100,300,600 --repeats 3

``--plan coarse`` (the default on CPU: 5 mm, 32^3 patch, 4..16 filters, 3 stages) keeps the network a small
share so a 2-core machine measures the pipelines (reading, resampling, export and writing still run on the
full-resolution grid); ``--plan cpu`` (1.6 mm, 64^3, 8..64 filters, 4 stages) is network-bound on a CPU;
``--plan liver`` / ``lung`` are the reference plans (0.77 mm, 128^3, 32..320 filters, 6 stages for
liver): what to run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.infer_e2e")

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("medsup", "nnunet", "monai")
STAGES = ("read", "preprocess", "network", "export", "write")
#: plan overrides per ``--plan`` (medsup config keys); ``liver``/``lung`` keep the reference plan
PLANS: dict[str, tuple[str, list[str]]] = {
    "cpu": ("liver", ["plan.target_spacing=[1.6, 1.6, 1.6]", "plan.patch_size=[64, 64, 64]", "plan.base_filters=8",
                      "plan.max_stages=4", "plan.max_filters=64"]),
    "coarse": ("liver", ["plan.target_spacing=[5.0, 5.0, 5.0]", "plan.patch_size=[32, 32, 32]",
                         "plan.base_filters=4", "plan.max_stages=3", "plan.max_filters=16"]),
    "liver": ("liver", []),
    "lung": ("lung", []),
}


# ---------------------------------------------------------------------------------------------- child side


def _status_mb(key: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process in MB. VmHWM, not getrusage: ru_maxrss survives
    execve, so a child would inherit the parent's peak (see bench/infer_memory.py)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        line = next(ln for ln in f if ln.startswith(key))
    return int(line.split()[1]) / 1024


def _device(name: str) -> Any:
    import torch

    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        ("cpu" if name == "auto" else name))


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


_READY: dict[str, float] = {}


def _mark_ready() -> None:
    """Record the RSS once imports, model and warm-up are done: the case's own memory is the peak above it."""
    _READY["rss_mb"] = _status_mb("VmRSS")


class _Clock:
    """Wall seconds per stage, with CUDA synchronised at every boundary."""

    def __init__(self, device: Any) -> None:
        self.device, self.seconds = device, {}
        self._t = 0.0

    def start(self) -> None:
        _sync(self.device)
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._t
        self._t = now


def _mirror_mean(network: Callable[[Any], Any], tta: bool) -> Callable[[Any], Any]:
    """Per-tile mirror TTA over all 8 flips of the spatial axes (what medsup and nnU-Net do), or the network."""
    if not tta:
        return network
    from medsup.inference.window import mirror_axes

    def predict(x: Any) -> Any:
        total = None
        for dims in mirror_axes(True):
            y = network(x.flip(dims) if dims else x).float()
            y = y.flip(dims) if dims else y
            total = y if total is None else total + y
        return total / 8

    return predict


Run = Callable[[Path], dict[str, float]]
"""One case through a pipeline that is set up: ``run(case) -> seconds per stage``."""


def setup_medsup(model: Path, out: Path, opts: dict[str, Any]) -> Run:
    """medsup's Predictor: prepare (read, preprocess), predict (network, export), write."""
    import torch

    from medsup.data.io import write_image
    from medsup.inference.bundle import load_bundle
    from medsup.inference.predictor import Predictor

    device = _device(opts["device"])
    bundle = load_bundle(model / "medsup")
    options = Predictor.options_from(bundle, overlap=opts["overlap"], sw_batch_size=opts["sw_batch_size"],
                                     tta=opts["tta"], amp=opts["amp"], postprocess=False, blend="gaussian")
    predictor = Predictor(bundle, device, options)  # bf16 with amp on CUDA and on a CPU with native bf16
    with torch.inference_mode():  # warm-up: first-call kernel selection is not part of a case
        predictor.network(torch.zeros(1, 1, *bundle.plan.patch_size, device=device))

    def run(case: Path) -> dict[str, float]:
        clock = _Clock(device)
        prepared = predictor.prepare(case)
        clock.seconds.update(prepared.seconds)
        clock.start()
        prediction = predictor.predict(prepared)
        _sync(device)
        clock.seconds.update({k: prediction.seconds[k] for k in ("network", "export")})
        clock.start()
        write_image(out / "medsup.nii.gz", prediction.labels, prediction.geometry)
        clock.lap("write")
        return clock.seconds

    return run


def setup_monai(model: Path, out: Path, opts: dict[str, Any]) -> Run:
    """The MONAI tutorials' inference chain around medsup's network (same weights as the medsup run)."""
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImage,
        ScaleIntensityRanged,
        Spacingd,
    )

    from medsup.inference.bundle import load_bundle

    device = _device(opts["device"])
    bundle = load_bundle(model / "medsup")
    plan, norm = bundle.plan, bundle.plan.normalization
    network = bundle.network(device)
    pre = Compose([
        LoadImaged("image"), EnsureChannelFirstd("image"),
        Orientationd("image", axcodes=plan.orientation),
        Spacingd("image", pixdim=plan.target_spacing, mode="bilinear"),
        ScaleIntensityRanged("image", a_min=norm.clip_low, a_max=norm.clip_high, b_min=0.0, b_max=1.0, clip=True),
    ])
    # as the tutorials: invert where the logits are, hand the result to the CPU for argmax and saving
    post = Compose([Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True,
                            device="cpu"),
                    AsDiscreted("pred", argmax=True)])
    saver = SaveImage(output_dir=str(out), output_postfix="monai", separate_folder=False, print_log=False,
                      output_dtype=np.uint8, resample=False)
    amp = opts["amp"] and device.type == "cuda"
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16

    def net(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            return network(x)

    predict = _mirror_mean(net, opts["tta"])
    with torch.inference_mode():
        network(torch.zeros(1, 1, *plan.patch_size, device=device))

    @torch.inference_mode()
    def run(case: Path) -> dict[str, float]:
        clock = _Clock(device)
        clock.start()
        data: dict[str, Any] = {"image": str(case)}
        for t in pre.transforms[:2]:
            data = t(data)
        clock.lap("read")
        for t in pre.transforms[2:]:
            data = t(data)
        clock.lap("preprocess")
        logits = sliding_window_inference(data["image"][None].to(device), plan.patch_size, opts["sw_batch_size"],
                                          predict, overlap=opts["overlap"], mode="gaussian", sigma_scale=0.125)
        # a MetaTensor: Invertd takes the image's applied operations from it (a plain tensor is skipped with a warning)
        data["pred"] = MetaTensor(logits[0].as_tensor() if hasattr(logits, "as_tensor") else logits[0])
        clock.lap("network")
        data = post(data)
        clock.lap("export")
        saver(data["pred"])  # its own meta: Invertd restored the input's affine
        clock.lap("write")
        return clock.seconds

    return run


def make_nnunet_model(folder: Path, model: Path) -> None:
    """An nnU-Net v2 model folder (plans.json, dataset.json, fold_0/checkpoint_final.pth) with medsup's plan:
    same spacing, patch, kernels, strides and features, random weights. nnU-Net reads images through
    SimpleITK, whose arrays are ``(z, y, x)``: every per-axis entry of medsup's ``(i, j, k)`` plan is reversed."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from medsup.data.planning import Plan

    plan = Plan.load(model / "medsup" / "plan.json")
    labels = json.loads((model / "medsup" / "labels.json").read_text(encoding="utf-8"))
    norm = plan.normalization
    rev = lambda v: [int(x) for x in reversed(v)]  # noqa: E731
    stages = len(plan.filters)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": stages, "features_per_stage": list(plan.filters), "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [rev(k) for k in plan.kernels], "strides": [rev(s) for s in plan.strides],
            "n_conv_per_stage": [2] * stages, "n_conv_per_stage_decoder": [2] * (stages - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    spacing = [float(x) for x in reversed(plan.target_spacing)]
    plans = {
        "dataset_name": "Dataset999_Bench", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": rev(plan.median_shape),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": plan.batch_size, "patch_size": rev(plan.patch_size),
            "median_image_size_in_voxels": rev(plan.median_shape), "spacing": spacing,
            "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            # nnU-Net's planner defaults: cubic spline for images, linear for logits and segmentations
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": arch, "batch_dice": False,
        }},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": norm.clip_high, "mean": norm.mean, "median": norm.mean, "min": norm.clip_low,
            "percentile_00_5": norm.clip_low, "percentile_99_5": norm.clip_high, "std": norm.std}},
    }
    dataset = {"channel_names": {"0": "CT"}, "labels": {v: int(k) for k, v in labels.items()},
               "numTraining": 1, "file_ending": ".nii.gz"}
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    torch.manual_seed(0)
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     1, len(labels), allow_init=True, deep_supervision=False)
    checkpoint = {"network_weights": network.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                  "logging": {}, "_best_ema": None, "current_epoch": 1000, "trainer_name": "nnUNetTrainer",
                  "inference_allowed_mirroring_axes": (0, 1, 2),
                  "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                                "device": "cpu"}}
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")


def setup_nnunet(model: Path, out: Path, opts: dict[str, Any]) -> Run:
    """nnU-Net v2's predictor, stage by stage with its own functions (what ``predict_single_npy_array`` and
    ``predict_from_files`` run per case, minus their worker processes)."""
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = _device(opts["device"])
    folder = model / "nnunet"
    predictor = nnUNetPredictor(tile_step_size=1 - opts["overlap"], use_gaussian=True, use_mirroring=opts["tta"],
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    plans, conf = predictor.plans_manager, predictor.configuration_manager
    with torch.inference_mode():
        predictor.network(torch.zeros(1, 1, *conf.patch_size, device=device))
    reader = plans.image_reader_writer_class()
    preprocessor = conf.preprocessor_class(verbose=False)

    def run(case: Path) -> dict[str, float]:
        clock = _Clock(device)
        clock.start()
        images, props = reader.read_images([str(case)])
        clock.lap("read")
        data, _, props = preprocessor.run_case_npy(images, None, props, plans, conf, predictor.dataset_json)
        data = torch.from_numpy(data).to(torch.float32)
        clock.lap("preprocess")
        logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
        clock.lap("network")
        seg = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, plans, conf, predictor.label_manager, props, return_probabilities=False)
        clock.lap("export")
        reader.write_seg(seg, str(out / "nnunet.nii.gz"), props)
        clock.lap("write")
        return clock.seconds

    return run


def check_output(case: Path, out: Path) -> None:
    """The label file a pipeline wrote must lie on the input's grid (shape and spacing): a pipeline that skipped
    the way back (an Invertd that found no transform record, say) would otherwise look fast."""
    from medsup.data.io import read_header

    written = sorted(out.glob("*.nii.gz"))
    if len(written) != 1:
        raise RuntimeError(f"expected one label file in {out}, found {[p.name for p in written]}")
    got, want = read_header(written[0]).geometry, read_header(case).geometry
    if got.shape != want.shape or not np.allclose(got.spacing, want.spacing, atol=1e-3):
        raise RuntimeError(f"output grid {got.shape} @ {got.spacing} differs from the input's {want.shape} @ "
                           f"{want.spacing}")


SETUPS: dict[str, Callable[[Path, Path, dict[str, Any]], Run]] = {
    "medsup": setup_medsup, "nnunet": setup_nnunet, "monai": setup_monai}


def child_main(args: argparse.Namespace) -> None:
    """``--child PIPELINE``: set the pipeline up, run one case ``repeats`` times, print one JSON line (seconds
    per stage of every run, peak memory). One process per case and pipeline: its VmHWM is that case's peak;
    repeats share the process because interpreter start-up (~1 min on this loaded machine) would dominate."""
    import torch

    torch.manual_seed(0)
    opts = json.loads(args.opts)
    if opts.get("threads"):
        torch.set_num_threads(opts["threads"])
    result: dict[str, Any] = {"pipeline": args.child}
    try:
        if args.child == "nnunet-model":
            make_nnunet_model(Path(args.out), Path(args.model))
            result["ok"] = True
        else:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            run = SETUPS[args.child](Path(args.model), Path(args.out), opts)
            _mark_ready()
            runs = []
            for _ in range(opts.get("repeats", 1)):
                runs.append(run(Path(args.case)))
                check_output(Path(args.case), Path(args.out))
            result.update(runs=runs, ok=True, rss_ready_mb=_READY["rss_mb"])
            if torch.cuda.is_available():
                result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception as err:  # the parent prints the row as n/a with this reason
        result.update(ok=False, error=f"{type(err).__name__}: {err}")
    result["rss_peak_mb"] = _status_mb("VmHWM")
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------------------------- parent side


def run_child(python: str, pipeline: str, case: Path | None, model: Path, out: Path, opts: dict[str, Any],
              timeout: float) -> dict[str, Any]:
    """One child process; returns its JSON result (``ok`` False with ``error`` on any failure)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(Path(__file__).resolve()), "--child", pipeline, "--case", str(case or ""), "--model",
           str(model), "--out", str(out), "--opts", json.dumps(opts)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "nnUNet_raw": str(out), "nnUNet_preprocessed": str(out),
           "nnUNet_results": str(out)}
    if opts.get("threads"):  # OpenMP, MKL and BLAS pools of every library in the child, not only torch's
        env.update({k: str(opts["threads"]) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    try:
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"ok": False, "error": f"child exited {proc.returncode}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(line[len("RESULT "):])
    return result


def probe(python: str, module: str) -> str | None:
    """None when ``module`` imports in ``python``, else the reason."""
    proc = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["import failed"])[-1]
    return f"{module} not importable in {python}: {last}"


def make_bundle(folder: Path, plan_name: str) -> dict[str, Any]:
    """A random-weights medsup bundle for ``plan_name``; returns the plan's summary."""
    import torch

    from medsup.config import load
    from medsup.data.planning import default_plan
    from medsup.inference.bundle import write_bundle
    from medsup.models.unet import build_model
    from medsup.tasks import get_task

    task, overrides = PLANS[plan_name]
    cfg = load(task, overrides)
    plan = default_plan(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, plan)
    write_bundle(folder, model.state_dict(), cfg, plan, get_task(task).labels)
    return {"task": task, "spacing": list(plan.target_spacing), "patch": list(plan.patch_size),
            "filters": list(plan.filters), "strides": [list(s) for s in plan.strides],
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def make_ct(path: Path, slices: int, size: int = 512) -> None:
    """A ``size x size x slices`` int16 CT-like volume (LPS, 0.8 x 0.8 x 1 mm), a body ellipse with noise."""
    from medsup.data.geometry import Geometry
    from medsup.data.io import write_image

    rng = np.random.default_rng(slices)
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    c = size / 2
    body = ((i - c) / (0.4 * size)) ** 2 + ((j - c) / (0.3 * size)) ** 2 < 1
    plane = np.where(body, 40, -1000).astype(np.int16)
    array = np.repeat(plane[:, :, None], slices, axis=2)
    array += rng.integers(-30, 30, size=array.shape, dtype=np.int16)
    geometry = Geometry((size, size, slices), (0.8, 0.8, 1.0), (-200.0, -200.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(path, array, geometry)


def real_cases(root: Path) -> list[Path]:
    """The real CTs of ``root`` (shared/realdata) that exist."""
    wanted = [root / "unlabeled" / "crlm" / "CRLM-CT-1004_ct.nii.gz",
              *sorted((root / "lung" / "imagesTr").glob("*.nii.gz"))]
    return [p for p in wanted if p.is_file()]


def _shape(path: Path) -> str:
    from medsup.data.io import read_header

    return "x".join(str(s) for s in read_header(path).geometry.shape)


def _med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(results: dict[tuple[str, str], list[dict[str, Any]]], cases: list[tuple[str, str]],
              pipelines: Sequence[str], unavailable: dict[str, str]) -> list[str]:
    """Markdown tables: per case the median seconds per stage and total, peak RSS, ratio medsup / other."""
    lines = ["| case | pipeline | " + " | ".join(STAGES) + " | total s | medsup / this | peak RSS MB (above ready) "
             "| GPU peak MB | runs |", "|---" * (len(STAGES) + 7) + "|"]
    for name, shape in cases:
        base = [r["total"] for r in results.get((name, "medsup"), []) if r.get("ok")]
        for pipe in pipelines:
            runs = results.get((name, pipe), [])
            good = [r for r in runs if r.get("ok")]
            label = f"{name} ({shape})"
            if not good:
                reason = unavailable.get(pipe) or next((r.get("error") for r in runs if r.get("error")), "not run")
                lines.append(f"| {label} | {pipe} | n/a ({reason}) |" + " |" * (len(STAGES) + 4))
                continue
            stage = [f"{_med([r['seconds'].get(s, 0.0) for r in good]):.2f}" for s in STAGES]
            total = _med([r["total"] for r in good])
            ratio = f"{_med(base) / total:.2f}" if base else "n/a"
            peak = _med([r["rss_peak_mb"] for r in good])
            above = _med([r["rss_peak_mb"] - r["rss_ready_mb"] for r in good])
            gpu = _med([r["gpu_peak_mb"] for r in good]) if all("gpu_peak_mb" in r for r in good) else None
            lines.append(f"| {label} | {pipe} | " + " | ".join(stage) + f" | {total:.2f} | {ratio} | "
                         f"{peak:.0f} ({above:.0f}) | {'-' if gpu is None else f'{gpu:.0f}'} | {len(good)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="100,300,600", help="slices N of the synthetic 512x512xN CTs ('' = none)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per pipeline and case (median reported)")
    parser.add_argument("--tta", action="store_true", help="mirror TTA (8 flips per tile) in every pipeline")
    parser.add_argument("--plan", choices=sorted(PLANS), default=None,
                        help="coarse (5 mm, tiny net: default on CPU), cpu (1.6 mm, small net), liver or lung "
                        "(reference plans: default on CUDA)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--no-amp", action="store_true", help="fp32 everywhere: medsup autocasts to bf16 on CUDA "
                        "and on a CPU with native bf16 (nnU-Net and MONAI autocast on CUDA only)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per child (default: torch's). On a machine shared with other jobs use 1: "
                        "OpenMP barriers of a 2-thread pool stall whenever a thread is descheduled (8x here)")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--realdata", type=Path, default=ROOT.parent / "shared" / "realdata",
                        help="folder of real CTs (../shared/realdata); missing -> real cases skipped")
    parser.add_argument("--no-real", action="store_true", help="synthetic cases only")
    parser.add_argument("--real-cases", default="", help="comma-separated name parts of the real CTs to run "
                        "(default: all of crlm and lung/imagesTr)")
    parser.add_argument("--python", default=None,
                        help="interpreter for the children (default .venv-bench/bin/python if present, else this one)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child before it counts as failed")
    parser.add_argument("--quick", action="store_true", help="tiny synthetic cases, tiny plan, 1 repeat, no real data")
    parser.add_argument("--json", type=Path, default=None, help="write every raw result here (after every case)")
    parser.add_argument("--summarise", type=Path, default=None, help="print the table of a saved --json and exit")
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    if args.summarise:
        print_saved(args.summarise)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    if args.quick:
        args.sizes, args.repeats, args.no_real = "12", 1, True
        args.plan = args.plan or "coarse"
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    plan_name = args.plan or ("liver" if cuda else "coarse")
    bench_python = ROOT / ".venv-bench" / "bin" / "python"
    python = args.python or (str(bench_python) if bench_python.exists() else sys.executable)
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    unavailable = {}
    if "nnunet" in pipelines and (reason := probe(python, "nnunetv2")):
        unavailable["nnunet"] = reason
    opts = {"device": args.device, "overlap": args.overlap, "sw_batch_size": args.sw_batch_size, "tta": args.tta,
            "amp": not args.no_amp, "threads": args.threads}
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="medsup-bench-e2e-") as tmp:
        root = Path(tmp)
        model = root / "model"
        summary = make_bundle(model / "medsup", plan_name)
        if "nnunet" in pipelines and "nnunet" not in unavailable:
            made = run_child(python, "nnunet-model", None, model, model / "nnunet", opts, args.timeout)
            if not made.get("ok"):
                unavailable["nnunet"] = f"model folder: {made.get('error')}"
        cases: list[tuple[str, str, Path]] = []
        if not args.no_real:
            parts = [p.strip() for p in args.real_cases.split(",") if p.strip()]
            found = [p for p in real_cases(args.realdata) if not parts or any(x in p.name for x in parts)]
            if not found:
                log.warning("no real CTs under %s: real cases skipped", args.realdata)
            cases += [(p.name.removesuffix(".nii.gz"), _shape(p), p) for p in found]
        size = 96 if args.quick else 512
        for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
            path = root / f"synthetic_{n}.nii.gz"
            t0 = time.perf_counter()
            make_ct(path, n, size)
            log.info("wrote %s (%.1f s)", path.name, time.perf_counter() - t0)
            cases.append((f"synthetic_{n}", f"{size}x{size}x{n}", path))
        log.info("plan %s: %s; %d case(s) x %s x %d repeat(s); children run %s", plan_name, summary, len(cases),
                 pipelines, args.repeats, python)
        for c, (name, _, path) in enumerate(cases):
            # one child per case and pipeline runs the repeats; the order rotates per case so slow drift of the
            # machine's load does not always hit the same pipeline
            for pipe in pipelines[c % len(pipelines):] + pipelines[:c % len(pipelines)]:
                if pipe in unavailable:
                    continue
                out = root / "out" / f"{name}-{pipe}"
                res = run_child(python, pipe, path, model, out, {**opts, "repeats": args.repeats}, args.timeout)
                runs = [{"ok": True, "seconds": sec, "total": sum(sec.values()),
                         **{k: res[k] for k in ("rss_peak_mb", "rss_ready_mb", "gpu_peak_mb") if k in res}}
                        for sec in res.get("runs", [])] if res.get("ok") else [res]
                results[(name, pipe)] = runs
                for r, run in enumerate(runs):
                    if run.get("ok"):
                        split = ", ".join(f"{k} {v:.1f}" for k, v in run["seconds"].items())
                        log.info("%s %s run %d: %.2f s (%s), peak RSS %.0f MB", name, pipe, r, run["total"], split,
                                 run["rss_peak_mb"])
                    else:
                        log.warning("%s %s failed: %s", name, pipe, run.get("error"))
            if args.json:  # after every case, so a long run that is stopped still leaves its figures
                save(args.json, summary, opts, results, [(n, s) for n, s, _ in cases], pipelines, unavailable)
    print(f"\nplan {plan_name}: spacing {summary['spacing']} mm, patch {summary['patch']}, filters "
          f"{summary['filters']}, {summary['params_m']:.2f} M parameters (medsup); overlap {args.overlap}, "
          f"sw batch {args.sw_batch_size}, TTA {'on' if args.tta else 'off'}, device {'cuda' if cuda else 'cpu'}, "
          f"{args.threads or torch.get_num_threads()} thread(s) per child; medians of {args.repeats} run(s)\n")
    print("\n".join(summarise(results, [(n, s) for n, s, _ in cases], pipelines, unavailable)))


def save(path: Path, plan: dict[str, Any], opts: dict[str, Any], results: dict[tuple[str, str], list[dict[str, Any]]],
         cases: list[tuple[str, str]], pipelines: Sequence[str], unavailable: dict[str, str]) -> None:
    """Every raw result, enough to print the table again (``--summarise``)."""
    data = {"plan": plan, "options": opts, "cases": cases, "pipelines": list(pipelines), "unavailable": unavailable,
            "results": {f"{c}|{p}": v for (c, p), v in results.items()}}
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def print_saved(path: Path) -> None:
    """The table of a saved ``--json`` report (complete or not)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    results = {tuple(k.split("|")): v for k, v in data["results"].items()}
    print(f"plan {data['plan']}; options {data['options']}\n")
    print("\n".join(summarise(results, [tuple(c) for c in data["cases"]], data["pipelines"],  # type: ignore[misc]
                               data["unavailable"])))


if __name__ == "__main__":
    main()
