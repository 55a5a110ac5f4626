"""Reading a ``.nii.gz`` CT: medsup's reader against the ways it could read, side by side in one process.

    .venv/bin/python bench/read_nifti.py --threads 1                      # real CTs + synthetic 512x512xN
    .venv/bin/python bench/read_nifti.py --sizes 100,300,600 --repeats 7

Per case, the wall time of (a) ``medsup.data.io.read_image`` as it is (ITK's header check, then the voxels
decompressed in 1 MiB steps into one buffer, nibabel's offset, type and scaling), (b) the same header check
with the voxels through nibabel's own gzip stream (medsup's reader before session 20), (c) SimpleITK's
``ReadImage`` + ``GetArrayFromImage`` (what nnU-Net v2 reads with; it zero-fills a truncated file, which is
why medsup does not read voxels through it). The three alternate, medians of ``--repeats``; ratios are
(b) / (a) and (c) / (a): above 1 medsup is faster. Also the peak of Python's allocations (tracemalloc) of (a)
and (b), as a multiple of the voxel bytes (one copy is 1x; nibabel's stream holds two). Every array is
checked equal to (b)'s.
No timed tests.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _setup import add_threads_option, start
from infer_e2e import ROOT, make_ct, real_cases

log = logging.getLogger("bench.read_nifti")


def readers() -> dict[str, Callable[[Path], np.ndarray]]:
    import nibabel as nib
    import SimpleITK as sitk

    from medsup.data.io import read_header, read_image

    def medsup(path: Path) -> np.ndarray:
        return read_image(path).array

    def nibabel_stream(path: Path) -> np.ndarray:
        read_header(path)
        return np.asanyarray(nib.load(str(path), mmap=False).dataobj)

    def simpleitk(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)

    return {"medsup": medsup, "nibabel stream": nibabel_stream, "SimpleITK": simpleitk}


def measure(path: Path, repeats: int) -> dict[str, Any]:
    funcs = readers()
    reference = funcs["nibabel stream"](path)
    seconds: dict[str, list[float]] = {name: [] for name in funcs}
    for r in range(repeats):
        order = list(funcs) if r % 2 == 0 else list(reversed(funcs))  # alternate who reads a warm cache first
        for name in order:
            t0 = time.perf_counter()
            array = funcs[name](path)
            seconds[name].append(time.perf_counter() - t0)
            if not np.array_equal(array, reference):
                raise SystemExit(f"{path}: {name} read other voxels than nibabel")
            del array
    peaks = {}
    for name in ("medsup", "nibabel stream"):
        tracemalloc.start()
        array = funcs[name](path)
        peaks[name] = tracemalloc.get_traced_memory()[1] / array.nbytes
        tracemalloc.stop()
        del array
    return {"seconds": {k: statistics.median(v) for k, v in seconds.items()}, "peaks": peaks,
            "shape": "x".join(map(str, reference.shape)), "mb": reference.nbytes / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,300", help="slices of the synthetic 512x512xN CTs ('' = none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--realdata", type=Path, default=ROOT.parent / "shared" / "realdata")
    parser.add_argument("--no-real", action="store_true", help="synthetic cases only")
    add_threads_option(parser)
    args = parser.parse_args()
    start(args)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [] if args.no_real else real_cases(args.realdata)
        for n in [int(s) for s in args.sizes.split(",") if s]:
            path = Path(tmp) / f"synthetic_{n}.nii.gz"
            make_ct(path, n)
            cases.append(path)
        print("| case | shape | MB | medsup s | nibabel stream s | SimpleITK s | nibabel / medsup | "
              "SimpleITK / medsup | peak medsup | peak nibabel |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for path in cases:
            m = measure(path, args.repeats)
            s, p = m["seconds"], m["peaks"]
            print(f"| {path.name.removesuffix('.nii.gz')} | {m['shape']} | {m['mb']:.0f} | {s['medsup']:.3f} | "
                  f"{s['nibabel stream']:.3f} | {s['SimpleITK']:.3f} | {s['nibabel stream'] / s['medsup']:.2f} | "
                  f"{s['SimpleITK'] / s['medsup']:.2f} | {p['medsup']:.2f}x | {p['nibabel stream']:.2f}x |")
    print(f"medians of {args.repeats} reads each, the three alternating; peak: Python's allocations during one "
          "read (tracemalloc) / the voxel bytes")


if __name__ == "__main__":
    main()
