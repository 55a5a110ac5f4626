"""Where medsup's inference time goes on one case: cProfile over ``Predictor.prepare`` + ``Predictor.predict``
(+ the write), and torch.profiler's operator table for the same call.

Uses the same random-weights bundle as ``bench/infer_e2e.py`` (default ``--plan coarse``: 5 mm, 32^3 patch,
4..16 filters), so the split matches its CPU table.

    .venv/bin/python bench/profile_infer.py                      # the CRLM case from ../shared/realdata
    .venv/bin/python bench/profile_infer.py --case scan.nii.gz --plan liver --top 30
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import logging
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infer_e2e import PLANS, ROOT, make_bundle

log = logging.getLogger("bench.profile_infer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path,
                        default=ROOT.parent / "shared" / "realdata" / "unlabeled" / "crlm" / "CRLM-CT-1004_ct.nii.gz")
    parser.add_argument("--plan", choices=sorted(PLANS), default="coarse")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    parser.add_argument("--no-torch-profiler", action="store_true", help="skip the torch.profiler pass")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a machine "
                        "shared with other jobs, where a 2-thread OpenMP pool stalls at every barrier)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.case.is_file():
        raise SystemExit(f"{args.case}: no such file (real CTs live in ../shared/realdata); pass --case")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from medsup.data.io import write_image
    from medsup.inference.bundle import load_bundle
    from medsup.inference.predictor import Predictor

    with tempfile.TemporaryDirectory(prefix="medsup-bench-profile-") as tmp:
        summary = make_bundle(Path(tmp) / "bundle", args.plan)
        bundle = load_bundle(Path(tmp) / "bundle")
        options = Predictor.options_from(bundle, overlap=0.5, sw_batch_size=2, tta=args.tta, postprocess=False)
        predictor = Predictor(bundle, torch.device("cpu"), options)
        with torch.inference_mode():
            predictor.network(torch.zeros(1, 1, *bundle.plan.patch_size))

        def case() -> dict[str, float]:
            prepared = predictor.prepare(args.case)
            prediction = predictor.predict(prepared)
            t0 = time.perf_counter()
            write_image(Path(tmp) / "out.nii.gz", prediction.labels, prediction.geometry)
            return {**prediction.seconds, "write": time.perf_counter() - t0}

        gc.collect()  # else a collection of the set-up's garbage lands inside the profile (~0.6 s here)
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        seconds = case()
        profiler.disable()
        wall = time.perf_counter() - t0
        print(f"case {args.case.name}, plan {args.plan} {summary}, TTA {'on' if args.tta else 'off'}, "
              f"{torch.get_num_threads()} torch threads")
        print(f"wall {wall:.1f} s under cProfile; stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))
        for key in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(args.top)
            print(f"\n--- cProfile, sorted by {key} ---")
            print("\n".join(ln for ln in out.getvalue().splitlines() if ln.strip())[-(args.top + 4) * 200:])
        if not args.no_torch_profiler:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                case()
            print("\n--- torch.profiler, operators by self CPU time ---")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
