"""Device and mixed-precision choices shared by training and inference."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


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


# On a CPU the step needs every core: loading in the training process costs ~1 % of a quick-preset step
# (~6 ms a batch against ~0.5 s), while one worker process beside torch's threads costs ~4 % (it preempts an
# OpenMP thread and the others wait for it at the next barrier; bench/train_quick.py, BENCHMARKS.md)
CPU_LOADER_WORKERS = 0
MIN_GPU_LOADER_WORKERS = 2
MAX_GPU_LOADER_WORKERS = 12  # nnU-Net's default number of augmentation processes


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
    return max(1, workers, min(MIN_GPU_LOADER_WORKERS, cpus if cpus is not None else usable_cpus()))


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


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; None on CPU or when AMP is off."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``dtype``, or a no-op when it is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# glibc's mallopt parameters (malloc.h) and the values medsup sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap, never from a fresh mmap: glibc's largest allowed value
#: (HEAP_MAX_SIZE / 2 on 64-bit), and what its own dynamic threshold grows to at most
HOST_MMAP_THRESHOLD = 32 * 1024**2
#: free memory at the top of the heap is given back to the kernel only beyond this (mallopt takes a C int)
HOST_TRIM_THRESHOLD = 2**31 - 1
#: set to 0 to keep the C library's allocator settings as they are
TUNE_ENV = "MEDSUP_TUNE_MALLOC"
_tuned: bool | None = None


def tune_host_allocator() -> bool:
    """Keep freed tensor memory in the process instead of handing it back to the kernel after every step.

    Why: torch's CPU tensors come from glibc's ``malloc``, which by default returns free memory at the top of
    its heap to the kernel once it passes a threshold (128 KiB at first, raised as mmapped blocks are freed),
    so the next step's activations of the same sizes page-fault in again, zero-filled page by page. Setting
    ``M_MMAP_THRESHOLD`` (32 MiB: blocks up to that size from the heap) and ``M_TRIM_THRESHOLD`` (2 GiB) once per
    process keeps those pages mapped: 1.12x the quick preset's CPU training step and 1.24x a CPU sliding
    window, whose minor faults drop from 7.5 M to 0.2 M (``bench/host_alloc.py``). The cost: memory freed
    inside the process is kept for its own reuse rather than returned, so its resident size stays near its
    peak (+0-4 % peak RSS there).

    Does nothing (and returns False) off glibc, when ``MEDSUP_TUNE_MALLOC=0``, when the environment already
    sets ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or preloads another allocator (jemalloc,
    tcmalloc, mimalloc): an explicit choice wins. Idempotent; returns whether the settings are in force.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get(TUNE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        log.debug("host allocator left as it is (%s=0)", TUNE_ENV)
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or any(
            name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        log.debug("host allocator left as the environment sets it")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu = ctypes.CDLL(None).gnu_get_libc_version  # glibc only: musl and macOS have no mallopt like it
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    gnu.restype = ctypes.c_char_p
    if mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, HOST_TRIM_THRESHOLD) != 1:
        log.debug("glibc %s refused the malloc settings", gnu().decode())
        return False
    _tuned = True
    log.debug("glibc %s malloc: mmap threshold %d MiB, trim threshold %d MiB", gnu().decode(),
              HOST_MMAP_THRESHOLD >> 20, HOST_TRIM_THRESHOLD >> 20)
    return True
