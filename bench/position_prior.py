"""Does a trained model think the middle of a patch is a lesion? Models side by side on the same patches.

    .venv/bin/python bench/position_prior.py --data runs/pipelines/ablation-lung/data \\
        --model centred=RUN_A/model --model jitter=RUN_B/model --cases lung_000 lung_002 lung_003

For each model (a bundle folder, or a checkpoint) and case: draw ``--patches`` seeded patches of the model's
plan that hold no reference foreground and are mostly tissue, predict each one alone (eval mode), and average
the foreground probability (every class but background) at each position in the patch. Prints, per model,
the mean probability in the central half of the patch (every axis) and in the outer shell, their ratio
(1: no position prior; the same patches for every model of the same plan), and the voxels a sliding window
over the whole case calls foreground where the reference has none (false-positive voxels) and the case's
Dice. A patch sampler that always centres the lesions (``train.foreground_jitter=0``) shows up as a ratio
far above 1 and false positives at the middle of every tile.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

import numpy as np
import torch
from _setup import add_threads_option, start

from medsup.data.transforms import background_value, eval_transforms
from medsup.engine.validation import dice_per_class, summarise
from medsup.inference.bundle import load_bundle
from medsup.inference.window import SlidingWindow, sliding_window_logits

log = logging.getLogger("bench.position_prior")


def position_map(network: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, patch: tuple[int, ...],
                 floor: float, n: int, seed: int) -> torch.Tensor | None:
    """Mean foreground probability ``(px, py, pz)`` over ``n`` seeded lesion-free tissue patches of ``image``
    ``(1, 1, X, Y, Z)`` (normalised; ``floor`` is air) with reference ``label`` ``(X, Y, Z)``; None when none
    were found."""
    rng = np.random.default_rng(seed)
    total, found = torch.zeros(patch), 0
    for _ in range(50 * n):
        if found == n:
            break
        start_ = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape[2:], patch, strict=True)]
        box = tuple(slice(s, s + p) for s, p in zip(start_, patch, strict=True))
        # lesion-free, and mostly tissue: air-only patches say nothing about a position prior
        if label[box].any() or float((image[0, 0][box] > floor + 1e-3).float().mean()) < 0.3:
            continue
        with torch.inference_mode():
            total += network(image[(slice(None), slice(None), *box)]).softmax(1)[0, 1:].sum(0)
        found += 1
    return total / found if found else None


def centre_and_shell(prob: torch.Tensor) -> tuple[float, float]:
    """Mean of ``prob`` ``(px, py, pz)`` in the central half along every axis, and outside it."""
    inner = tuple(slice(p // 4, p - p // 4) for p in prob.shape)
    centre = prob[inner]
    shell = (prob.sum() - centre.sum()) / (prob.numel() - centre.numel())
    return float(centre.mean()), float(shell)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="labelled dataset (imagesTr/, labelsTr/)")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="a model bundle folder or checkpoint, named; repeat to compare")
    parser.add_argument("--cases", nargs="+", required=True, help="case ids (file names without suffix)")
    parser.add_argument("--patches", type=int, default=40, help="lesion-free patches per case")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    print(f"{'model':<16} {'case':<12} {'p centre':>9} {'p shell':>9} {'ratio':>7} {'FP voxels':>10} {'Dice':>6}")
    for spec in args.model:
        name, _, path = spec.partition("=")
        bundle = load_bundle(Path(path))
        network = bundle.network(torch.device("cpu")).eval()
        plan = bundle.plan
        floor = background_value(plan.normalization)
        window = SlidingWindow(plan.patch_size, bundle.cfg.infer.overlap, bundle.cfg.infer.sw_batch_size,
                               bundle.cfg.infer.blend, floor)
        classes = [c for c in sorted(bundle.labels) if c != 0]
        ratios = []
        for case in args.cases:
            item = {"image": str(args.data / "imagesTr" / f"{case}.nii.gz"),
                    "label": str(args.data / "labelsTr" / f"{case}.nii.gz")}
            data = eval_transforms(plan)(item)
            image = data["image"].as_tensor()[None]
            label = data["label"].as_tensor()[0].round().long()
            prob = position_map(network, image, label, tuple(plan.patch_size), floor, args.patches, args.seed)
            with torch.inference_mode():
                pred = sliding_window_logits(image, network, window).argmax(1)[0]
            fp = int(((pred > 0) & (label == 0)).sum())
            # the validation summary: mean over the classes present in the reference or the prediction
            dice = summarise([{"dice": dice_per_class(pred, label, classes)}], [str(c) for c in classes])["val.dice"]
            if prob is None:
                print(f"{name:<16} {case:<12} {'(no lesion-free tissue patch)':>27} {fp:>10} {dice:>6.3f}")
                continue
            centre, shell = centre_and_shell(prob)
            ratios.append(centre / max(shell, 1e-12))
            print(f"{name:<16} {case:<12} {centre:>9.4f} {shell:>9.4f} {ratios[-1]:>7.1f} {fp:>10} {dice:>6.3f}")
        if ratios:
            print(f"{name:<16} {'median':<12} {'':>9} {'':>9} {statistics.median(ratios):>7.1f}")


if __name__ == "__main__":
    main()
