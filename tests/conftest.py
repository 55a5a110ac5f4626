"""Shared fixtures: tiny seeded volumes with non-identity geometry, and tiny datasets built from them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from medsup.data.geometry import Geometry, Volume
from medsup.data.io import write_volume

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, give each worker its share of the cores, in-process and in the processes it starts.

    Two workers with a 2-thread pool each on 2 cores oversubscribe them, and an OpenMP pool stalls at every
    barrier while one of its threads waits for a core (BENCHMARKS.md, "Threads").
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    threads = str(max(1, len(os.sched_getaffinity(0)) // int(workers)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, threads)
    import torch  # here, not at the top: without xdist the thread count is torch's own choice

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def rotated_direction(angle_deg: float, flip: tuple[int, int, int] = (1, 1, 1)) -> tuple[float, ...]:
    """Direction cosines: a rotation about the k axis, then per-axis sign flips (columns)."""
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    return tuple(float(v) for v in (rot * np.asarray(flip)[None, :]).ravel())


def make_volume(seed: int = 0, shape: tuple[int, int, int] = (24, 20, 16),
                spacing: tuple[float, float, float] = (0.8, 0.9, 2.5), angle: float = 7.0) -> tuple[Volume, Volume]:
    """A CT-like image (int16 HU) and its label (uint8: 1 organ ellipsoid, 2 lesion inside it)."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = [n / 2 + rng.uniform(-1, 1) for n in shape]
    r = [n / 3 for n in shape]
    organ = ((i - c[0]) / r[0]) ** 2 + ((j - c[1]) / r[1]) ** 2 + ((k - c[2]) / r[2]) ** 2 < 1
    lesion = ((i - c[0]) / (r[0] / 3)) ** 2 + ((j - c[1]) / (r[1] / 3)) ** 2 + ((k - c[2]) / (r[2] / 3)) ** 2 < 1
    label = organ.astype(np.uint8) + lesion.astype(np.uint8)
    hu = np.where(organ, 100, -50) - 40 * lesion + rng.normal(0, 10, shape)
    geom = Geometry(shape, spacing, (-30.0 + seed, 20.0, -100.0), rotated_direction(angle))
    return Volume(hu.astype(np.int16), geom), Volume(label, geom)


def write_msd(root: Path, n: int = 3, seed: int = 0, task: str = "tiny") -> Path:
    """An MSD-layout dataset of ``n`` tiny cases under ``root``."""
    training = []
    for idx in range(n):
        image, label = make_volume(seed + idx)
        write_volume(root / "imagesTr" / f"case{idx}.nii.gz", image)
        write_volume(root / "labelsTr" / f"case{idx}.nii.gz", label)
        training.append({"image": f"./imagesTr/case{idx}.nii.gz", "label": f"./labelsTr/case{idx}.nii.gz"})
    meta = {"name": task, "labels": {"0": "background", "1": "organ", "2": "lesion"},
            "modality": {"0": "CT"}, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


@pytest.fixture
def msd_dataset(tmp_path: Path) -> Path:
    """Three good tiny cases in MSD layout."""
    return write_msd(tmp_path / "ds")


@pytest.fixture
def realdata() -> Path:
    """../shared/realdata, or a skip saying why."""
    if not REALDATA.is_dir():
        pytest.skip(f"real CT folder {REALDATA} is absent (it lives beside the repository, never inside it)")
    return REALDATA
