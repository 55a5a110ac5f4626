"""Samples/s of the training data pipeline (cached preprocessing + random crop + augmentation) against the
training step rate it must feed, measured side by side in one process on the same machine.

    .venv/bin/python bench/dataload.py --data demo/liver_synth --preset quick --batches 40 --threads 1

Prints the seconds per batch of (a) the loader alone (mean of its steady batches), (b) a training step on
synthetic tensors of the same shape, (c) the step fed by the loader (both competing for the same cores, as in
training), and the ratio loader / step: below 1 the loader keeps up; above 1 the step waits for data. With
``--target-rate`` the step is not run here: the loader is held against a given rate instead (the samples/s a
GPU step eats, e.g. 25 for nnU-Net's epoch of 250 iterations x 2 patches in 20 s), with the workers that
rate needs at the measured per-worker rate.

Then the loader alone with MONAI's default per-sample deep copy of the cached case against medsup's copy of
the patch only (``--copy-repeats`` alternating passes, ratio of the medians). Then, to say where it starves,
the mean milliseconds per sample of each random transform after the cache (crop, affine, flips, intensity,
noise; mean over --samples), run in this process one after another on cached cases.

Then where the augmentation runs (``augment.runs_in``, ``--augment-repeats`` alternating passes): the loader
augmenting every sample against the loader that only crops and hands over the cache's float16 / uint8 (the
step augments: ``auto`` on CUDA), with the bytes each hands over per sample, and what the step then pays for it
on ``--device`` (``BatchAugment`` on one batch: the host's draws, and the whole call, medians).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from typing import Any

import torch
from _setup import add_loader_options, add_threads_option, loader_setup, start, sync

log = logging.getLogger("bench.dataload")


def main() -> None:
    from medsup.data.loaders import training_loaders
    from medsup.device import usable_cpus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_loader_options(parser)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="the device the loader feeds (its auto worker count, pinned memory); the step itself "
                             "is only run on the CPU, so cuda needs --target-rate")
    parser.add_argument("--samples", type=int, default=20, help="samples for the per-transform breakdown")
    parser.add_argument("--target-rate", type=float, default=None,
                        help="samples/s the loader must feed (a GPU step's rate); skips the CPU step")
    parser.add_argument("--copy-repeats", type=int, default=3,
                        help="passes of the loader with and without MONAI's per-sample cache copy (0: skip)")
    parser.add_argument("--augment-repeats", type=int, default=3,
                        help="passes of the loader augmenting vs only cropping (the step augments; 0: skip)")
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    if args.device == "cuda" and args.target_rate is None:
        parser.error("--device cuda measures the loader only: give the step's rate with --target-rate")
    # the memory cache (its copy and its cached items are what is measured; bench/train_cache.py compares disk)
    cfg, plan, cases, split = loader_setup(args, "train.cache=memory")
    t0 = time.perf_counter()
    loader, _ = training_loaders(cfg, plan, cases, split, torch.device(args.device))
    cache_s = time.perf_counter() - t0

    load_s, n_load = _steady_seconds(loader)
    bs, workers = plan.batch_size, loader.num_workers
    tensors = [v for item in loader.dataset._cache if item for v in item.values() if isinstance(v, torch.Tensor)]
    cache_gb = sum(v.numel() * v.element_size() for v in tensors) / 1e9
    float_gb = sum(v.numel() * 4 for v in tensors) / 1e9  # the cache before: float32 images and labels
    print(f"patch {list(plan.patch_size)} x batch {bs}, workers {workers}, {torch.get_num_threads()} torch "
          f"threads; caching {len(split['train'])} cases took {cache_s:.1f} s and holds {cache_gb:.2f} GB "
          f"({float_gb:.2f} GB as float32)")
    print(f"loader alone: {load_s:.3f} s/batch ({bs / load_s:.1f} samples/s, "
          f"mean of {n_load} after the prefetch queue)")
    if args.target_rate is not None:
        rate = bs / load_s
        # per worker: the loader's processes share this machine's cores, so more workers than cores add nothing
        per_worker = rate / max(1, min(workers, usable_cpus()))
        verdict = "keeps up" if rate >= args.target_rate else "STARVES the step"
        print(f"target: {args.target_rate:.1f} samples/s; loader / target: {rate / args.target_rate:.2f} "
              f"({verdict}); {per_worker:.1f} samples/s per busy core -> "
              f"{math.ceil(args.target_rate / per_worker)} workers on dedicated cores reach the target")
    else:
        step_med, fed_med, n_step, n_fed = _step_rates(cfg, plan, loader)
        print(f"training step: {step_med:.3f} s/batch ({bs / step_med:.1f} samples/s, median of {n_step})")
        print(f"step fed by the loader: {fed_med:.3f} s/batch ({bs / fed_med:.1f} samples/s, median of "
              f"{n_fed}; {fed_med / step_med:.2f}x the step alone)")
        verdict = "keeps up" if load_s < step_med else "STARVES the step"
        print(f"loader / step time: {load_s / step_med:.2f} ({verdict})")
    if args.copy_repeats:
        copy_s: dict[bool, list[float]] = {flag: [] for flag in (True, False)}
        for _ in range(args.copy_repeats):
            for flag in copy_s:  # alternate, so a change of the machine's load hits both
                copy_s[flag].append(_loader_seconds(loader, flag))
        monai, ours = (statistics.median(copy_s[f]) for f in (True, False))
        print(f"cache copy per sample (loader alone, median of {args.copy_repeats} passes of {args.batches} batches"
              f", each pass's mean s/batch): "
              f"MONAI's default deep copy {monai:.3f} s/batch, medsup's patch copy {ours:.3f} s/batch: "
              f"{monai / ours:.2f}x the samples/s")
    print("random transforms per sample (after the cache, in this process):")
    for name, ms in transform_breakdown(loader.dataset, args.samples):
        print(f"  {name:<28} {ms:8.1f} ms")
    if args.augment_repeats:
        augment_where(cfg, plan, loader, torch.device(args.device), args.augment_repeats)


def augment_where(cfg: Any, plan: Any, loader: Any, device: torch.device, repeats: int) -> None:
    """The loader augmenting vs only cropping, alternating passes over the same cached dataset (its chain
    swapped: the cached head is the same), and the step's cost of augmenting one batch on ``device``."""

    from medsup.data import preprocessed as pre
    from medsup.data.batch_augment import BatchAugment
    from medsup.data.transforms import train_transforms
    from medsup.engine.steps import prepare

    ds = loader.dataset
    original = ds.transform
    chains = {where: train_transforms(cfg, plan, pre.foreground_classes(cfg), augment=where == "loader")
              for where in ("loader", "step")}
    seconds: dict[str, list[float]] = {where: [] for where in chains}
    sample_mb: dict[str, float] = {}
    try:
        for _ in range(repeats):
            for where, chain in chains.items():  # alternate, so a change of the machine's load hits both
                chain.set_random_state(cfg.seed)
                ds.transform = chain
                seconds[where].append(_steady_seconds(_fresh(loader))[0])
                sample = ds[0]  # one sample, in this process: what a worker hands over for it
                sample_mb[where] = sum(sample[k].numel() * sample[k].element_size() for k in ("image", "label")) / 1e6
        batch = next(iter(_fresh(loader)))  # the step's chain's: what the step below is fed
    finally:
        ds.transform = original
    bs = loader.batch_size
    med = {where: statistics.median(v) for where, v in seconds.items()}
    print(f"where the augmentation runs (loader alone, median of {repeats} passes, each pass's mean s/batch):")
    for where in chains:
        what = "augments every sample" if where == "loader" else "only crops (the step augments)"
        print(f"  loader {what:<32} {med[where]:.3f} s/batch ({bs / med[where]:6.1f} samples/s), "
              f"{sample_mb[where]:.1f} MB per sample handed over")
    print(f"  -> {med['loader'] / med['step']:.2f}x the loader's samples/s when the step augments")
    # what the step pays: the last 'step' batch, on the device as the training step has it
    augment = BatchAugment(cfg, plan, cfg.seed)
    draws, calls = [], []
    for _ in range(50):  # the host's part alone: cheap, so many
        t0 = time.perf_counter()
        augment.draw(bs)
        draws.append(time.perf_counter() - t0)
    for _ in range(max(5, 2 * repeats)):
        sync(device)
        t0 = time.perf_counter()
        prepare(batch, device, channels_last=False, augment=augment)
        sync(device)
        calls.append(time.perf_counter() - t0)
    print(f"  the step on {device.type}: host draws {1000 * statistics.median(draws):.2f} ms (median of "
          f"{len(draws)}), transfer + augment {1000 * statistics.median(calls):.1f} ms per batch of {bs} (median of "
          f"{len(calls)}; p < 1 stages fire in some calls only)")



def _steady_seconds(loader: Any) -> tuple[float, int]:
    """Mean seconds per batch of one pass over ``loader`` once it runs steadily: the first
    ``1 + prefetch_factor x workers`` batches are left out (worker start-up, and batches the workers made
    while starting, which arrive at once); returns ``(seconds, batches measured)``. The mean, not the
    median: the rate is what matters, and the batches with a random affine (p 0.2 per sample) are the slow
    ones a median would leave out."""
    skip = 1 + (loader.prefetch_factor or 0) * loader.num_workers
    times = []
    t = time.perf_counter()
    for _ in loader:
        now = time.perf_counter()
        times.append(now - t)
        t = now
    if len(times) < skip + 3:
        raise SystemExit(f"--batches {len(times)} is too few: the first {skip} are start-up; use {skip + 10}+")
    return statistics.fmean(times[skip:]), len(times) - skip


def _loader_seconds(loader: Any, copy_cache: bool) -> float:
    """:func:`_steady_seconds` of a fresh loader over ``loader``'s cached dataset with MONAI's ``copy_cache``
    set as given (``True``: every sample deep-copies its whole cached case first). Same workers, batch and
    sampler length."""

    ds = loader.dataset
    ds.copy_cache = copy_cache
    try:
        return _steady_seconds(_fresh(loader))[0]
    finally:
        ds.copy_cache = False


def _fresh(loader: Any) -> Any:
    """A new loader over ``loader``'s dataset (as its chain and cache copy stand now): same workers, batch,
    sampler and pinning."""
    from monai.data import DataLoader

    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory, drop_last=True)


def _step_rates(cfg: Any, plan: Any, loader: Any) -> tuple[float, float, int, int]:
    """Median seconds per training step on synthetic tensors, and per step fed by ``loader`` (both on this
    machine's cores, as in training); returns ``(step, fed, n_step, n_fed)``."""
    from medsup.engine.steps import prepare
    from medsup.losses import build_loss
    from medsup.models.unet import build_model

    steps = min(10, cfg.train.iterations_per_epoch)
    model = build_model(cfg, plan)
    loss_fn = build_loss(cfg)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(plan.batch_size, 1, *plan.patch_size)
    y = torch.randint(0, plan.num_classes, (plan.batch_size, 1, *plan.patch_size))
    step_times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        step_times.append(time.perf_counter() - t)
    fed_times: list[float] = []
    it = iter(loader)
    for _ in range(2 * max(1, loader.num_workers)):  # drain the prefetch queue: time the steady rate
        next(it)
    t = time.perf_counter()
    for batch in it:
        opt.zero_grad()
        image, label = prepare(batch, torch.device("cpu"), channels_last=False)  # as the training step does
        loss_fn(model(image), label).backward()
        opt.step()
        now = time.perf_counter()
        fed_times.append(now - t)
        t = now
        if len(fed_times) >= steps:
            break
    return statistics.median(step_times[1:]), statistics.median(fed_times), len(step_times) - 1, len(fed_times)


def transform_breakdown(dataset: Any, samples: int) -> list[tuple[str, float]]:
    """Mean milliseconds per sample of each transform from the first random one on (what the workers run for
    every sample), applied in order to the cached cases, as the training loader applies them."""
    from monai.transforms import RandomizableTrait, Transform

    chain = dataset.transform
    first = chain.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
    steps = chain.transforms[first:] if first is not None else []
    cached = [c for c in dataset._cache if c is not None]
    times: dict[str, list[float]] = {}
    for n in range(samples):
        data = dict(cached[n % len(cached)])  # as the loader: no copy of the cached case, the crop copies
        for i, t in enumerate(steps):
            t0 = time.perf_counter()
            data = t(data)
            axis = getattr(t, "flipper", None)
            name = type(t).__name__ + (f"(axis {axis.spatial_axis})" if axis is not None else "")
            times.setdefault(f"{i:2d} {name}", []).append(1000 * (time.perf_counter() - t0))
    # the mean, not the median: a transform applied with probability 0.1 costs 0.1 x its time per sample
    rows = [(name, statistics.fmean(v)) for name, v in times.items()]
    return [*rows, ("total", sum(ms for _, ms in rows))]


if __name__ == "__main__":
    main()
