"""Sliding-window inference with and without reusing the logits of single-value tiles, side by side in one
process, on the real CTs of ../shared/realdata.

    .venv/bin/python bench/constant_tiles.py                       # CPU: the 1.6 mm plan, every real CT found
    python bench/constant_tiles.py --device cuda --plan liver       # a GPU: the reference liver plan

A tile that holds one value throughout (air, or any tissue below the plan's CT clip: after clipping and
normalisation it is all the clip's floor) gets the same logits wherever it lies, so ``SlidingWindow`` predicts
it once per value and case and reuses the result (``SlidingWindow.reuse_constant``). Each row: the case's
preprocessed grid, its tiles, how many hold one value, and one whole sliding-window call (``inference_mode``,
random weights in ``medsup infer``'s layout, the plan's patch, overlap 0.5 and batch) with reuse on and off,
interleaved, medians of ``--repeats`` after a warm-up. ``max |diff|``: the largest logit difference between
the two, ``argmax agrees``: the share of voxels whose class is the same. They differ because reuse changes
which tiles share a network call: oneDNN picks other kernels for another batch size, and a one-value tile is
ill-conditioned under instance norm (its deep features vary little, so the norm magnifies rounding): with
random weights in channels-last its logits move by ~0.1 between a batch of one and of two with or without
reuse. Ratio > 1: reuse is faster. No timed tests.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _setup import add_threads_option, start
from infer_e2e import PLANS

log = logging.getLogger("bench.constant_tiles")

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
#: the real CTs of ../shared/realdata, by the name shown in the table (paths below REALDATA)
CASES = {
    "CRLM (liver, portal venous)": "unlabeled/crlm/CRLM-CT-1004_ct.nii.gz",
    "TotalSegmentator example": "liver_io/totalsegmentator_example/example_ct.nii.gz",
    "NSCLC LUNG1-001": "lung/imagesTr/nsclc_LUNG1-001.nii.gz",
    "pyradiomics lung1": "lung/imagesTr/pyrad_lung1.nii.gz",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--plan", default=None, choices=sorted(PLANS), help="default: cpu (1.6 mm) on a CPU, "
                        "liver on CUDA")
    parser.add_argument("--cases", default=None, help=f"a subset, separated by semicolons: {'; '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=3)
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    from medsup.config import load
    from medsup.data.io import read_image
    from medsup.data.planning import default_plan
    from medsup.data.transforms import background_value, preprocess_volume
    from medsup.device import inference_memory_format
    from medsup.hostmem import tune_host_allocator
    from medsup.inference.window import SlidingWindow, constant_value, sliding_window_logits, tile_starts
    from medsup.models.unet import build_model

    tune_host_allocator()
    device = torch.device(args.device)
    plan_name = args.plan or ("cpu" if device.type == "cpu" else "liver")
    cfg = load(*PLANS[plan_name])
    plan = default_plan(cfg)
    torch.manual_seed(0)
    net = build_model(cfg, plan).to(device, memory_format=inference_memory_format(device)).eval()
    window = SlidingWindow(plan.patch_size, 0.5, cfg.infer.sw_batch_size, cfg.infer.blend,
                           background_value(plan.normalization))
    chosen = [c.strip() for c in args.cases.split(";")] if args.cases else list(CASES)
    log.info("%s, %d torch threads, torch %s; plan %s: spacing %s, patch %s, filters %s, batch %d; medians of %d",
             device, torch.get_num_threads(), torch.__version__, plan_name, list(plan.target_spacing),
             list(plan.patch_size), list(plan.filters), window.batch_size, args.repeats)

    def call(image: torch.Tensor, reuse: bool) -> tuple[float, torch.Tensor]:
        window.reuse_constant = reuse
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with torch.inference_mode():
            logits = sliding_window_logits(image, net, window, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t, logits

    rows = []
    for name in chosen:
        path = REALDATA / CASES[name]
        if not path.is_file():
            log.warning("%s: %s is absent, skipped", name, path)
            continue
        image = preprocess_volume(read_image(path), plan, image=True, dtype=np.float16).as_tensor()[None]
        grid = [max(int(n), p) for n, p in zip(image.shape[2:], plan.patch_size, strict=True)]
        starts = [tile_starts(n, p, 0.5) for n, p in zip(grid, plan.patch_size, strict=True)]
        px, py, pz = plan.patch_size
        # on the unpadded image: a padded axis (smaller than the patch) counts its tiles as mixed, which they are
        # unless the pad value happens to equal the tile's value
        one_value = sum(constant_value(image[..., i:i + px, j:j + py, k:k + pz]) is not None
                        for i, j, k in itertools.product(*starts))
        tiles = len(starts[0]) * len(starts[1]) * len(starts[2])
        _, on = call(image, True)  # warm-up of both arms, and the logits to compare
        _, off = call(image, False)
        diff = float((on - off).abs().max())
        agree = float((on.argmax(1) == off.argmax(1)).float().mean())
        del on, off
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for reuse in (False, True):
                times[reuse].append(call(image, reuse)[0])
        t_off, t_on = statistics.median(times[False]), statistics.median(times[True])
        rows.append(f"| {name} | {list(image.shape[2:])} | {tiles} | {one_value} ({one_value / tiles:.0%}) | "
                    f"{t_off:.2f} | {t_on:.2f} | {t_off / t_on:.2f} | {diff:.1e} | {agree:.4%} |")
    print("\n| case | grid | tiles | one-value tiles | reuse off, s | reuse on, s | off / on | max |diff| | "
          "argmax agrees |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
