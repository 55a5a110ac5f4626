"""What every bench script sets up the same way: a ``--threads`` option, applied before any work, and logging.

Imported by the scripts as a sibling module (``python bench/<script>.py`` puts ``bench/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a machine "
                        "shared with other jobs, where a 2-thread OpenMP pool stalls at every barrier)")


def start(args: argparse.Namespace) -> None:
    """Apply ``--threads`` and log plain messages at INFO."""
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a GPU's), so that a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_loader_options(parser: argparse.ArgumentParser) -> None:
    """The options of the scripts that build ``medsup train``'s loaders over a dataset (see :func:`loader_setup`)."""
    parser.add_argument("--data", type=Path, required=True, help="a labelled dataset (e.g. `medsup synth` output)")
    parser.add_argument("--task", default="liver")
    parser.add_argument("--preset", default="quick", help="config preset ('' = none: the task's reference plan)")
    parser.add_argument("--batches", type=int, default=40, help="training batches per loader pass")
    parser.add_argument("--workers", type=int, default=None, help="override train.num_workers")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. plan.patch_size=[128,128,128])")


def loader_setup(args: argparse.Namespace, *extra: str) -> tuple[Any, Any, dict[str, Any], dict[str, list[str]]]:
    """``(cfg, plan, cases, split)`` for :func:`add_loader_options`' arguments (plus ``extra`` overrides): the
    dataset planned as training plans it (the plan written to a temp folder), its first fold's split, and
    ``--batches`` training batches per loader pass (``train.iterations_per_epoch``)."""
    from medsup.config import load
    from medsup.data.datalist import load_datalist
    from medsup.data.fingerprint import plan_dataset
    from medsup.data.splits import make_splits

    overrides = [*args.overrides, f"train.iterations_per_epoch={args.batches}", *extra]
    if args.workers is not None:
        overrides.append(f"train.num_workers={args.workers}")
    cfg = load(args.task, overrides, presets=[args.preset] if args.preset else [])
    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_dataset(args.data, cfg, Path(tmp) / "plan.json")
    cases = {c.case_id: c for c in load_datalist(args.data).labelled}
    split = make_splits(sorted(cases), max(2, min(cfg.data.num_folds, len(cases))), cfg.seed)[0]
    return cfg, plan, cases, split
