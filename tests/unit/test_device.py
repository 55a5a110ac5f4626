"""Device choices: the training loader's worker count when ``train.num_workers`` is null (auto), and the free
memory that decides ``train.cache: auto``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from medsup.config import load
from medsup.device import available_memory_bytes, cache_threads, loader_workers, usable_cpus

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize(("cpus", "ranks", "expected"), [
    (16, 1, 12),  # the lent H100/H200 machine: capped at nnU-Net's 12
    (8, 1, 7),    # one core left for the step's own process
    (16, 4, 3),   # four ranks on the node share its cores
    (2, 1, 2),    # never below 2 on a GPU
    (64, 8, 7),
])
def test_auto_on_a_gpu_uses_the_cores_left_per_rank(cpus: int, ranks: int, expected: int) -> None:
    assert loader_workers(None, CUDA, ranks_per_node=ranks, cpus=cpus) == expected


def test_auto_on_a_cpu_loads_in_process_and_a_set_value_always_wins() -> None:
    assert loader_workers(None, CPU, cpus=64) == 0
    assert loader_workers(0, CUDA, cpus=64) == 0
    assert loader_workers(5, CPU, cpus=2) == 5


@pytest.mark.parametrize(("workers", "cpus", "expected"), [(0, 2, 2), (0, 1, 1), (0, 64, 2), (7, 64, 7), (1, 1, 1)])
def test_cache_threads_use_the_idle_cores_before_training(workers: int, cpus: int, expected: int) -> None:
    assert cache_threads(workers, cpus=cpus) == expected


def test_the_default_config_asks_for_auto_and_counts_this_machine() -> None:
    assert load("liver").train.num_workers is None
    assert load("liver", ["train.num_workers=3"]).train.num_workers == 3
    assert 1 <= usable_cpus() <= (torch.multiprocessing.cpu_count() or 1)
    assert loader_workers(None, CUDA) >= 2


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="free memory is read from /proc/meminfo (Linux)")
def test_free_memory_is_read_and_no_more_than_the_machine_has() -> None:
    # (not "allocating lowers it": other test workers allocate and free at the same time)
    free = available_memory_bytes()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert free is not None and 0 < free <= total
