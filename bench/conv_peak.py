"""How close the quick preset's convolutions run to this CPU's peak: GFLOP/s of a large sgemm (the best a
matrix-multiply kernel gets out of these cores) beside the quick preset's heaviest 3-D convolution, forward and
forward + backward, in one process.

    .venv/bin/python bench/conv_peak.py            # torch's default threads, as training runs

Why: the quick preset's training step is ~80 % convolutions (a torch.profiler trace, BENCHMARKS.md); if they
already run near the sgemm rate, no kernel-level change can make the CPU step much faster. Medians of
``--repeats`` timed calls after two warm-up calls.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from _setup import add_threads_option, start

log = logging.getLogger("bench.conv_peak")


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=2048, help="sgemm of size^3")
    parser.add_argument("--patch", type=int, default=48, help="the quick preset's patch edge")
    parser.add_argument("--channels", type=int, default=16, help="the quick preset's first-stage filters")
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    torch.manual_seed(0)
    a, b = torch.randn(args.size, args.size), torch.randn(args.size, args.size)
    gemm = median_seconds(lambda: a @ b, args.repeats)
    gemm_rate = 2 * args.size**3 / gemm / 1e9

    c, p = args.channels, args.patch
    x = torch.randn(2, c, p, p, p, requires_grad=True)  # batch 2, as the quick preset
    w = torch.randn(c, c, 3, 3, 3, requires_grad=True)
    flops = 2 * 27 * c * c * 2 * p**3  # one forward; backward is twice that (data and weight gradients)

    def forward_backward() -> None:
        y = torch.nn.functional.conv3d(x, w, padding=1)
        y.backward(torch.ones_like(y))

    with torch.no_grad():
        fwd = median_seconds(lambda: torch.nn.functional.conv3d(x, w, padding=1), args.repeats)
    both = median_seconds(forward_backward, args.repeats)
    log.info("%d threads, medians of %d:", torch.get_num_threads(), args.repeats)
    log.info("| kernel | ms | GFLOP/s | vs sgemm |")
    log.info("|---|---|---|---|")
    log.info("| sgemm %d^3 | %.1f | %.0f | 1.00 |", args.size, 1000 * gemm, gemm_rate)
    for name, seconds, work in ((f"conv3d {c}->{c} 3^3 at {p}^3 x 2, forward", fwd, flops),
                                (f"conv3d {c}->{c} 3^3 at {p}^3 x 2, forward + backward", both, 3 * flops)):
        rate = work / seconds / 1e9
        log.info("| %s | %.1f | %.0f | %.2f |", name, 1000 * seconds, rate, rate / gemm_rate)


if __name__ == "__main__":
    main()
