"""Device choices: the network's dtype on a CPU (inference in bf16 where native, training in float32), the
training loader's worker count when ``train.num_workers`` is null (auto), the free memory that decides
``train.cache: auto``, and the host allocator settings every medsup process makes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from medsup.config import load
from medsup.device import (
    CPU_BF16_ENV,
    autocast_dtype,
    autotune_convolutions,
    available_memory_bytes,
    cache_threads,
    cpu_has_native_bf16,
    inference_autocast_dtype,
    loader_workers,
    usable_cpus,
)
from medsup.engine.steps import make_train_step
from medsup.losses import build_loss
from medsup.models.topology import Topology
from medsup.models.unet import DeepSupervisedUNet

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


# One 28 MiB tensor written and freed, and what glibc's mallinfo2 says about it. Tuned (mmap threshold 32 MiB,
# fixed), it comes from the heap and stays there once freed, ready for the next step, until
# release_free_heap (between inference's network stage and postprocessing) hands it back. With glibc's defaults it
# is mmapped (its threshold starts at 128 KiB and only rises when a freed mmapped chunk was bigger, which
# nothing before this block did in a fresh process) and handed back to the kernel on free, so the next step
# faults those pages in again. (An earlier version of this test freed 24 x 4 MiB blocks and asked how much of
# it the default heap handed back: that depends on which small chunks happen to lie above them and failed on a
# CI machine; whether one block was mmapped does not.)
_HEAP = """
import ctypes, torch
from medsup.hostmem import release_free_heap, tune_host_allocator
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
info = ctypes.CDLL("libc.so.6").mallinfo2
info.restype = Info
tuned = tune_host_allocator()
before = info()
block = torch.ones(7 * 2**20)
mapped = info().hblkhd - before.hblkhd
del block
kept = (info().fordblks - before.fordblks) >> 20
def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) >> 10
resident = rss_mb()
released = release_free_heap()
print(tuned, mapped >> 20, kept, released, resident - rss_mb())
"""
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")


def _child(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("MEDSUP_TUNE_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True, timeout=120)


@glibc_only
def test_the_tuned_allocator_keeps_freed_tensor_memory_in_the_heap_until_released() -> None:
    tuned, mapped_mb, kept_mb, released, dropped_mb = _child(_HEAP).stdout.split()
    assert (tuned, int(mapped_mb)) == ("True", 0)  # from the heap, not mmapped
    assert int(kept_mb) >= 24  # freed, and (nearly all: other small chunks come and go) kept as free heap
    assert released == "True" and int(dropped_mb) >= 24  # release_free_heap hands the pages back
    tuned, mapped_mb, kept_mb, released, _ = _child(_HEAP, MEDSUP_TUNE_MALLOC="0").stdout.split()
    assert (tuned, int(mapped_mb)) == ("False", 28)  # glibc's default: mmapped ...
    assert int(kept_mb) <= 4  # ... and unmapped on free
    assert released == "False"  # nothing of medsup's to undo


@glibc_only
def test_an_explicit_allocator_choice_in_the_environment_wins() -> None:
    code = "from medsup.hostmem import tune_host_allocator; print(tune_host_allocator(), tune_host_allocator())"
    assert _child(code).stdout.split() == ["True", "True"]  # idempotent
    assert _child(code, MEDSUP_TUNE_MALLOC="0").stdout.split() == ["False", "False"]
    assert _child(code, MALLOC_TRIM_THRESHOLD_="1000000").stdout.split() == ["False", "False"]
    assert _child(code, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536").stdout.split() == ["False", "False"]
    assert _child(code, GLIBC_TUNABLES="glibc.malloc.tcache_count=0").stdout.split() == ["True", "True"]


@glibc_only
def test_every_cli_command_tunes_the_allocator_first() -> None:
    out = _child("import sys; from medsup.cli import main; "
                 "sys.argv = ['medsup', '-v', 'config', 'show', '--task', 'tiny']; main()")
    assert "malloc: mmap threshold 32 MiB" in out.stderr


@pytest.fixture
def cpu_bf16(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str | None], None]]:
    """Set ``$MEDSUP_CPU_BF16`` (None: unset) and forget the cached probe; forgotten again afterwards."""

    def set_to(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(CPU_BF16_ENV, raising=False)
        else:
            monkeypatch.setenv(CPU_BF16_ENV, value)
        cpu_has_native_bf16.cache_clear()

    yield set_to
    cpu_has_native_bf16.cache_clear()


def test_inference_on_a_cpu_is_bf16_only_where_the_cpu_has_it_and_amp_is_on(
        cpu_bf16: Callable[[str | None], None]) -> None:
    cpu_bf16("1")
    assert inference_autocast_dtype(CPU, True) is torch.bfloat16
    assert inference_autocast_dtype(CPU, False) is None  # --no-amp / train.amp false
    assert autocast_dtype(CPU, True) is None  # training stays float32 on a CPU
    cpu_bf16("0")
    assert inference_autocast_dtype(CPU, True) is None
    cpu_bf16(None)  # the probe: this machine's flags, as torch reads them
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_native_bf16() is native
    assert inference_autocast_dtype(CPU, True) is (torch.bfloat16 if native else None)


def test_amp_dtype_on_a_cpu_is_float32_unless_bf16_is_asked_for_and_native(
        cpu_bf16: Callable[[str | None], None]) -> None:
    cpu_bf16("1")  # as on a CPU with AVX512-BF16 or AMX, whichever CPU runs this
    for choice in ("auto", "float16"):
        assert autocast_dtype(CPU, True, choice) is None  # bf16 training on a CPU is opt-in
    assert autocast_dtype(CPU, True, "bfloat16") is torch.bfloat16
    assert autocast_dtype(CPU, False, "bfloat16") is None  # train.amp false
    cpu_bf16("0")
    with pytest.raises(ValueError, match="no native bf16"):
        autocast_dtype(CPU, True, "bfloat16")  # emulated: 10-20x slower, refused
    with pytest.raises(ValueError, match="amp dtype 'float32'"):
        autocast_dtype(CPU, True, "float32")
    with pytest.raises(ValueError, match="amp_dtype"):
        load("tiny", ["train.amp_dtype=float32"])  # the config refuses it before anything runs


def test_a_cpu_training_step_runs_bf16_when_asked(cpu_bf16: Callable[[str | None], None]) -> None:
    cpu_bf16("1")
    torch.manual_seed(0)
    net = DeepSupervisedUNet(1, 3, Topology(((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), (4, 8, 16)))
    dtypes: list[torch.dtype] = []
    net.get_submodule(next(n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv3d))
                      ).register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    step = make_train_step(net, build_loss(load("tiny")), torch.optim.SGD(net.parameters(), lr=0.1), CPU, amp=True,
                           amp_dtype="bfloat16")
    batch = {"image": torch.randn(2, 1, 16, 16, 16), "label": (torch.rand(2, 1, 16, 16, 16) * 3).floor()}
    out = step(Engine(step), batch)
    assert set(dtypes) == {torch.bfloat16} and bool(torch.isfinite(out["loss"]))
    assert all(p.dtype == torch.float32 for p in net.parameters())  # the weights stay float32


def test_a_training_step_on_a_bf16_cpu_stays_float32(cpu_bf16: Callable[[str | None], None]) -> None:
    cpu_bf16("1")  # as on a CPU with AVX512-BF16 or AMX, whichever CPU runs this
    torch.manual_seed(0)
    net = DeepSupervisedUNet(1, 3, Topology(((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), (4, 8, 16)))
    before = [p.detach().clone() for p in net.parameters()]
    dtypes: list[torch.dtype] = []
    net.get_submodule(next(n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv3d))
                      ).register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    step = make_train_step(net, build_loss(load("tiny")), torch.optim.SGD(net.parameters(), lr=0.1), CPU, amp=True)
    batch = {"image": torch.randn(2, 1, 16, 16, 16), "label": (torch.rand(2, 1, 16, 16, 16) * 3).floor()}
    step(Engine(step), batch)
    # bf16 training on a CPU was faster but learnt less in 3 of 3 seeds (BENCHMARKS.md): train.amp leaves it
    assert set(dtypes) == {torch.float32}
    assert any(not torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))


@pytest.mark.parametrize(("device", "deterministic", "expected"), [
    (CUDA, False, True),   # one patch shape per call: cuDNN's autotuner pays from the second call
    (CUDA, True, False),   # a run asked to be reproducible keeps the default algorithms
    (CPU, False, False),   # no cuDNN on a CPU
])
def test_cudnn_autotunes_on_cuda_unless_asked_for_reproducible_results(
        device: torch.device, deterministic: bool, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test (a global flag)
    autotune_convolutions(device, deterministic)  # sets a flag, touches no GPU: runs without CUDA
    assert torch.backends.cudnn.benchmark is expected
