"""The network's inference call in torch's default layout against channels-last (NDHWC), side by side in one
process: what ``medsup.device.inference_memory_format`` chooses per device.

    .venv/bin/python bench/infer_layout.py                                    # CPU: three plans
    python bench/infer_layout.py --device cuda --plans liver,lung --amp off,on  # GPU: the reference plans

Each row times one sliding-window call (``--tiles`` tiles of the plan's patch, ``inference_mode``, the
full-resolution head only, as ``medsup infer`` calls it) with the same weights in both layouts, interleaved,
medians of ``--repeats`` after a warm-up, with the host allocator set up as medsup sets it. ``max |diff|`` is
the largest logit difference between the layouts (a different accumulation order, not a different function).
Ratio > 1: channels-last is faster. No timed tests.

Plans: ``cpu`` (1.6 mm, 64^3, 8..64 filters: the CPU-sized plan of ``bench/infer_memory.py``), ``coarse`` (5 mm,
32^3, 4..16 filters: ``bench/infer_e2e.py``'s CPU plan), ``liver64`` (the reference liver filters on a 64^3
patch), ``liver`` and ``lung`` (the reference plans, for a GPU).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch
from _setup import add_threads_option, start
from infer_e2e import PLANS as E2E_PLANS

log = logging.getLogger("bench.infer_layout")

#: infer_e2e's plans (cpu, coarse, liver, lung) and the reference liver filters on a CPU-sized patch
PLANS: dict[str, tuple[str, list[str]]] = {**E2E_PLANS, "liver64": ("liver", ["plan.patch_size=[64, 64, 64]"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--plans", default=None, help=f"comma-separated, of {', '.join(PLANS)} (default: "
                        "cpu,coarse,liver64 on a CPU, liver,lung on CUDA)")
    parser.add_argument("--amp", default="off", help="off | on | off,on: bf16 autocast (on any device)")
    parser.add_argument("--tiles", type=int, default=2, help="tiles per call (medsup's sw_batch_size default)")
    parser.add_argument("--repeats", type=int, default=5)
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    from medsup.config import load
    from medsup.data.planning import default_plan
    from medsup.hostmem import tune_host_allocator
    from medsup.models.unet import build_model

    tune_host_allocator()
    device = torch.device(args.device)
    names = (args.plans or ("cpu,coarse,liver64" if device.type == "cpu" else "liver,lung")).split(",")

    def seconds(net: torch.nn.Module, x: torch.Tensor, amp: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            net(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    log.info("%s, %d torch threads, torch %s; %d tiles per call, medians of %d", device, torch.get_num_threads(),
             torch.__version__, args.tiles, args.repeats)
    configs = {name: load(*PLANS[name]) for name in (n.strip() for n in names)}
    plans = {name: default_plan(cfg) for name, cfg in configs.items()}  # before the table: planning logs
    rows = []
    for name, plan in plans.items():
        torch.manual_seed(0)
        default = build_model(configs[name], plan).to(device).eval()
        last = copy.deepcopy(default).to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        x = torch.randn(args.tiles, 1, *plan.patch_size, device=device)
        for amp in [a.strip() == "on" for a in args.amp.split(",")]:
            times: dict[str, list[float]] = {"default": [], "last": []}
            with torch.inference_mode():
                with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                    diff = float((default(x).float() - last(x).float()).abs().max())  # also the warm-up
                for _ in range(args.repeats):
                    times["default"].append(seconds(default, x, amp))
                    times["last"].append(seconds(last, x, amp))
            d, c = statistics.median(times["default"]), statistics.median(times["last"])
            rows.append(f"| {name} | {list(plan.patch_size)} | {list(plan.filters)} | {'bf16' if amp else 'fp32'} | "
                        f"{d * 1e3:.1f} | {c * 1e3:.1f} | {d / c:.2f} | {diff:.1e} |")
    print("\n| plan | patch | filters | dtype | default ms | channels-last ms | default / channels-last | max |diff| |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
