"""Training iterations/s and patches/s of medsup's training step (and nnU-Net v2's on the same patch and
batch), with and without the data pipeline, AMP, torch.compile and channels_last_3d, side by side.

The step is medsup's own (``medsup.engine.steps.make_train_step``: forward, deep-supervision DiceCE,
backward, clip, optimiser) on the network of the task's reference plan (nnU-Net's published spacing, patch,
batch). On a CPU the reference plan takes minutes per step, so ``--scale S`` (default 0.25 on CPU, 1 on
CUDA) multiplies the patch (voxels) and the filters by ``S``, divides the spacing by ``S`` (same field of
view) and re-plans the topology: the printed plan is what ran.

Every configuration runs ``--repeats`` timed blocks of ``--iters`` steps, blocks interleaved across
configurations (machine noise hits all alike); the table gives the median it/s, patches/s, the ratio to the
first row, the model FLOPs of one step (forward + backward, ``torch.utils.flop_counter.FlopCounterMode``),
achieved TFLOP/s and, with a peak (``--peak-tflops``; default 989, H100 bf16 dense, on CUDA), MFU.

- ``data``: ``synthetic`` tensors, or the real training loader (cached preprocessing, foreground-oversampled
  crop, augmentation, ``train.num_workers`` workers) over ``--data DIR`` or a small synthetic dataset made
  here. Before each timed block the loader's prefetch queue is drained, so a block sees its steady rate.
- ``amp``: ``off``, ``on`` (``train.amp_dtype`` auto: bf16 where the GPU has it), ``bf16`` or ``fp16`` (with a
  GradScaler, nnU-Net's choice) autocast; on CPU too, where medsup's trainer stays float32: the bench turns it
  on to see whether it pays; ``compile``: ``torch.compile`` of the network (slow to compile on CPU; off by default);
  ``channels_last``: channels_last_3d for the model and the inputs.
- ``host_reads``: when the host reads from the device. ``deferred`` is medsup's trainer: the loss checks its
  finiteness every ``train.sync_every`` steps and the loss is read as often (the progress bar); the epoch's
  sums stay on the device. ``step`` is what it did before: the finiteness check inside every loss call (the
  host waits for the forward before it can queue the backward) and the loss and its parts read after every
  step. On a CPU both are the same work; on a GPU ``step`` drains the queue twice a step.
- ``nnunet``: nnU-Net v2's ``nnUNetTrainer.train_step`` (its PlainConvUNet with deep supervision, DC+CE with
  its 1/2^i weights, SGD 0.99 Nesterov, clip 12) on synthetic tensors; only where ``nnunetv2`` imports (run
  this script with ``.venv-bench/bin/python``, see BENCHMARKS.md).

    .venv-bench/bin/python bench/train_step.py --quick
    .venv-bench/bin/python bench/train_step.py --tasks liver,lung --scale 0.25 --iters 2 --repeats 3
    .venv-bench/bin/python bench/train_step.py --device cuda --compile off,on --iters 20 --repeats 5
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _setup import add_threads_option, start, sync

log = logging.getLogger("bench.train_step")


@dataclass
class Runner:
    """One configuration: ``block(n)`` runs ``n`` steps and returns their wall seconds."""

    name: dict[str, str]
    block: Callable[[int], float]
    batch: int
    flops: float = float("nan")
    times: list[float] = field(default_factory=list)



def scaled_cfg(task: str, scale: float, extra: list[str]) -> tuple[Any, Any]:
    """Config and plan of ``task``'s reference plan scaled by ``scale``: patch voxels and filters times
    ``scale``, spacing divided by it (the patch keeps its field of view, so the data pipeline crops the same
    anatomy from ``scale^3`` fewer voxels); the topology is re-planned for the smaller patch."""
    from medsup.config import load
    from medsup.data.planning import default_plan

    ref = default_plan(load(task))
    overrides = list(extra)
    spacing = [round(s / scale, 3) for s in ref.target_spacing]
    if scale != 1:
        base = load(task).plan
        patch = [max(8, 8 * round(p * scale / 8)) for p in ref.patch_size]
        overrides += [f"plan.patch_size={patch}", f"plan.base_filters={max(2, round(base.base_filters * scale))}",
                      f"plan.max_filters={max(4, round(base.max_filters * scale))}"]
    overrides += [f"plan.target_spacing={spacing}", f"plan.batch_size={ref.batch_size}"]
    cfg = load(task, overrides)
    plan = default_plan(cfg)
    # the patch must divide by the (re-planned) stride product: round it up to the next multiple
    div = plan.topology.divisor
    patch = [d * math.ceil(p / d) for p, d in zip(plan.patch_size, div, strict=True)]
    if patch != list(plan.patch_size):
        cfg = load(task, [*overrides, f"plan.patch_size={patch}"])
        plan = default_plan(cfg)
    return cfg, plan


def synthetic_batches(plan: Any, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The same random batch forever (what the step sees, without any data pipeline)."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(plan.batch_size, 1, *plan.patch_size, generator=g)
    label = torch.randint(0, plan.num_classes, (plan.batch_size, 1, *plan.patch_size), generator=g).float()
    batch = {"image": image.to(device), "label": label.to(device)}
    return itertools.repeat(batch)


class LoaderFeed:
    """The real training loader, restarted when an epoch ends; ``drain()`` empties its prefetch queue."""

    def __init__(self, cfg: Any, plan: Any, data: Path, device: torch.device) -> None:
        from medsup.data.datalist import load_datalist
        from medsup.data.loaders import training_loaders
        from medsup.data.splits import make_splits

        cases = {c.case_id: c for c in load_datalist(data).labelled}
        split = make_splits(sorted(cases), max(2, min(cfg.data.num_folds, len(cases))), cfg.seed)[0]
        t0 = time.perf_counter()
        self.loader, _ = training_loaders(cfg, plan, cases, split, device)
        self.cache_s = time.perf_counter() - t0
        self.workers = self.loader.num_workers
        self.it = iter(self.loader)

    def __next__(self) -> Any:
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def __iter__(self) -> LoaderFeed:
        return self

    def drain(self) -> None:
        """Take what the workers prefetched (2 batches each) so the next block waits for fresh batches."""
        for _ in range(2 * self.workers):
            next(self)


AMP = {"off": (False, "auto"), "on": (True, "auto"), "bf16": (True, "bfloat16"), "fp16": (True, "float16")}


def medsup_runner(cfg: Any, plan: Any, device: torch.device, *, amp: str, compile_: bool, channels_last: bool,
                  feed: Iterator[Any], drain: Callable[[], None] | None, per_step_reads: bool = False,
                  ) -> tuple[Callable[[int], float], float]:
    """medsup's real training step for one configuration (``amp``: a key of :data:`AMP`); returns ``(block, flops per
    step)``."""
    from ignite.engine import Engine

    import medsup.engine.steps as steps
    from medsup.data.batch_augment import BatchAugment
    from medsup.data.transforms import augment_in_step
    from medsup.losses import build_loss
    from medsup.models.unet import build_model

    torch.manual_seed(0)
    model = build_model(cfg, plan).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    net: Any = torch.compile(model) if compile_ else model
    loss_fn = build_loss(cfg)
    every = 1 if per_step_reads else cfg.train.sync_every
    loss_fn.check_every = every
    optimizer = steps.build_optimizer(cfg, model)
    # medsup trains in float32 on any CPU (autocast_dtype); the bench asks for bf16 there to see what it gives
    real_dtype = steps.autocast_dtype

    def bench_dtype(dev: torch.device, enabled: bool, choice: str = "auto") -> torch.dtype | None:
        if dev.type == "cpu" and enabled:
            return torch.float16 if choice == "float16" else torch.bfloat16
        return real_dtype(dev, enabled, choice)

    steps.autocast_dtype = bench_dtype  # type: ignore[assignment]
    enabled, choice = AMP[amp]
    # with the real loader, where training augments in the step (CUDA), the bench does too
    augment = None
    if isinstance(feed, LoaderFeed) and augment_in_step(cfg, device):
        augment = BatchAugment(cfg, plan, cfg.seed)
    try:
        step = steps.make_train_step(net, loss_fn, optimizer, device, amp=enabled, amp_dtype=choice,
                                     grad_clip=cfg.train.grad_clip, channels_last=channels_last, augment=augment)
    finally:
        steps.autocast_dtype = real_dtype
    engine = Engine(step)
    engine.register_events(*steps.StepEvents)

    flops = count_flops(lambda: step(engine, next(feed)))
    optimizer.zero_grad(set_to_none=True)

    done = 0

    def block(n: int) -> float:
        nonlocal done
        if drain is not None:
            drain()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            out = step(engine, next(feed))
            done += 1
            if per_step_reads:  # before train.sync_every: the loss and its parts (the epoch sums) every step
                float(out["loss"])
                _ = loss_fn.last_parts
            elif done % every == 0:  # the progress bar's read
                float(out["loss"])
        sync(device)
        return time.perf_counter() - t0

    return block, flops


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn`` (forward + backward of the network), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def nnunet_runner(plan: Any, device: torch.device) -> tuple[Callable[[int], float], float]:
    """nnU-Net v2's own ``train_step`` on synthetic tensors, with the plan's patch, batch and topology."""
    from types import SimpleNamespace

    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    stages = len(plan.filters)
    kwargs = {"n_stages": stages, "features_per_stage": list(plan.filters), "conv_op": "torch.nn.modules.conv.Conv3d",
              "kernel_sizes": [list(k) for k in plan.kernels], "strides": [list(s) for s in plan.strides],
              "n_conv_per_stage": [2] * stages, "n_conv_per_stage_decoder": [2] * (stages - 1), "conv_bias": True,
              "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
              "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    torch.manual_seed(0)
    network = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", kwargs,
                                     ["conv_op", "norm_op", "dropout_op", "nonlin"], 1, plan.num_classes,
                                     allow_init=True, deep_supervision=True).to(device)
    # nnU-Net's _build_loss: DC+CE, weights 1/2^i with the lowest resolution 0, normalised
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    heads = stages - 1
    weights = [1 / 2**i for i in range(heads)]
    weights[-1] = 0
    total = sum(weights)
    loss = DeepSupervisionWrapper(loss, [w / total for w in weights])
    optimizer = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    # nnU-Net's trainer: a GradScaler on CUDA (its step autocasts to fp16 there), none on CPU
    trainer = SimpleNamespace(network=network, optimizer=optimizer, loss=loss, device=device,
                              grad_scaler=torch.amp.GradScaler("cuda") if device.type == "cuda" else None)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(plan.batch_size, 1, *plan.patch_size, generator=g)
    label = torch.randint(0, plan.num_classes, (plan.batch_size, 1, *plan.patch_size), generator=g).float()
    # nnU-Net's loader hands the step one target per head, downsampled (nearest) to each head's shape
    shapes = [tuple(o.shape[2:]) for o in network.train()(image.to(device))]
    target = [torch.nn.functional.interpolate(label, size=s, mode="nearest-exact").to(device) for s in shapes]
    batch = {"data": image.to(device), "target": target}

    def one() -> Any:
        return nnUNetTrainer.train_step(trainer, batch)  # type: ignore[arg-type]

    flops = count_flops(one)

    def block(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            one()
        sync(device)
        return time.perf_counter() - t0

    return block, flops


def make_dataset(task: str, cases: int, out: Path) -> Path:
    """A small synthetic dataset of ``task`` (default-size phantoms)."""
    from medsup.data.synth import synthesize

    return synthesize(task, cases, out, seed=0, test_cases=0)


def amp_name(device: torch.device, amp: str) -> str:
    """The dtype a row's ``amp`` setting trains in (what :func:`medsup_runner` gives the step)."""
    if amp == "off":
        return "fp32"
    if amp == "fp16":
        return "fp16"
    if device.type == "cuda" and amp == "on" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "fp16"
    return "bf16"


def _axis(text: str) -> list[bool]:
    return [{"off": False, "on": True}[v.strip()] for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="liver,lung")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--scale", type=float, default=None, help="patch/filter scale (default 0.25 CPU, 1 CUDA)")
    parser.add_argument("--iters", type=int, default=2, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per configuration (median reported)")
    parser.add_argument("--amp", default="off,on", help="comma list of off | on (auto) | bf16 | fp16")
    parser.add_argument("--compile", default="off", help="off | on | off,on (slow to compile on CPU)")
    parser.add_argument("--channels-last", default="off,on", help="off | on | off,on")
    parser.add_argument("--data", default="off,on", help="real data pipeline: off (synthetic tensors) | on | off,on")
    parser.add_argument("--dataset", type=Path, default=None, help="dataset folder for --data on (per task: use "
                        "one --tasks value); default: a synthetic set made here")
    parser.add_argument("--cases", type=int, default=3, help="cases of the synthetic dataset")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the config's)")
    parser.add_argument("--host-reads", default="deferred",
                        help="deferred (medsup's trainer, train.sync_every) | step (every step, as before) | both")
    parser.add_argument("--nnunet", default="auto", help="auto (when nnunetv2 imports) | off")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak for MFU (default 989 = H100 bf16 dense on CUDA, none on CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny scale, 1 iteration x 1 block, one task")
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.quick:
        args.tasks, args.iters, args.repeats, args.cases = "liver", 1, 1, 2
        args.scale = args.scale or 0.125
        args.channels_last, args.amp = "off", "off,on"
    scale = args.scale or (1.0 if device.type == "cuda" else 0.25)
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == "cuda" else None)
    nnunet_reason = None
    if args.nnunet != "off":
        try:
            import nnunetv2  # noqa: F401
        except ImportError as err:
            nnunet_reason = f"nnunetv2 not importable here ({err}); run with .venv-bench/bin/python"
    runners: list[Runner] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="medsup-bench-train-") as tmp:
        for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            extra = [] if args.workers is None else [f"train.num_workers={args.workers}"]
            cfg, plan = scaled_cfg(task, scale, extra)
            notes.append(f"{task}: scale {scale}: patch {list(plan.patch_size)} x batch {plan.batch_size}, spacing "
                         f"{list(plan.target_spacing)}, filters {list(plan.filters)}, {len(plan.filters)} stages")
            feed: LoaderFeed | None = None
            if True in _axis(args.data):
                data = args.dataset or make_dataset(task, args.cases, Path(tmp) / task)
                feed = LoaderFeed(cfg, plan, data, device)
                notes.append(f"{task}: data pipeline: {data} ({feed.workers} workers), caching took "
                             f"{feed.cache_s:.1f} s")
            reads = [r.strip() for r in args.host_reads.replace("both", "step,deferred").split(",") if r.strip()]
            amps = [a.strip() for a in args.amp.split(",") if a.strip()]
            unknown = set(amps) - set(AMP)
            if unknown:
                parser.error(f"--amp: unknown {sorted(unknown)}; expected off, on, bf16, fp16")
            for use_data, amp, comp, cl, read in itertools.product(_axis(args.data), amps,
                                                                   _axis(args.compile), _axis(args.channels_last),
                                                                   reads):
                src: Iterator[Any] = feed if use_data and feed is not None else synthetic_batches(plan, device)
                block, flops = medsup_runner(cfg, plan, device, amp=amp, compile_=comp, channels_last=cl, feed=src,
                                             drain=feed.drain if use_data and feed is not None else None,
                                             per_step_reads=read == "step")
                name = {"task": task, "step": "medsup", "data": "loader" if use_data else "synthetic",
                        "amp": amp_name(device, amp), "compile": "on" if comp else "off",
                        "channels_last": "on" if cl else "off",
                        "host_reads": read if read == "step" else f"every {cfg.train.sync_every}"}
                runners.append(Runner(name, block, plan.batch_size, flops))
            if args.nnunet != "off":
                # nnU-Net's step autocasts (fp16 + GradScaler) whenever it runs on CUDA and never on CPU
                name = {"task": task, "step": "nnunet", "data": "synthetic",  # its step reads the loss every step
                        "amp": "fp16" if device.type == "cuda" else "fp32", "compile": "off", "channels_last": "off",
                        "host_reads": "step"}
                if nnunet_reason is None:
                    block, flops = nnunet_runner(plan, device)
                    runners.append(Runner(name, block, plan.batch_size, flops))
                else:
                    runners.append(Runner(name, lambda n: float("nan"), plan.batch_size))
        for r in runners:  # warm-up (and compilation) outside the timed blocks
            r.block(1)
        for rep in range(args.repeats):
            for r in runners:
                r.times.append(r.block(args.iters))
            log.info("repeat %d/%d done", rep + 1, args.repeats)
    print(f"\ndevice {device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{args.iters} steps x {args.repeats} blocks per row (median)")
    for note in notes:
        print(note)
    print()
    cols = ["task", "step", "data", "amp", "compile", "channels_last", "host_reads"]
    print("| " + " | ".join(cols) + " | it/s | patches/s | vs first row | GFLOP/step | TFLOP/s | MFU |")
    print("|---" * (len(cols) + 6) + "|")
    first: dict[str, float] = {}
    for r in runners:
        cells = [r.name[c] for c in cols]
        if not r.times or any(math.isnan(t) for t in r.times):
            print("| " + " | ".join(cells) + f" | n/a ({nnunet_reason}) |" + " |" * 5)
            continue
        its = args.iters / statistics.median(r.times)
        base = first.setdefault(r.name["task"], its)
        tflops = r.flops * its / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
        print("| " + " | ".join(cells) + f" | {its:.3f} | {its * r.batch:.2f} | {its / base:.2f} | "
              f"{r.flops / 1e9:.3g} | {tflops:.3g} | {mfu} |")


if __name__ == "__main__":
    main()
