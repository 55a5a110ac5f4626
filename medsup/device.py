"""Device and mixed-precision choices shared by training and inference."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a ValueError saying so."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda asked for, but no CUDA device is available (use --device cpu)")
        return torch.device(f"cuda:{local_rank}")
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device("cpu")


def autotune_convolutions(device: torch.device, deterministic: bool) -> None:
    """On CUDA, unless results must be reproducible, cuDNN's autotuner: every training batch and every
    inference tile batch has one shape (the plan's patch), so timing the algorithms once per shape pays from
    the second call on (nnU-Net's trainer and predictor do the same)."""
    if device.type == "cuda" and not deterministic:
        torch.backends.cudnn.benchmark = True


# On a CPU the step needs every core: loading in the training process costs ~1 % of a quick-preset step
# (~6 ms a batch against ~0.5 s), while one worker process beside torch's threads costs ~4 % (it preempts an
# OpenMP thread and the others wait for it at the next barrier; bench/train_quick.py, BENCHMARKS.md)
CPU_LOADER_WORKERS = 0
MIN_GPU_LOADER_WORKERS = 2
MAX_GPU_LOADER_WORKERS = 12  # nnU-Net's default number of augmentation processes
#: the cache fill runs before the first step, so it may take the cores the step will use: 2 on the 2-core CPU
#: machines, where the in-process loader (0 workers) would otherwise fill it alone
MIN_CACHE_THREADS = 2


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's or a SLURM job's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(requested: int | None, device: torch.device, ranks_per_node: int = 1,
                   cpus: int | None = None) -> int:
    """Training data-loader worker processes: ``requested`` when set, else on CUDA every core this rank's share
    of the machine has left after its own process (at most 12, at least 2), else none (on a CPU the batches
    are loaded in the training process, between steps).

    Why so many on a GPU: a 128^3 patch costs ~0.08 s of one core from the cache to the collated batch
    (``bench/dataload.py``: ~12 samples/s per busy core), and nnU-Net's epoch of 250 steps x 2 patches in
    20 s eats 25 samples/s.
    """
    if requested is not None:
        return requested
    if device.type != "cuda":
        return CPU_LOADER_WORKERS
    share = (cpus if cpus is not None else usable_cpus()) // max(1, ranks_per_node)
    return max(MIN_GPU_LOADER_WORKERS, min(MAX_GPU_LOADER_WORKERS, share - 1))


def cache_threads(workers: int, cpus: int | None = None) -> int:
    """Threads that fill the training cache (decode, resample, write) before the first step: the loader's
    worker count, but at least 2 where there are 2 cores, as the step does not run yet and so takes none."""
    return max(1, workers, min(MIN_CACHE_THREADS, cpus if cpus is not None else usable_cpus()))


def available_memory_bytes() -> int | None:
    """Memory this process can still take: the kernel's ``MemAvailable``, lowered to what the cgroup (a
    container's or a job's limit) has left; None where neither can be read (not Linux)."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:  # cgroup v2; "max" means no limit
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="ascii").strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text(encoding="ascii")))
    except (OSError, ValueError):
        pass
    return max(0, min(found)) if found else None


#: ``0``: never bf16 on a CPU, ``1``: bf16 on any CPU (emulated where the CPU lacks it: slow), unset: where native
CPU_BF16_ENV = "MEDSUP_CPU_BF16"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX: AMD Zen 4, Intel Cooper Lake and
    Sapphire Rapids on). ``$MEDSUP_CPU_BF16`` (``0``/``1``) overrides the probe."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    # torch.cpu's probes are private (torch >= 2.3); where one is missing the answer is no
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(device: torch.device, enabled: bool, choice: str = "auto") -> torch.dtype | None:
    """Training's autocast dtype (``train.amp``, ``train.amp_dtype`` = ``choice``); None is float32.

    On a GPU ``auto`` is bf16 where the GPU has it natively, else fp16 (with a GradScaler); ``float16`` asks
    for fp16 (nnU-Net's). On a CPU ``auto`` and ``float16`` train in float32: a CPU with native bf16 trains
    the quick preset 1.7x faster per epoch in bf16, but at equal epochs it reached a lower validation Dice in
    each of 3 seeds (tumour most) and at equal wall time it was level (BENCHMARKS.md, ``bench/infer_dtype.py``
    section), so bf16 there is opt-in. ``bfloat16`` asks for bf16 wherever it runs and is refused where it
    would be emulated (a CPU without AVX512-BF16 or AMX, 10-20x slower; a GPU before Ampere). Inference takes
    :func:`inference_autocast_dtype`.
    """
    if choice not in ("auto", "bfloat16", "float16"):
        raise ValueError(f"amp dtype {choice!r}: expected auto, bfloat16 or float16")
    if not enabled:
        return None
    if device.type != "cuda":
        if choice != "bfloat16":
            return None
        if not cpu_has_native_bf16():
            raise ValueError("this CPU has no native bf16 (AVX512-BF16 or AMX): it would emulate bf16 10-20x "
                             "slower than float32; set train.amp_dtype to auto")
        return torch.bfloat16
    if choice == "float16":
        return torch.float16
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if choice == "bfloat16" and not bf16:
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bf16: set train.amp_dtype to float16 or auto")
    return torch.bfloat16 if bf16 else torch.float16


def inference_autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The network's autocast dtype for inference and training's validation (``amp``): :func:`autocast_dtype` on
    CUDA, and bf16 on a CPU that has it in hardware (:func:`cpu_has_native_bf16`), where oneDNN's bf16
    convolutions make a sliding-window call 1.2-2x faster than float32 with labels 99.998 % the same and Dice
    within 0.004 on the same weights (``bench/infer_dtype.py``); a CPU without it would emulate bf16 10-20x
    slower, so there the network stays float32.
    """
    if device.type == "cpu":
        return torch.bfloat16 if enabled and cpu_has_native_bf16() else None
    return autocast_dtype(device, enabled)


def dtype_name(dtype: torch.dtype | None) -> str:
    """``bfloat16``, ``float16`` or ``float32`` for an :func:`autocast_dtype` (None: float32)."""
    return str(dtype or torch.float32).removeprefix("torch.")


def inference_memory_format(device: torch.device) -> torch.memory_format:
    """The layout the network's weights and activations take for inference on ``device``.

    Channels-last (NDHWC) on a CPU: oneDNN runs its 3-D convolutions on that layout without reordering every
    activation: a sliding-window call of 2 tiles 1.36x faster for the 1.6 mm CPU plan and 1.34x for the
    reference liver filters, 1.04x for a tiny 4..16-filter network (``bench/infer_layout.py``; logits equal
    to 5e-4). Training keeps ``train.channels_last`` (forward + backward gained nothing on a CPU). CUDA keeps
    the default layout until the same bench has run on a GPU.
    """
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``dtype``, or a no-op when it is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
