"""glibc malloc as it comes against medsup's settings (``medsup.hostmem.tune_host_allocator``): CPU training steps
and a sliding-window inference, each in fresh child processes, alternating, so both see the same machine.

    .venv/bin/python bench/host_alloc.py                      # quick liver preset: train steps + inference
    .venv/bin/python bench/host_alloc.py --parts train --repeats 5

Why: torch's CPU tensors come from ``malloc``; by default freed memory at the top of the heap goes back to the
kernel, and the next step faults the same activations in again, page by page. The settings are per process
and cannot be undone in it, so each arm is its own child (``MEDSUP_TUNE_MALLOC=0`` for "default"). Each child
builds the quick preset's network (random weights) and times either ``--steps`` real training steps
(``medsup.engine.steps.make_train_step``: forward, deep-supervision loss, backward, clip, AdamW) on a synthetic
batch, or ``--volumes`` sliding-window predictions (``medsup.inference.window.SlidingWindow``, overlap 0.5, 2
tiles per call) of a synthetic ``--volume``^3 image; it reports the median seconds after a warm-up, its minor
page faults and its peak RSS. Ratio default / tuned > 1: the tuned process is faster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.host_alloc")


def child(part: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one arm in this process (the allocator settings were chosen by the parent's environment)."""
    from medsup.hostmem import tune_host_allocator

    tuned = tune_host_allocator()
    import torch
    from ignite.engine import Engine

    import medsup.engine.steps as steps
    from medsup.config import load
    from medsup.data.planning import default_plan
    from medsup.inference.window import SlidingWindow
    from medsup.losses import build_loss
    from medsup.models.unet import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load(args.task, presets=[args.preset] if args.preset else [])
    plan = default_plan(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, plan)
    cpu = torch.device("cpu")
    times = []
    if part == "train":
        step = steps.make_train_step(model, build_loss(cfg), steps.build_optimizer(cfg, model), cpu, amp=False,
                                     grad_clip=cfg.train.grad_clip)
        engine = Engine(step)
        g = torch.Generator().manual_seed(0)
        batch = {"image": torch.randn(plan.batch_size, 1, *plan.patch_size, generator=g),
                 "label": torch.randint(0, plan.num_classes, (plan.batch_size, 1, *plan.patch_size), generator=g)}
        step(engine, batch)  # warm-up
        for _ in range(args.steps):
            t = time.perf_counter()
            step(engine, batch)
            times.append(time.perf_counter() - t)
    else:
        model.eval()
        window = SlidingWindow(plan.patch_size, 0.5, 2, "gaussian", pad_value=0.0)
        image = torch.randn(1, 1, args.volume, args.volume, args.volume, generator=torch.Generator().manual_seed(0))
        labels: list[torch.Tensor] = []

        def sink(slab: torch.Tensor) -> None:  # what export does first: the class map of each finished slab
            labels.append(slab.argmax(0).to(torch.uint8))

        with torch.inference_mode():
            for i in range(args.volumes + 1):  # the first is the warm-up
                labels.clear()
                t = time.perf_counter()
                window.run(image, model, sink, cpu)
                if i:
                    times.append(time.perf_counter() - t)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"tuned": tuned, "median_s": statistics.median(times), "times": times,
            "minor_faults": usage.ru_minflt, "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="train,infer", help="train | infer | train,infer")
    parser.add_argument("--task", default="liver")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--repeats", type=int, default=3, help="children per arm and part (alternating)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per child")
    parser.add_argument("--volumes", type=int, default=2, help="timed predictions per child")
    parser.add_argument("--volume", type=int, default=160, help="edge of the synthetic volume to predict")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    passthrough = ["--task", args.task, "--preset", args.preset, "--steps", str(args.steps),
                   "--volumes", str(args.volumes), "--volume", str(args.volume)]
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    for part in parts:
        for repeat in range(args.repeats):
            arms = ["default", "tuned"] if repeat % 2 == 0 else ["tuned", "default"]
            for arm in arms:
                env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
                env["MEDSUP_TUNE_MALLOC"] = "1" if arm == "tuned" else "0"
                env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
                proc = subprocess.run([sys.executable, __file__, "--child", part, *passthrough], env=env,
                                      capture_output=True, encoding="utf-8", check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"{part}/{arm} child failed:\n{proc.stderr[-3000:]}")
                out = json.loads(proc.stdout.strip().splitlines()[-1])
                if out["tuned"] != (arm == "tuned"):
                    raise RuntimeError(f"{part}/{arm}: the child's allocator settings are not the arm's ({out})")
                results.setdefault((part, arm), []).append(out)
                log.info("%s %s repeat %d: %.3f s, %d minor faults, peak RSS %.0f MB", part, arm, repeat,
                         out["median_s"], out["minor_faults"], out["peak_rss_mb"])
    unit = {"train": "s / step", "infer": f"s / {args.volume}^3 volume"}
    print(f"\n{args.task} ({args.preset or 'reference'} plan), CPU, medians over {args.repeats} children per arm")
    print("| part | allocator | median | minor page faults | peak RSS MB | default / tuned (per repeat) |")
    print("|---|---|---|---|---|---|")
    for part in parts:
        default, tuned = results[(part, "default")], results[(part, "tuned")]
        ratios = [d["median_s"] / t["median_s"] for d, t in zip(default, tuned, strict=True)]
        for arm, rows in (("glibc default", default), ("medsup tuned", tuned)):
            ratio = (f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})"
                     if arm == "medsup tuned" else "1.00")
            print(f"| {part} | {arm} | {statistics.median(r['median_s'] for r in rows):.3f} {unit[part]} | "
                  f"{statistics.median(r['minor_faults'] for r in rows):,.0f} | "
                  f"{statistics.median(r['peak_rss_mb'] for r in rows):.0f} | {ratio} |")


if __name__ == "__main__":
    main()
