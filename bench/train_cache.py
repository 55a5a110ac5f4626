"""The training cache in memory (MONAI ``CacheDataset``) against on disk (``train.cache: disk``), side by side.

    .venv/bin/medsup synth --task liver --cases 8 --full-size --seed 1 --test-cases 0 --out /tmp/liver_full8
    .venv/bin/python bench/train_cache.py --data /tmp/liver_full8 --preset "" \
        --set "plan.target_spacing=[0.77,0.77,0.77]" --set "plan.patch_size=[128,128,128]" --workers 1 --threads 1

For each mode a fresh process builds the training and validation loaders exactly as ``medsup train`` does
(``medsup.data.loaders.training_loaders``) and draws ``--batches`` training batches:

- ``memory``: MONAI's ``CacheDataset`` preprocesses every case into RAM at the start (what every run,
  resume and fold pays);
- ``disk-cold``: an empty disk cache: every case preprocessed and written (``medsup preprocess`` or the first
  run);
- ``disk-warm``: the store that ``disk-cold`` left: nothing to preprocess, the arrays are memory-mapped.

Per mode: the seconds until the loaders are ready (start-up: preprocessing, writing, or neither), the loader's
seconds per batch once steady (``bench/dataload.py``'s measure), the peak resident memory of the main process
(where the memory cache lives; the workers fork from it and share its pages), and the bytes of the disk cache.
``--repeats`` rounds, the modes in a different order each round; medians printed. The operating system's page
cache is not dropped between modes (that needs root): a warm disk cache is read from memory if the machine has
it to spare, which is also what a second training run on the same machine sees.

Then the rest of a training start that reads every case, in this process: the data check and the dataset
fingerprint (the plan), without the per-case memo that a disk cache keeps (``medsup.data.memo``), with an
empty memo (filled as they go) and with the memo filled; the plan must come out the same every way.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _setup import add_loader_options, add_threads_option, loader_setup, start

log = logging.getLogger("bench.train_cache")
MODES = ("memory", "disk-cold", "disk-warm")


def child(args: argparse.Namespace) -> dict[str, float]:
    """One mode in this (fresh) process: build the loaders, draw the batches, report."""
    import torch
    from dataload import _steady_seconds

    from medsup.data.loaders import training_loaders

    cache = "memory" if args.child == "memory" else "disk"
    cfg, plan, cases, split = loader_setup(args, f"train.cache={cache}", f"train.cache_dir={args.cache_dir}")
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    loader, _ = training_loaders(cfg, plan, cases, split, torch.device("cpu"))
    ready = time.perf_counter() - started
    seconds, measured = _steady_seconds(loader)
    store = sum(p.stat().st_size for p in Path(args.cache_dir).rglob("*.npy"))
    return {"startup_s": ready, "s_per_batch": seconds, "batches": measured, "batch": loader.batch_size,
            "train_cases": len(split["train"]), "val_cases": len(split["val"]), "workers": loader.num_workers,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "store_gb": store / 1e9}


def check_and_plan(args: argparse.Namespace) -> None:
    """Seconds of the data check and of planning (the fingerprint) without, with an empty and with a filled
    memo, ``--repeats`` rounds; asserts the three give the same plan."""
    from medsup.config import load
    from medsup.data.check import check_dataset
    from medsup.data.fingerprint import plan_dataset
    from medsup.data.memo import CaseMemo

    cfg = load(args.task, args.overrides, presets=[args.preset] if args.preset else None)
    rows: dict[str, list[tuple[float, float]]] = {"no memo": [], "empty memo (fills it)": [], "filled memo": []}
    plans = set()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            shutil.rmtree(Path(tmp) / "memo", ignore_errors=True)
            for name, memo in zip(rows, (None, CaseMemo(Path(tmp) / "memo"), CaseMemo(Path(tmp) / "memo")),
                                  strict=True):
                t = time.perf_counter()
                report = check_dataset(args.data, cfg, memo)
                check_s = time.perf_counter() - t
                t = time.perf_counter()
                plans.add(plan_dataset(args.data, cfg, Path(tmp) / "plan" / "plan.json", memo).model_dump_json())
                rows[name].append((check_s, time.perf_counter() - t))
                if not report.ok:
                    raise SystemExit(report.render())
    if len(plans) != 1:
        raise SystemExit("the memo changed the plan")
    log.info("\ndata check and plan of a training start (medians of %d; the same plan every way):", args.repeats)
    log.info("| memo | check, s | plan, s | per round (check + plan) |")
    log.info("|---|---|---|---|")
    for name, vals in rows.items():
        log.info("| %s | %.2f | %.2f | %s |", name, statistics.median(v[0] for v in vals),
                 statistics.median(v[1] for v in vals), ", ".join(f"{a:.2f} + {b:.2f}" for a, b in vals))


def run_mode(mode: str, args: argparse.Namespace, cache_dir: Path) -> dict[str, float]:
    if mode == "disk-cold":
        shutil.rmtree(cache_dir, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", mode, "--data", str(args.data), "--task", args.task,
           "--preset", args.preset, "--batches", str(args.batches), "--cache-dir", str(cache_dir)]
    cmd += [f"--set={kv}" for kv in args.overrides]
    cmd += ["--workers", str(args.workers)] if args.workers is not None else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_loader_options(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="loaders,checks", help="loaders (the three cache modes) and/or "
                        "checks (the data check and the plan, with and without the memo)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    if args.child:
        logging.getLogger().setLevel(logging.WARNING)
        sys.stdout.write(json.dumps(child(args)) + "\n")  # the parent reads this line
        return
    if "loaders" in args.parts:
        compare_loaders(args)
    if "checks" in args.parts:
        check_and_plan(args)


def compare_loaders(args: argparse.Namespace) -> None:
    """The three cache modes, each in a fresh process, ``--repeats`` rounds; the table of medians."""
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="medsup-bench-cache-") as tmp:
        cache_dir = Path(tmp) / "store"
        for r in range(args.repeats):
            # disk-warm needs the store disk-cold leaves: rotate memory around the disk pair
            order = [["memory", "disk-cold", "disk-warm"], ["disk-cold", "disk-warm", "memory"],
                     ["disk-cold", "memory", "disk-warm"]][r % 3]
            for mode in order:
                results[mode].append(run_mode(mode, args, cache_dir))
                log.info("round %d %s: %s", r + 1, mode, json.dumps(results[mode][-1]))
    first = results["memory"][0]
    log.info("\n%d training + %d validation cases, batch %d, %d worker(s), %d steady batches, medians of %d:",
             first["train_cases"], first["val_cases"], first["batch"], first["workers"], first["batches"],
             args.repeats)
    log.info("| mode | start-up, s | loader, s/batch | peak RSS main process, GB | disk cache, GB |")
    log.info("|---|---|---|---|---|")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    for mode in MODES:
        m = med[mode]
        log.info("| %s | %.1f | %.3f | %.2f | %.2f |", mode, m["startup_s"], m["s_per_batch"], m["peak_rss_gb"],
                 m["store_gb"] if mode != "memory" else 0.0)
    mem = med["memory"]
    for mode in ("disk-cold", "disk-warm"):
        m = med[mode]
        log.info("%s / memory: start-up %.2fx, loader s/batch %.2fx, peak RSS %.2fx", mode,
                 m["startup_s"] / mem["startup_s"], m["s_per_batch"] / mem["s_per_batch"],
                 m["peak_rss_gb"] / mem["peak_rss_gb"])


if __name__ == "__main__":
    main()
