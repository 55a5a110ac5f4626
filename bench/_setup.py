"""What every bench script sets up the same way: a ``--threads`` option, applied before any work, and logging.

Imported by the scripts as a sibling module (``python bench/<script>.py`` puts ``bench/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import logging

import torch


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a machine "
                        "shared with other jobs, where a 2-thread OpenMP pool stalls at every barrier)")


def start(args: argparse.Namespace) -> None:
    """Apply ``--threads`` and log plain messages at INFO."""
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
