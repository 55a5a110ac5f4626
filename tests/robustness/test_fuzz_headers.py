"""Fuzz the header-reading path (hypothesis, fixed seed and budget): mutated NIfTI / NRRD / MHA files.

Every read ends in one of two ways: a usable 3-D volume whose array agrees with its validated geometry, or
:class:`~medsup.data.io.ImageReadError` naming the file. Never ``MemoryError`` (the reads run under an
address-space limit of the current size + 1 GiB, so a header that makes a reader allocate what it claims fails
here), never a numpy / nibabel / SimpleITK exception escaping, never a near-hang (a read of these tiny files
taking over 5 s fails the example), never a hang or a crash: the reads run in a worker process, so a read
blocked for good in C (where no Python timeout reaches) or a segfault fails its example within
:data:`HANG_S` seconds, naming the file, and hypothesis shrinks it like any other failure; the worker is then
replaced.

Before ``medsup.data.io`` checked headers itself, this found ``HeaderDataError: vox offset 128 too low for single
file nifti1`` escaping ``read_image``, and a MetaImage ``NDims = 99999999999999999999`` on which ITK hangs or
segfaults (now refused first; also a fixed case in ``faults.IMAGE_FAULTS``).

Mutations are both blind (random bytes anywhere in the header, truncation at any length, bytes of the
compressed stream) and structured (interesting values written into the fields readers trust: NIfTI dim,
datatype, bitpix, pixdim, vox_offset, scl_slope, qform/sform and srow; NRRD / MHA tokens such as sizes,
spacings, directions, type and encoding).
"""

from __future__ import annotations

import gzip
import multiprocessing as mp
import os
import re
import signal
import struct
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsup.data.io import ImageReadError, read_header, read_image, write_volume
from tests.conftest import make_volume
from tests.robustness.faults import address_space_limit

SECONDS_PER_READ = 5.0  # a tiny file; anything slower is a (near) hang
HANG_S = 30.0  # no answer from the worker by then: the read is blocked for good

# NIfTI-1 fields readers trust: (offset, struct format)
NIFTI_FIELDS = [(0, "<i"), *((40 + 2 * i, "<h") for i in range(8)), (70, "<h"), (72, "<h"),
                *((76 + 4 * i, "<f") for i in range(4)), (108, "<f"), (112, "<f"), (116, "<f"), (252, "<h"),
                (254, "<h"), *((256 + 4 * i, "<f") for i in range(6)), *((280 + 4 * i, "<f") for i in range(12))]
INTS = [0, 1, -1, 2, 3, 4, 5, 7, 8, 16, 64, 255, 348, 352, 540, 1000, 2**15 - 1, -(2**15), 2**31 - 1]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, 3.4e38, float("nan"), float("inf"), -float("inf"), 352.0, 1e9]
TOKENS = [b"0", b"-1", b"1", b"nan", b"inf", b"1e308", b"-1e-308", b"2147483648", b"99999999999999999999", b"",
          b"4", b"3.5", b"double", b"uchar", b"int64", b"block", b"gzip", b"ascii", b"hex", b"bzip2", b"raw",
          b"big", b"MET_DOUBLE", b"MET_UCHAR", b"True", b"False", b"(0,0,0)", b"(nan,0,0)", b"none", b"x" * 300]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Valid tiny files (int16, rotated geometry), as bytes; ``.nii.gz`` also uncompressed under ``nii.gz-raw``."""
    root = tmp_path_factory.mktemp("seeds")
    image, _ = make_volume(3, shape=(6, 5, 4))
    out = {s: write_volume(root / f"seed{s}", image, compress=s == ".nii.gz").read_bytes()
           for s in (".nii", ".nii.gz", ".nrrd", ".mha")}
    out["nii.gz-raw"] = gzip.decompress(out[".nii.gz"])
    return out


def _nifti_field(data: bytearray, draw: st.DrawFn) -> None:
    offset, fmt = draw(st.sampled_from(NIFTI_FIELDS))
    value = draw(st.sampled_from(FLOATS)) if fmt == "<f" else draw(st.sampled_from(INTS))
    if fmt == "<h":
        value = int(np.clip(value, -(2**15), 2**15 - 1))
    data[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, float(value) if fmt == "<f" else int(value))


def _text_token(data: bytearray, draw: st.DrawFn) -> bytearray:
    end = data.find(b"\n\n") if data.startswith(b"NRRD") else data.find(b"ElementDataFile")
    head = bytes(data[:end])
    spans = [m.span() for m in re.finditer(rb"[-+.\w()]+", head)]
    start, stop = draw(st.sampled_from(spans))
    return bytearray(head[:start] + draw(st.sampled_from(TOKENS)) + head[stop:] + data[end:])


@st.composite
def mutated(draw: st.DrawFn, seeds: dict[str, bytes], suffix: str) -> bytes:
    """A seed file with structured and/or blind mutations, maybe truncated."""
    key = "nii.gz-raw" if suffix == ".nii.gz" else suffix
    data = bytearray(seeds[key])
    header_len = 352 if "nii" in key else data.find(b"\n\n" if suffix == ".nrrd" else b"LOCAL\n") + 6
    for _ in range(draw(st.integers(0, 3))):
        if "nii" in key:
            _nifti_field(data, draw)
        else:
            data = _text_token(data, draw)
    for _ in range(draw(st.integers(0 if len(data) != len(seeds[key]) or data != seeds[key] else 1, 4))):
        data[draw(st.integers(0, header_len - 1))] = draw(st.integers(0, 255))
    blob = gzip.compress(bytes(data), mtime=0) if suffix == ".nii.gz" else bytes(data)
    if suffix == ".nii.gz" and draw(st.booleans()):  # blind bytes of the compressed stream
        raw = bytearray(blob)
        for _ in range(draw(st.integers(1, 3))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        blob = bytes(raw)
    if draw(st.booleans()):
        blob = blob[: draw(st.integers(0, len(blob)))]
    return blob


def _check_one(path: Path) -> None:
    started = time.monotonic()
    try:
        header = read_header(path)
        volume = read_image(path)
    except ImageReadError as err:
        message = str(err)
    else:
        message = ""
    assert time.monotonic() - started < SECONDS_PER_READ, f"{path}: read took {time.monotonic() - started:.1f} s"
    if message:
        assert str(path) in message, f"error does not name the file: {message}"
        return
    geometry = volume.geometry
    assert volume.array.ndim == 3 and volume.array.shape == geometry.shape == header.geometry.shape
    assert min(geometry.spacing) > 0 and np.isfinite(geometry.spacing).all()
    d = geometry.direction_matrix
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-3)


def _serve(conn: Connection, check: Callable[[Path], None]) -> None:
    """Worker loop: ``check`` each path sent, answer ``None`` or what went wrong (under the address-space cap)."""
    with address_space_limit(1 << 30):
        while True:
            path = conn.recv()
            try:
                check(Path(path))
                conn.send(None)
            except BaseException as err:
                conn.send(f"{type(err).__name__}: {err}")


class Reader:
    """A worker process that runs ``check`` on each file, so that a read blocked for good or a crash fails one
    example instead of the whole run. ``spawn``: the test process holds torch's threads, which a fork would copy
    in a broken state; ``check`` must be a module-level function."""

    def __init__(self, check: Callable[[Path], None] = _check_one, hang_s: float = HANG_S) -> None:
        self._ctx = mp.get_context("spawn")
        self._check, self._hang_s = check, hang_s
        self._start()

    def _start(self) -> None:
        self._conn, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, self._check), daemon=True, name="fuzz-reader")
        self._proc.start()
        child.close()

    def check(self, path: Path) -> str | None:
        """``None`` when ``check(path)`` passed; else its failure, a hang or a crash of the worker."""
        self._conn.send(str(path))
        try:
            if self._conn.poll(self._hang_s):
                return self._conn.recv()  # type: ignore[no-any-return]
            failure = f"{path}: read blocked for over {self._hang_s:.0f} s (a hang)"
        except EOFError:
            self._proc.join(10)
            failure = f"{path}: the reader process died (exit code {self._proc.exitcode}) reading it"
        self.close()
        self._start()
        return failure

    def close(self) -> None:
        """Stop the worker."""
        self._proc.kill()
        self._proc.join(10)
        self._conn.close()


@pytest.fixture(scope="module")
def reader() -> Iterator[Reader]:
    """One worker for the module (starting one costs the imports of medsup.data.io, ~1 s)."""
    worker = Reader()
    yield worker
    worker.close()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_mutated_headers_fail_cleanly(seeds: dict[str, bytes], suffix: str, reader: Reader,
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / f"fuzzed{suffix}"

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(blob=mutated(seeds, suffix))
    def run(blob: bytes) -> None:
        path.write_bytes(blob)
        failure = reader.check(path)
        assert failure is None, failure

    run()


def _open_raw(path: Path) -> None:
    """No medsup checks: opening a FIFO for reading blocks in the kernel until a writer comes (none will)."""
    with open(path, "rb") as f:
        f.read(1)


def _abort(path: Path) -> None:
    os.abort()  # SIGABRT, as a crashing C++ reader would end


def test_the_worker_turns_hangs_and_crashes_into_failures(tmp_path: Path) -> None:
    """The guard itself, with a real block in C (``open`` of a FIFO) and a real crash (SIGABRT): each becomes a
    failure naming the file within the hang limit, and the next file is checked by a fresh worker."""
    fifo, plain = tmp_path / "blocks.nii.gz", tmp_path / "plain.bin"
    os.mkfifo(fifo)
    plain.write_bytes(b"x")
    reader = Reader(check=_open_raw, hang_s=3.0)
    try:
        started = time.monotonic()
        assert reader.check(fifo) == f"{fifo}: read blocked for over 3 s (a hang)"
        assert time.monotonic() - started < 20
        assert reader.check(plain) is None  # a fresh worker
    finally:
        reader.close()
    crasher = Reader(check=_abort, hang_s=30.0)
    try:
        died = f"{plain}: the reader process died (exit code -{signal.SIGABRT.value}) reading it"
        assert crasher.check(plain) == died  # a crash names the file and the signal
    finally:
        crasher.close()

