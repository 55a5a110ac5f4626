"""Samples/s of the training data pipeline (cached preprocessing + random crop + augmentation) against the
training step rate it must feed, measured side by side in one process on the same machine.

    .venv/bin/python bench/dataload.py --data demo/liver_synth --preset quick --batches 40

Prints the median seconds per batch of (a) the loader alone and (b) a training step on synthetic tensors
of the same shape, and their ratio: below 1 the loader keeps up; above 1 the step waits for data.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch

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
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, default=None, help="override train.num_workers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = [f"train.iterations_per_epoch={args.batches}"]
    if args.workers is not None:
        overrides.append(f"train.num_workers={args.workers}")
    cfg = load(args.task, overrides, presets=[args.preset])
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
    load_med = statistics.median(loader_times[1:])  # the first batch includes worker start-up
    step_med = statistics.median(step_times[1:])
    bs = plan.batch_size
    print(f"patch {list(plan.patch_size)} x batch {bs}, workers {cfg.train.num_workers}, "
          f"{torch.get_num_threads()} torch threads; caching {len(split['train'])} cases took {cache_s:.1f} s")
    n = len(loader_times) - 1
    print(f"loader alone: {load_med:.3f} s/batch ({bs / load_med:.1f} samples/s, median of {n})")
    print(f"training step: {step_med:.3f} s/batch ({bs / step_med:.1f} samples/s, median of {len(step_times) - 1})")
    verdict = "keeps up" if load_med < step_med else "STARVES the step"
    print(f"loader / step time: {load_med / step_med:.2f} ({verdict})")


if __name__ == "__main__":
    main()
