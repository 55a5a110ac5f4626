"""medsup's inference with the network in float32 against bf16 autocast, side by side in one process: seconds
and labels, per case.

    .venv/bin/python bench/infer_dtype.py                                # random weights, 1.6 mm plan, real CTs
    .venv/bin/python bench/infer_dtype.py --set plan.base_filters=32 --set plan.max_filters=320 --set \
        plan.max_stages=5                                                # the reference liver filters
    .venv/bin/python bench/infer_dtype.py --model RUN/model --validation  # a trained bundle on its validation cases

Each case is read and preprocessed once, then predicted by two ``Predictor`` s of the same bundle, ``amp`` off
and on (``medsup infer --no-amp`` / ``--amp``), interleaved, medians of ``--repeats`` after a warm-up of each.
``network s`` is the report's network stage (sliding window and the export it streams into), ``case s`` the
whole ``predict`` (postprocessing too). ``labels agree``: the share of voxels with the same label in both
arms; ``Dice f32 vs bf16``: per foreground class, the bf16 labels against the float32 ones; with a reference
label (``--validation``: the validation cases listed in the run's ``validation.json``), each arm's Dice
against it. On a CPU the bf16 arm is what ``medsup infer`` runs where the CPU has native bf16
(``medsup.device.cpu_has_native_bf16``; ``$MEDSUP_CPU_BF16=1`` forces it, emulated and slow elsewhere).
Ratio > 1: bf16 is faster. No timed tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from _setup import add_threads_option, start
from infer_e2e import PLANS, ROOT, real_cases

log = logging.getLogger("bench.infer_dtype")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--model", type=Path, default=None, help="a bundle folder (default: random weights on "
                        "--plan, written to a temp folder)")
    parser.add_argument("--plan", default="cpu", choices=sorted(PLANS), help="the random bundle's plan")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of the random bundle, repeatable")
    parser.add_argument("--validation", action="store_true", help="the model's validation cases, with their "
                        "labels (validation.json beside the bundle), instead of the real CTs")
    parser.add_argument("--cases", type=Path, nargs="*", default=None, help="images (default: the real CTs of "
                        "--realdata, or --validation's)")
    parser.add_argument("--realdata", type=Path, default=ROOT.parent / "shared" / "realdata")
    parser.add_argument("--repeats", type=int, default=3)
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    from medsup.config import load
    from medsup.data.io import read_image
    from medsup.data.planning import default_plan
    from medsup.engine.validation import dice_per_class
    from medsup.inference.bundle import load_bundle, write_bundle
    from medsup.inference.predictor import PredictOptions, Predictor
    from medsup.models.unet import build_model
    from medsup.tasks import get_task

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            task, overrides = PLANS[args.plan]
            cfg = load(task, [*overrides, *args.overrides])
            plan = default_plan(cfg)
            torch.manual_seed(0)
            folder = write_bundle(Path(tmp) / "bundle", build_model(cfg, plan).state_dict(), cfg, plan,
                                  get_task(task).labels)
        bundle = load_bundle(folder)
        references: dict[Path, Path] = {}
        if args.validation:
            rows = json.loads((Path(folder).parent / "validation.json").read_text(encoding="utf-8"))
            references = {Path(r["image"]): Path(r["label"]) for r in rows}
        cases = args.cases or list(references) or real_cases(args.realdata)
        arms = {amp: Predictor(bundle, device, PredictOptions(amp=amp)) for amp in (False, True)}
        classes = sorted(c for c in bundle.labels if c != 0)
        names = [bundle.labels[c] for c in classes]
        log.info("%s, %d torch threads, torch %s; plan: spacing %s, patch %s, filters %s; arms %s; medians of %d",
                 device, torch.get_num_threads(), torch.__version__, list(bundle.plan.target_spacing),
                 list(bundle.plan.patch_size), list(bundle.plan.filters),
                 [arms[a].network_dtype for a in arms], args.repeats)
        rows_out = []
        for path in cases:
            prepared = arms[False].prepare(path)
            labels = {amp: arm.predict(prepared).labels for amp, arm in arms.items()}  # warm-up, and the labels
            network: dict[bool, list[float]] = {False: [], True: []}
            whole: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for amp, arm in arms.items():
                    prediction = arm.predict(prepared)
                    network[amp].append(prediction.seconds["network"])
                    whole[amp].append(sum(v for k, v in prediction.seconds.items() if k not in ("read", "preprocess")))
            agree = float(np.mean(labels[True] == labels[False]))
            between = dice_per_class(labels[True], labels[False], classes)
            ref = ""
            if path in references:
                truth = read_image(references[path]).array
                ref = " / ".join(f"{name} {dice_per_class(labels[False], truth, [c])[0]:.4f} vs "
                                 f"{dice_per_class(labels[True], truth, [c])[0]:.4f}"
                                 for name, c in zip(names, classes, strict=True))
            n32, n16 = statistics.median(network[False]), statistics.median(network[True])
            w32, w16 = statistics.median(whole[False]), statistics.median(whole[True])
            rows_out.append(f"| {path.name} | {'x'.join(map(str, labels[False].shape))} | {n32:.2f} | {n16:.2f} | "
                            f"{n32 / n16:.2f} | {w32:.2f} | {w16:.2f} | {w32 / w16:.2f} | {agree:.4%} | "
                            + ", ".join(f"{n} {d:.4f}" for n, d in zip(names, between, strict=True))
                            + f" | {ref or '-'} |")
            log.info("%s done", path.name)
    print("\n| case | shape | network s f32 | network s bf16 | f32 / bf16 | case s f32 | case s bf16 | f32 / bf16 | "
          "labels agree | Dice f32 vs bf16 | Dice vs reference, f32 vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows_out))


if __name__ == "__main__":
    main()
