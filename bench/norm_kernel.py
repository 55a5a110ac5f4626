"""Instance norm as torch runs it against the same function as ``group_norm`` (one group per channel), on the
feature maps of a real plan, forward and forward + backward, in one process.

    .venv/bin/python bench/norm_kernel.py                                  # CPU: the quick liver preset
    python bench/norm_kernel.py --device cuda --preset '' --amp off,on     # GPU: the reference liver plan

Why: ``medsup.models.unet.InstanceNorm3d`` runs ``group_norm`` on a CPU and torch's ``instance_norm`` on CUDA.
On a CPU ``instance_norm`` reshapes to ``(1, B*C, ...)`` and runs batch norm, whose output is a view: the
in-place leaky ReLU behind every norm then makes autograd copy the whole tensor back. Each row times one norm
+ in-place leaky ReLU (what every U-Net block runs after its convolution) on one stage's feature map
``(batch, filters, patch / stride product)``; "net" weights the stages by how many norms the network has there
(2 per encoder block, 2 per decoder block). Columns: ``torch`` = ``nn.InstanceNorm3d``, ``group`` =
``group_norm``, ``medsup`` = medsup's module (the one training uses). Ratio > 1: that path is faster than
torch's. Medians of ``--repeats`` interleaved timings after a warm-up, with the host allocator set up as medsup
sets it (``medsup.hostmem.tune_host_allocator``); no timed tests.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from _setup import add_threads_option, start
from torch import nn
from torch.nn.functional import group_norm, leaky_relu

log = logging.getLogger("bench.norm_kernel")


def make_norms(channels: int, device: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The three implementations of one affine instance norm of ``channels`` channels, same parameters."""
    from medsup.models.unet import InstanceNorm3d

    torch_norm = nn.InstanceNorm3d(channels, affine=True).to(device)
    with torch.no_grad():  # not the identity affine, so that a wrong parameter use would show
        torch_norm.weight.uniform_(0.5, 2.0)
        torch_norm.bias.uniform_(-1.0, 1.0)
    ours = InstanceNorm3d(channels, affine=True).to(device)
    ours.load_state_dict(torch_norm.state_dict())
    w, b = torch_norm.weight, torch_norm.bias
    return {"torch": torch_norm, "group": lambda x: group_norm(x, channels, w, b, torch_norm.eps), "medsup": ours}


Norm = Callable[[torch.Tensor], torch.Tensor]


def forward(norm: Norm, x: torch.Tensor, grad: torch.Tensor, amp: bool) -> Callable[[], object]:
    """Norm + in-place leaky ReLU as inference runs it."""
    def run() -> object:
        with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            return leaky_relu(norm(x), 0.01, inplace=True)
    return run


def forward_backward(norm: Norm, x: torch.Tensor, grad: torch.Tensor, amp: bool) -> Callable[[], object]:
    """Norm + in-place leaky ReLU and the gradient back to the input, as training runs it."""
    def run() -> object:
        xi = x.detach().requires_grad_()
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            y = leaky_relu(norm(xi), 0.01, inplace=True)
        y.backward(grad.to(y.dtype))
        return xi.grad
    return run


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def seconds(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--task", default="liver")
    parser.add_argument("--preset", default=None, help="config preset ('' = the task's reference plan; default: "
                        "quick on a CPU, '' on CUDA)")
    parser.add_argument("--amp", default="off", help="off | on | off,on: bf16 autocast around the norm (CUDA)")
    parser.add_argument("--repeats", type=int, default=9)
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    from medsup.config import load
    from medsup.data.planning import default_plan
    from medsup.hostmem import tune_host_allocator

    tune_host_allocator()  # as every medsup process runs: else page faults of fresh outputs swamp the kernels

    device = torch.device(args.device)
    preset = args.preset if args.preset is not None else ("quick" if device.type == "cpu" else "")
    plan = default_plan(load(args.task, presets=[preset] if preset else []))
    sizes = plan.topology.scales((plan.patch_size[0], plan.patch_size[1], plan.patch_size[2]))
    stages = len(plan.filters)
    log.info("%s plan%s: patch %s x batch %d, filters %s; %s, %d torch threads, torch %s", args.task,
             f" (preset {preset})" if preset else " (reference)", list(plan.patch_size), plan.batch_size,
             list(plan.filters), device, torch.get_num_threads(), torch.__version__)
    seconds = timer(device)
    rows = []
    totals: dict[tuple[str, str, str], float] = {}
    for amp in [a.strip() == "on" for a in args.amp.split(",")]:
        for s, (channels, size) in enumerate(zip(plan.filters, sizes, strict=True)):
            count = 2 if s == stages - 1 else 4  # 2 norms per encoder block, 2 per decoder block above the bottleneck
            torch.manual_seed(s)
            x = torch.randn(plan.batch_size, channels, *size, device=device)
            grad = torch.randn_like(x)
            norms = make_norms(channels, device)

            for mode, make in (("forward", forward), ("fwd+bwd", forward_backward)):
                fns = {name: make(norm, x, grad, amp) for name, norm in norms.items()}
                for fn in fns.values():  # warm-up (allocator, kernels, autotuning)
                    fn()
                times: dict[str, list[float]] = {name: [] for name in fns}
                for _ in range(args.repeats):
                    for name, fn in fns.items():
                        times[name].append(seconds(fn))
                med = {name: statistics.median(t) for name, t in times.items()}
                rows.append((mode, "bf16" if amp else "fp32", f"{s} {[plan.batch_size, channels, *size]}", med))
                for name, value in med.items():
                    key = (mode, "bf16" if amp else "fp32", name)
                    totals[key] = totals.get(key, 0.0) + count * value
    print("\n| mode | dtype | stage, shape | torch ms | group ms | medsup ms | torch / group | torch / medsup |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, dtype, shape, med in rows:
        print(f"| {mode} | {dtype} | {shape} | {med['torch'] * 1e3:.2f} | {med['group'] * 1e3:.2f} | "
              f"{med['medsup'] * 1e3:.2f} | {med['torch'] / med['group']:.2f} | {med['torch'] / med['medsup']:.2f} |")
    for mode, dtype in dict.fromkeys((m, d) for m, d, _ in totals):
        t, g, m = (totals[(mode, dtype, name)] for name in ("torch", "group", "medsup"))
        print(f"| {mode} | {dtype} | net (every norm) | {t * 1e3:.1f} | {g * 1e3:.1f} | {m * 1e3:.1f} | "
              f"{t / g:.2f} | {t / m:.2f} |")


if __name__ == "__main__":
    main()
