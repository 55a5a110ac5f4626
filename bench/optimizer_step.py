"""One optimiser step over medsup's networks: torch's default implementation against the fused one that
``medsup.engine.steps.build_optimizer`` builds, for SGD (nnU-Net's: Nesterov 0.99, weight decay 3e-5) and
AdamW, in one process.

    .venv/bin/python bench/optimizer_step.py                           # CPU: the quick and reference liver nets
    python bench/optimizer_step.py --device cuda --presets ""          # GPU: the reference liver net

torch's default is a loop over the parameters on a CPU and ``foreach`` (a few kernels per parameter group) on
CUDA; ``fused`` updates every parameter in one kernel per group. Each row: the parameters of ``build_model``
for the preset's plan with random gradients; the step is timed in ``--repeats`` interleaved blocks of
``--steps`` steps after a warm-up (medians). Ratio > 1: fused is faster. Also printed: the largest difference
between the two implementations' weights after ``--steps`` identical steps (float rounding only).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from _setup import add_threads_option, start, sync

log = logging.getLogger("bench.optimizer_step")



def make_optimizer(kind: str, params: list[torch.nn.Parameter], fused: bool) -> torch.optim.Optimizer:
    """The optimiser of ``train.optimizer`` with the default config's hyperparameters, fused or torch's default."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.99, weight_decay=3e-5, nesterov=True, fused=fused or None)
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=3e-5, fused=fused or None)


def network_params(preset: str, device: torch.device) -> tuple[list[torch.nn.Parameter], str]:
    """Parameters (with random gradients) of the liver network planned with ``preset`` ('' = the reference)."""
    from medsup.config import load
    from medsup.data.planning import default_plan
    from medsup.models.unet import build_model

    cfg = load("liver", presets=[preset] if preset else [])
    model = build_model(cfg, default_plan(cfg)).to(device)
    params = list(model.parameters())
    g = torch.Generator(device=device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3
    n = sum(p.numel() for p in params)
    return params, f"liver {preset or 'reference'} ({n / 1e6:.1f} M parameters, {len(params)} tensors)"


def timed(step: Callable[[], object], steps: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", default="quick,", help="comma list of liver presets ('' = the reference plan)")
    parser.add_argument("--optimizers", default="sgd,adamw")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per implementation (median)")
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    device = torch.device(args.device)
    rows = []
    for preset in args.presets.split(","):
        params, what = network_params(preset.strip(), device)
        for kind in [k.strip() for k in args.optimizers.split(",") if k.strip()]:
            copies = {f: [torch.nn.Parameter(p.detach().clone()) for p in params] for f in (False, True)}
            for ps in copies.values():
                for p, src in zip(ps, params, strict=True):
                    p.grad = src.grad
            opts = {f: make_optimizer(kind, copies[f], f) for f in (False, True)}
            for f in (False, True):  # warm-up, and both take the same steps before the weights are compared
                for _ in range(args.steps):
                    opts[f].step()
            sync(device)
            diff = max(float((a - b).abs().max()) for a, b in zip(copies[False], copies[True], strict=True))
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for f in (False, True):
                    times[f].append(timed(opts[f].step, args.steps, device))
            default, fused = statistics.median(times[False]), statistics.median(times[True])
            rows.append((what, kind, default, fused, diff))
            log.info("%s %s done", what, kind)
    print(f"\ndevice {device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{args.steps} steps x {args.repeats} blocks (median)\n")
    print("| network | optimizer | torch default ms | fused ms | default / fused | max weight diff |")
    print("|---|---|---|---|---|---|")
    for what, kind, default, fused, diff in rows:
        print(f"| {what} | {kind} | {default * 1e3:.2f} | {fused * 1e3:.2f} | {default / fused:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
