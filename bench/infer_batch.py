"""Batch inference (``medsup infer`` over a folder) with and without writing behind, side by side in one process.

    .venv/bin/python bench/infer_batch.py --threads 1                 # CPU: real CTs + 2 synthetic 512x512x100
    python bench/infer_batch.py --device cuda --plan liver --sizes 100,300   # a GPU: the reference plan

``run_batch`` reads the next case in a background thread while the current one is predicted; writing behind
(``write_behind=True``, the default) also writes the previous case's label file in another thread, so a batch
takes about the sum of the predictions instead of the sum of predictions and writes. The same
:class:`medsup.inference.predictor.Predictor` (random weights, ``--plan``; postprocessing off) runs the same
folder into a fresh output folder per pass, the two modes alternating (which goes first alternates too), after
one warm-up pass of each; medians of ``--repeats`` passes. Per mode: the wall time of the batch, and the sums
over the cases of the stages the report records (read + preprocess happen in the prefetch thread already).
Ratio > 1: writing behind is faster. The outputs of the two modes are compared voxel for voxel.

Random weights give noisy label maps, which gzip slowly (a trained model's map of a 512x512x300 CT writes in
~0.1 s, this one's in ~1 s: see BENCHMARKS.md), so the write share here is an upper bound of a real model's.
No timed tests.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _setup import add_threads_option, start
from infer_e2e import PLANS, make_bundle, make_ct, real_cases

log = logging.getLogger("bench.infer_batch")

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
STAGES = ("read", "preprocess", "network", "export", "write")


def one_pass(predictor: Any, jobs: list[Any], out: Path, behind: bool) -> tuple[float, dict[str, float]]:
    """Wall seconds of one batch into ``out`` (made fresh), and the report's stage seconds summed over cases."""
    from medsup.inference.batch import BatchReport, CaseJob, run_batch

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    moved = [CaseJob(j.input, out / j.output.name) for j in jobs]
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    report = run_batch(predictor, moved, BatchReport({}), out / "report.json", write_behind=behind)
    wall = time.perf_counter() - t0
    bad = [c for c in report.cases if c["status"] != "ok"]
    if bad:
        raise RuntimeError(f"cases failed: {bad}")
    return wall, {s: sum(c["seconds"].get(s, 0.0) for c in report.cases) for s in STAGES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--plan", default="coarse", choices=sorted(PLANS))
    parser.add_argument("--sizes", default="100,100", help="slices N of synthetic 512x512xN CTs in the batch")
    parser.add_argument("--no-real", action="store_true", help="synthetic cases only")
    parser.add_argument("--repeats", type=int, default=5)
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    logging.getLogger("medsup").setLevel(logging.WARNING)  # one line per case and pass is noise here
    from medsup.data.io import read_image
    from medsup.inference.batch import discover_inputs, plan_outputs
    from medsup.inference.bundle import load_bundle
    from medsup.inference.predictor import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan = make_bundle(root / "model", args.plan)
        inputs = root / "in"
        inputs.mkdir()
        for path in [] if args.no_real else real_cases(REALDATA):
            (inputs / path.name).symlink_to(path)
        for k, n in enumerate(int(s) for s in args.sizes.split(",") if s):
            make_ct(inputs / f"synthetic_{k}_{n}.nii.gz", n)
        jobs = plan_outputs(discover_inputs(inputs), root / "unused")
        device = torch.device(args.device)
        bundle = load_bundle(root / "model")
        # what `medsup infer` runs (the bundle's settings: bf16 on CUDA), postprocessing off as in infer_e2e.py
        predictor = Predictor(bundle, device, Predictor.options_from(bundle, overlap=0.5, postprocess=False))
        log.info("%d cases, plan %s (%s), device %s, torch threads %d", len(jobs), args.plan, plan["spacing"],
                 device, torch.get_num_threads())
        results: dict[bool, list[tuple[float, dict[str, float]]]] = {True: [], False: []}
        for r in range(args.repeats + 1):  # pass 0 of each mode: warm-up, not counted
            for behind in ((True, False) if r % 2 else (False, True)):
                wall, stages = one_pass(predictor, jobs, root / ("behind" if behind else "sync"), behind)
                log.info("pass %d %-6s %.2f s", r, "behind" if behind else "sync", wall)
                if r:
                    results[behind].append((wall, stages))
        for job in jobs:  # the same labels either way
            a, b = (read_image(root / m / job.output.name).array for m in ("behind", "sync"))
            np.testing.assert_array_equal(a, b)

    med = {m: statistics.median(w for w, _ in results[m]) for m in results}
    sums = {m: {s: statistics.median(st[s] for _, st in results[m]) for s in STAGES} for m in results}
    print(f"\n{len(jobs)} cases, plan {args.plan}, {args.device}, threads {torch.get_num_threads()}, "
          f"medians of {args.repeats} passes (stage sums over the cases, seconds)\n")
    print("| mode | batch wall s | " + " | ".join(STAGES) + " | ratio sync / this |")
    print("|---|---|" + "---|" * len(STAGES) + "---|")
    for m, name in ((False, "write, then next case (before)"), (True, "write behind (now)")):
        print(f"| {name} | {med[m]:.2f} | " + " | ".join(f"{sums[m][s]:.2f}" for s in STAGES)
              + f" | {med[False] / med[m]:.2f}x |")


if __name__ == "__main__":
    main()
