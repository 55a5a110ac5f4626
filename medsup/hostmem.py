"""Host memory allocator settings every medsup process makes before its first tensor.

Kept free of torch (and of every other heavy import): the CLI calls it before any command, including the ones
that must start without importing torch (``medsup tasks``, the container health check).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)


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
_libc: ctypes.CDLL | None = None


def tune_host_allocator() -> bool:
    """Keep freed tensor memory in the process instead of handing it back to the kernel after every step.

    Why: torch's CPU tensors come from glibc's ``malloc``, which by default returns free memory at the top of
    its heap to the kernel once it passes a threshold (128 KiB at first, raised as mmapped blocks are freed),
    so the next step's activations of the same sizes page-fault in again, zero-filled page by page. Setting
    ``M_MMAP_THRESHOLD`` (32 MiB: blocks up to that size from the heap) and ``M_TRIM_THRESHOLD`` (2 GiB) once per
    process keeps those pages mapped: 1.12x the quick preset's CPU training step and 1.24x a CPU sliding
    window, whose minor faults drop from 7.5 M to 0.2 M (``bench/host_alloc.py``). The cost: memory freed
    inside the process is kept for its own reuse rather than returned, so its resident size stays near the
    heap's fullest: +0-4 % peak RSS in those benches. Inference hands it back once per case before
    postprocessing (:func:`release_free_heap`), which puts its peak below glibc's defaults
    (``bench/infer_memory.py``: 1.73x vs 2.21x the raw volume of a 1000-slice CT).

    Does nothing (and returns False) off glibc, when ``MEDSUP_TUNE_MALLOC=0``, when the environment already
    sets ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (or their ``GLIBC_TUNABLES`` forms,
    ``glibc.malloc.mmap_threshold`` / ``glibc.malloc.trim_threshold``) or preloads another allocator (jemalloc,
    tcmalloc, mimalloc): an explicit choice wins. Idempotent; returns whether the settings are in force.
    """
    global _tuned, _libc
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get(TUNE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        log.debug("host allocator left as it is (%s=0)", TUNE_ENV)
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or any(
            name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")) or any(
            f"glibc.malloc.{name}" in tunables for name in ("mmap_threshold", "trim_threshold")):
        log.debug("host allocator left as the environment sets it")
        return False
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, libc's among them
        mallopt = libc.mallopt
        gnu = libc.gnu_get_libc_version  # glibc only: musl and macOS have no mallopt like glibc's
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int  # release_free_heap
    gnu.restype = ctypes.c_char_p
    if mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, HOST_TRIM_THRESHOLD) != 1:
        log.debug("glibc %s refused the malloc settings", gnu().decode())
        return False
    _tuned, _libc = True, libc
    log.debug("glibc %s malloc: mmap threshold %d MiB, trim threshold %d MiB", gnu().decode(),
              HOST_MMAP_THRESHOLD >> 20, HOST_TRIM_THRESHOLD >> 20)
    return True


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the kernel now (glibc ``malloc_trim(0)``), where
    :func:`tune_host_allocator` keeps them: between two phases that allocate differently.

    Why: inference's sliding window and export leave a few hundred MB of freed tiles and slabs in the heap,
    kept for the next tile; postprocessing then allocates whole-volume arrays (above the mmap threshold, so
    not from that free heap) on top of them: the case's peak. One trim per case costs a few hundred ms of
    page faults when the next case's network stage grows the heap again. Returns whether memory was
    released; does nothing when the allocator was left as it is.
    """
    if not _tuned or _libc is None:
        return False
    return bool(_libc.malloc_trim(0))
