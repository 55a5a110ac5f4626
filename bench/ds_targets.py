"""What do the coarse deep-supervision heads get to see of the lesions? nearest-exact vs max targets.

    .venv/bin/python bench/ds_targets.py --data runs/pipelines/ablation-lung/data \\
        --plan runs/pipelines/lung-pilot/plan-2mm.json

Every labelled case is brought to the plan's grid (the validation transforms: orientation, spacing); each
lesion (a connected component of a lesion class) is followed down to every decoder head's scale ``f`` (the
plan's cumulative strides). A head's target is made from a training patch whose start is random, so the
fine voxel that nearest-exact samples for a coarse voxel sits at a random phase modulo ``f``: the lesion is
in the target of a given patch with probability (phases of ``[0, f)^3`` at which some lesion voxel is sampled)
/ f^3. The ``max`` target (``loss.ds_label_downsample=max``) always holds it, grown to whole coarse voxels:
the script prints that growth (coarse voxels x f^3 / lesion voxels, median over the phases' mean).
Per scale and lesion-diameter bin: lesions, mean P(seen) under nearest-exact, lesions missing from most
patches' targets (P(seen) < 0.5), and the median growth under max. No network and no timing: a property of
the data and the plan.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
from _setup import add_threads_option, start
from scipy import ndimage

from medsup.config import load
from medsup.data.datalist import load_datalist
from medsup.data.planning import Plan
from medsup.data.transforms import eval_transforms
from medsup.models.unet import build_model
from medsup.tasks import get_task

log = logging.getLogger("bench.ds_targets")
BINS_MM = (0.0, 5.0, 10.0, 20.0, math.inf)


def seen_fraction(coords: np.ndarray, f: tuple[int, int, int]) -> float:
    """Fraction of the ``prod(f)`` sampling phases at which nearest-exact keeps a voxel of a lesion whose
    voxel indices are ``coords`` ``(N, 3)``."""
    phases = {tuple(c) for c in (coords % np.asarray(f)).tolist()}
    return len(phases) / float(np.prod(f))


def max_growth(coords: np.ndarray, f: tuple[int, int, int]) -> float:
    """Mean over the sampling phases of (coarse voxels the max target marks x their fine volume) / lesion
    voxels: how much larger than the lesion the coarse head's ``max`` target is."""
    fa = np.asarray(f)
    grown = [len({tuple(c) for c in ((coords + np.asarray(p)) // fa).tolist()}) * int(fa.prod())
             for p in np.ndindex(*f)]
    return float(np.mean(grown)) / len(coords)


def diameter_mm(n_voxels: int, spacing: tuple[float, ...]) -> float:
    """Equivalent-sphere diameter of ``n_voxels`` voxels of ``spacing`` mm."""
    return float((6.0 * n_voxels * float(np.prod(spacing)) / math.pi) ** (1.0 / 3.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="labelled dataset (imagesTr/, labelsTr/)")
    parser.add_argument("--plan", type=Path, required=True, help="the plan.json the heads are built from")
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    plan = Plan.load(args.plan)
    task = get_task(plan.task)
    factors = build_model(load(plan.task), plan).head_scales()[1:]  # head 0 is full resolution
    transform = eval_transforms(plan)
    # (head, bin) -> per lesion: P(seen) under nearest-exact, growth under max
    seen: dict[tuple[int, int], list[float]] = defaultdict(list)
    growth: dict[tuple[int, int], list[float]] = defaultdict(list)
    for case in load_datalist(args.data).labelled:
        label = transform({"image": str(case.image), "label": str(case.label)})["label"]
        lab = np.rint(label.as_tensor()[0].numpy()).astype(np.int16)
        for cls in task.lesion_classes:
            components, _ = ndimage.label(lab == cls)
            for idx, where in enumerate(ndimage.find_objects(components), start=1):
                if where is None:
                    continue
                local = np.argwhere(components[where] == idx)
                coords = local + np.array([s.start for s in where])
                b = int(np.searchsorted(BINS_MM, diameter_mm(len(coords), plan.target_spacing), side="right")) - 1
                for h, f in enumerate(factors, start=1):
                    seen[(h, b)].append(seen_fraction(coords, f))
                    growth[(h, b)].append(max_growth(coords, f))
        log.info("%s done", case.case_id)
    print(f"plan {args.plan}: spacing {plan.target_spacing} mm, heads 1.. at factors {factors}")
    print(f"{'head':<6} {'factor':<10} {'diameter mm':<12} {'lesions':>8} {'P(seen) nearest':>16} "
          f"{'P < 0.5':>8} {'max: growth':>12}")
    for h, f in enumerate(factors, start=1):
        for b in range(len(BINS_MM) - 1):
            p = seen.get((h, b), [])
            if not p:
                continue
            span = f"{BINS_MM[b]:g}-{BINS_MM[b + 1]:g}" if math.isfinite(BINS_MM[b + 1]) else f">{BINS_MM[b]:g}"
            rare = sum(1 for v in p if v < 0.5)
            print(f"{h:<6} {'x'.join(map(str, f)):<10} {span:<12} {len(p):>8} {statistics.mean(p):>16.2f} "
                  f"{rare:>8} {statistics.median(growth[(h, b)]):>11.1f}x")


if __name__ == "__main__":
    main()
