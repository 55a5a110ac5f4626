"""Peak host memory of `medsup infer` on a full-size CT, as a multiple of the raw volume.

Runs in child processes that each report their own peak RSS (VmHWM): a baseline child that only imports
the inference stack, then `medsup infer` on a synthetic 512 x 512 x N int16 CT (``--cases K``: a folder of
K such CTs, the batch job, whose next case is read and preprocessed while the current one runs). Prints the
raw size, both peaks and the ratio (peak above baseline / raw). The model is randomly initialised (memory, not accuracy,
is measured) and planned at --spacing mm so the network part stays CPU-sized; reading, resampling and export still work
on the full-resolution grid.

    .venv/bin/python bench/infer_memory.py --slices 1000 --spacing 1.6
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench.infer_memory")


# the child runs ``code`` then writes its own peak RSS (MB) to argv[1], whatever ``code`` raised. VmHWM, not
# getrusage: ru_maxrss survives execve, so a child would inherit the bench's own peak at fork time.
_CHILD = """
import sys
out = sys.argv.pop(1)
try:
    {code}
finally:
    hwm = next(line for line in open("/proc/self/status", encoding="utf-8") if line.startswith("VmHWM"))
    open(out, "w", encoding="utf-8").write(str(int(hwm.split()[1]) / 1024))
"""


def run_child(code: str, args: list[str], folder: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``code`` in a fresh interpreter with ``sys.argv[1:] = args``; returns (its peak RSS in MB, result)."""
    peak_file = folder / "peak.txt"
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(code=code), str(peak_file), *args],
                          capture_output=True, encoding="utf-8", errors="replace")
    return float(peak_file.read_text(encoding="utf-8")), proc


def make_bundle(folder: Path, spacing: float) -> Path:
    """A random-weights liver bundle planned at ``spacing`` mm, with a small network."""
    import torch

    from medsup.config import load
    from medsup.data.planning import default_plan
    from medsup.inference.bundle import write_bundle
    from medsup.models.unet import build_model
    from medsup.tasks import get_task

    cfg = load("liver", [f"plan.target_spacing=[{spacing}, {spacing}, {spacing}]", "plan.patch_size=[64, 64, 64]",
                         "plan.base_filters=8", "plan.max_stages=4", "plan.max_filters=64"])
    plan = default_plan(cfg)
    torch.manual_seed(0)
    return write_bundle(folder, build_model(cfg, plan).state_dict(), cfg, plan, get_task("liver").labels)


def make_ct(path: Path, slices: int) -> int:
    """A 512 x 512 x ``slices`` int16 CT-like volume (LPS, 0.8 x 0.8 x 1 mm); returns its raw bytes."""
    from medsup.data.geometry import Geometry
    from medsup.data.io import write_image

    rng = np.random.default_rng(0)
    i, j = np.meshgrid(np.arange(512), np.arange(512), indexing="ij")
    body = ((i - 256) / 200) ** 2 + ((j - 256) / 150) ** 2 < 1
    plane = np.where(body, 40, -1000).astype(np.int16)
    array = np.repeat(plane[:, :, None], slices, axis=2)
    array += rng.integers(-20, 20, size=(512, 512, 1), dtype=np.int16)
    geometry = Geometry((512, 512, slices), (0.8, 0.8, 1.0), (-200.0, -200.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(path, array, geometry, compress=False)
    return int(array.nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--spacing", type=float, default=1.6, help="plan spacing of the random model (mm)")
    parser.add_argument("--gz", action="store_true", help="write the CT as .nii.gz (default: .nii)")
    parser.add_argument("--device", default="cpu", help="medsup infer --device: cpu | cuda (host RSS either way)")
    parser.add_argument("--cases", type=int, default=1, help="CTs in the input folder (> 1: a batch with prefetch)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = make_bundle(root / "bundle", args.spacing)
        cts = root / "cts"
        cts.mkdir()
        ct = cts / ("ct.nii.gz" if args.gz else "ct.nii")
        raw = make_ct(ct, args.slices)
        for i in range(1, args.cases):  # the same file under other names: the batch reads each from disk
            (cts / f"ct{i}{ct.name[2:]}").hardlink_to(ct)
        imports = "import torch, monai, medsup.cli, medsup.inference.api, medsup.inference.predictor"
        baseline, proc = run_child(imports, [], root)
        if proc.returncode:
            raise SystemExit(proc.stderr)
        t0 = time.perf_counter()
        infer = "from medsup.cli import app; app()"
        source = cts if args.cases > 1 else ct
        peak, proc = run_child(infer, ["-q", "infer", "-i", str(source), "-o", str(root / "out"), "--model",
                                       str(bundle), "--device", args.device, "--json"], root)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(proc.stdout + proc.stderr)
        cases = json.loads(proc.stdout)["cases"]
    raw_mb = raw / 2**20
    print(f"volume 512x512x{args.slices} int16 ({ct.name}{f' x {args.cases} cases' if args.cases > 1 else ''}): "
          f"{raw_mb:.0f} MB raw each; model planned at {args.spacing} mm, device {args.device}")
    print(f"peak RSS: imports only {baseline:.0f} MB, medsup infer {peak:.0f} MB ({seconds:.0f} s)")
    print(f"peak above imports / raw volume: {(peak - baseline) / raw_mb:.2f}x   (total / raw: {peak / raw_mb:.2f}x)")
    for case in cases:
        print("seconds per stage:", case["seconds"])


if __name__ == "__main__":
    main()
