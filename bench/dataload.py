"""Samples/s of the training data pipeline (cached preprocessing + random crop + augmentation) against the
training step rate it must feed, measured side by side in one process on the same machine.

    .venv/bin/python bench/dataload.py --data demo/liver_synth --preset quick --batches 40 --threads 1

Prints the median seconds per batch of (a) the loader alone, (b) a training step on synthetic tensors of
the same shape, (c) the step fed by the loader (both competing for the same cores, as in training), and
the ratio loader / step: below 1 the loader keeps up; above 1 the step waits for data. Then, to say where
it starves, the mean milliseconds per sample of each random transform after the cache (crop, affine,
flips, intensity, noise; mean over --samples), run in this process one after another on cached cases.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from _setup import add_threads_option, start

log = logging.getLogger("bench.dataload")


def main() -> None:
    from medsup.config import load
    from medsup.data.datalist import load_datalist
    from medsup.data.fingerprint import plan_dataset
    from medsup.data.splits import make_splits
    from medsup.losses import build_loss
    from medsup.models.unet import build_model
    from medsup.train import _loaders

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--task", default="liver")
    parser.add_argument("--preset", default="quick", help="config preset ('' = none: the task's reference plan)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, default=None, help="override train.num_workers")
    parser.add_argument("--samples", type=int, default=20, help="samples for the per-transform breakdown")
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    overrides = [f"train.iterations_per_epoch={args.batches}"]
    if args.workers is not None:
        overrides.append(f"train.num_workers={args.workers}")
    cfg = load(args.task, overrides, presets=[args.preset] if args.preset else [])
    out = Path("/tmp/medsup-bench-dataload")
    plan = plan_dataset(args.data, cfg, out / "plan.json")
    cases = {c.case_id: c for c in load_datalist(args.data).labelled}
    split = make_splits(sorted(cases), cfg.data.num_folds, cfg.seed)[0]
    t0 = time.perf_counter()
    loader, _ = _loaders(cfg, plan, cases, split, torch.device("cpu"))
    cache_s = time.perf_counter() - t0

    loader_times = []
    t = time.perf_counter()
    for _ in loader:
        now = time.perf_counter()
        loader_times.append(now - t)
        t = now
    model = build_model(cfg, plan)
    loss_fn = build_loss(cfg)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(plan.batch_size, 1, *plan.patch_size)
    y = torch.randint(0, plan.num_classes, (plan.batch_size, 1, *plan.patch_size))
    step_times = []
    for _ in range(min(10, args.batches)):
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        step_times.append(time.perf_counter() - t)
    fed_times = []
    it = iter(loader)
    for _ in range(2 * max(1, cfg.train.num_workers)):  # drain the prefetch queue: time the steady rate
        next(it)
    t = time.perf_counter()
    for batch in it:
        opt.zero_grad()
        image, label = batch["image"].as_tensor(), batch["label"].as_tensor().round().long()
        loss_fn(model(image), label).backward()
        opt.step()
        now = time.perf_counter()
        fed_times.append(now - t)
        t = now
        if len(fed_times) >= min(10, args.batches):
            break
    load_med = statistics.median(loader_times[1:])  # the first batch includes worker start-up
    step_med = statistics.median(step_times[1:])
    fed_med = statistics.median(fed_times)
    bs = plan.batch_size
    print(f"patch {list(plan.patch_size)} x batch {bs}, workers {cfg.train.num_workers}, "
          f"{torch.get_num_threads()} torch threads; caching {len(split['train'])} cases took {cache_s:.1f} s")
    n = len(loader_times) - 1
    print(f"loader alone: {load_med:.3f} s/batch ({bs / load_med:.1f} samples/s, median of {n})")
    print(f"training step: {step_med:.3f} s/batch ({bs / step_med:.1f} samples/s, median of {len(step_times) - 1})")
    print(f"step fed by the loader: {fed_med:.3f} s/batch ({bs / fed_med:.1f} samples/s, median of {len(fed_times)}; "
          f"{fed_med / step_med:.2f}x the step alone)")
    verdict = "keeps up" if load_med < step_med else "STARVES the step"
    print(f"loader / step time: {load_med / step_med:.2f} ({verdict})")
    print("random transforms per sample (after the cache, in this process):")
    for name, ms in transform_breakdown(loader.dataset, args.samples):
        print(f"  {name:<28} {ms:8.1f} ms")


def transform_breakdown(dataset: Any, samples: int) -> list[tuple[str, float]]:
    """Mean milliseconds per sample of each transform from the first random one on (what the workers run for
    every sample), applied in order to copies of the cached cases."""
    from monai.transforms import RandomizableTrait, Transform

    chain = dataset.transform
    first = chain.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
    steps = chain.transforms[first:] if first is not None else []
    cached = [c for c in dataset._cache if c is not None]
    times: dict[str, list[float]] = {}
    for n in range(samples):
        data = deepcopy(cached[n % len(cached)])
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
