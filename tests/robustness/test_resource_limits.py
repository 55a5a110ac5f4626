"""Resource faults: headers that claim huge volumes (nothing allocated), a full disk (clean error, no truncated or
temp file left), and output files other users can read.

A file-size limit is set with RLIMIT_FSIZE in a child process whose SIGXFSZ is ignored, so ``write()`` fails
with EFBIG exactly where ENOSPC would; it works for any user. A really full disk is a tiny tmpfs mounted in a
private user and mount namespace (``unshare -rm``, no root needed where user namespaces are allowed); the test
is skipped, saying why, where the kernel refuses that.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medsup.cli import app
from medsup.data.filecheck import MAX_EXPANSION
from medsup.data.files import atomic_path
from medsup.data.geometry import Geometry
from medsup.data.io import ImageReadError, read_header, read_image, write_image, write_volume
from tests.conftest import make_volume
from tests.robustness.faults import IMAGE_FAULTS, address_space_limit, write_fault

REPO = Path(__file__).resolve().parents[2]


def _oversized(folder: Path) -> list[Path]:
    """Small files whose headers claim 1200^3 voxels (3.5 GB of int16, under MAX_VOXELS) or 30000^3."""
    image, _ = make_volume(0)
    paths = [write_fault(f, folder) for f in IMAGE_FAULTS if f.name in ("terabyte", "oversized")]
    for suffix in (".nii.gz", ".nii", ".mha"):
        path = write_volume(folder / f"claims{suffix}", image, compress=suffix == ".nii.gz")
        raw = path.read_bytes()
        if suffix == ".mha":
            raw = raw.replace(b"DimSize = 24 20 16", b"DimSize = 1200 1200 1200")
        else:
            data = bytearray(gzip.decompress(raw) if suffix == ".nii.gz" else raw)
            data[42:48] = struct.pack("<3h", 1200, 1200, 1200)
            raw = gzip.compress(bytes(data)) if suffix == ".nii.gz" else bytes(data)
        path.write_bytes(raw)
        paths.append(path)
    return paths


def test_huge_headers_allocate_nothing(tmp_path: Path) -> None:
    paths = _oversized(tmp_path)
    with address_space_limit(256 << 20):
        with pytest.raises(MemoryError):  # the limit bites: 3.5 GB cannot be had inside it
            np.ones(1200**3, dtype=np.int16)
        tracemalloc.start()  # numpy and nibabel buffers are traced too
        try:
            for path in paths:
                for read in (read_header, read_image):
                    with pytest.raises(ImageReadError, match="header claims") as err:
                        read(path)
                    assert str(path) in str(err.value)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 16 << 20, f"python-side peak {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_the_size_check_spares_what_compresses_best(tmp_path: Path, suffix: str) -> None:
    """An all-zero volume deflates ~1020:1, as far as deflate goes: still read (the bound is 1100:1)."""
    geometry = Geometry((128, 128, 64), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    path = write_image(tmp_path / f"zeros{suffix}", np.zeros(geometry.shape, np.int16), geometry)
    assert 800 < 2 * np.prod(geometry.shape) / path.stat().st_size < MAX_EXPANSION
    assert not read_image(path).array.any()


def _limited(limit: int) -> None:
    """preexec_fn: at most ``limit`` bytes per file, and EFBIG from write() instead of death by SIGXFSZ."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


_WRITER = """
import json, sys
import numpy as np
from pathlib import Path
from medsup.data.geometry import Geometry
from medsup.data.io import write_image
from medsup.data.files import atomic_path
out = Path(sys.argv[1])
geometry = Geometry((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
noise = np.random.default_rng(0).integers(-1000, 1000, (40, 40, 40)).astype(np.int16)  # 128 kB, incompressible
errors = {}
for name in ("x.nii.gz", "x.nii", "x.nrrd", "x.mha"):
    try:
        write_image(out / name, noise, geometry)
    except OSError as err:
        errors[name] = str(err)
try:
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps({"cases": ["x" * 100] * 200}), encoding="utf-8")
except OSError as err:
    errors["report.json"] = str(err)
print(json.dumps(errors))
"""


def test_disk_full_writes_fail_cleanly(tmp_path: Path) -> None:
    """Every format, and a JSON write: an error naming the file, and nothing left behind (no temp, no stub).

    ITK's NIfTI writer used to report the short write on stderr only and leave a truncated ``.nii``/``.nii.gz``
    that ``--resume`` then took for a finished output.
    """
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", _WRITER, str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, preexec_fn=lambda: _limited(16 << 10))
    assert proc.returncode == 0, proc.stderr
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errors) == {"x.nii.gz", "x.nii", "x.nrrd", "x.mha", "report.json"}, errors
    for name, message in errors.items():
        if name != "report.json":
            assert message.startswith(f"{out / name}: write failed"), message
    assert "File too large" in errors["report.json"]
    assert os.listdir(out) == []


@pytest.mark.slow
def test_disk_full_during_batch_inference(tmp_path: Path, bundle: Path) -> None:
    """``medsup infer --probabilities`` whose softmax maps exceed the limit: each case fails cleanly, no label
    file claims a finished case, and ``--resume`` (no limit) then predicts every case instead of skipping it."""
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(2):
        write_volume(inp / f"case{i}.nii.gz", make_volume(i, shape=(64, 60, 40))[0])
    args = ["infer", "-i", str(inp), "-o", str(out), "--model", str(bundle), "--device", "cpu", "--probabilities"]
    proc = subprocess.run([sys.executable, "-m", "medsup", *args], cwd=REPO, capture_output=True, encoding="utf-8",
                          errors="replace", timeout=300, preexec_fn=lambda: _limited(64 << 10))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [c["status"] for c in report["cases"]] == ["error", "error"]
    for case in report["cases"]:
        name = Path(case["input"]).name.removesuffix(".nii.gz")
        assert case["error"] == (f"{case['input']}: {out / name}_prob_background.nii.gz: write failed "
                                 "(short write: the disk is full or a file-size limit was reached)"), case
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]  # no label, no map, no temp file

    resumed = CliRunner().invoke(app, [*args, "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert [c["status"] for c in json.loads(resumed.stdout)["cases"]] == ["ok", "ok"]
    for i in range(2):
        assert read_image(out / f"case{i}.nii.gz").geometry.mismatches(
            read_header(inp / f"case{i}.nii.gz").geometry, 1e-5) == []


def _tmpfs_prefix(tmp_path: Path) -> list[str]:
    """argv prefix that runs a command with a 256 kB tmpfs mounted on its first argument (in a private user and
    mount namespace, gone with the process); skips the test where this kernel or sandbox refuses it."""
    script = 'mount -t tmpfs -o size=256k medsup-full "$1" && shift && exec "$@"'
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare to mount a small tmpfs (a really full disk)")
    probe = tmp_path / "probe"
    probe.mkdir()
    tried = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(probe), "true"], capture_output=True,
                           text=True, timeout=60)
    if tried.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {tried.stderr.strip()}")
    return ["unshare", "-rm", "sh", "-c", script, "sh"]


@pytest.mark.slow
@pytest.mark.parametrize("probabilities", [True, False])
def test_really_full_disk_stops_the_batch(tmp_path: Path, bundle: Path, probabilities: bool) -> None:
    """A 256 kB tmpfs as OUT: the first case's softmax maps fill it (or, labels only, a file filled it before);
    the batch stops there instead of computing the cases it could not keep, reports them as not attempted,
    exits 1, and leaves no temp file behind. Labels only, the first case is written while the second is
    predicted: that one is reported as predicted and not written."""
    inp, out = tmp_path / "in", tmp_path / "out"
    out.mkdir()
    for i in range(3):
        write_volume(inp / f"case{i}.nii.gz", make_volume(i, shape=(64, 60, 40))[0])
    # what is left in OUT is listed by the same namespaced shell, before the tmpfs goes away with it
    fill = "" if probabilities else f"cat /dev/zero > {out}/filler 2>/dev/null; "
    command = (f"{fill}{sys.executable} -m medsup infer -i {inp} -o {out} --model {bundle} --device cpu "
               f"{'--probabilities ' if probabilities else ''}--json; status=$?; echo left: $(ls -A {out}) >&2; "
               "exit $status")
    proc = subprocess.run([*_tmpfs_prefix(tmp_path), str(out), "sh", "-c", command], cwd=REPO, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert [c["status"] for c in report["cases"]] == ["error", "not_run", "not_run"], report["cases"]
    assert report["summary"] == {"ok": 0, "skipped": 0, "error": 1, "not_run": 2}
    assert "no space left on the device" in report["cases"][0]["error"], report["cases"][0]
    second = "not attempted" if probabilities else "predicted, not written"
    assert report["cases"][1]["error"].endswith(f"{second}: the output disk is full")
    assert report["cases"][2]["error"].endswith("not attempted: the output disk is full")
    assert "stopping the batch with 2 case(s) not attempted" in proc.stderr
    left = next(line for line in proc.stderr.splitlines() if line.startswith("left:")).split()[1:]
    assert all(not name.startswith(".") for name in left), left  # no temp file; the report, if it fit
    assert not [name for name in left if name.endswith(".nii.gz")], left


def test_outputs_are_readable_by_others(tmp_path: Path) -> None:
    """Atomic writes used mkstemp, whose 0600 survived the rename: predictions nobody else could read."""
    umask = os.umask(0o022)
    try:
        image, _ = make_volume(0)
        written = write_volume(tmp_path / "pred.nii.gz", image)
        with atomic_path(tmp_path / "report.json") as tmp:
            tmp.write_text("{}", encoding="utf-8")
    finally:
        os.umask(umask)
    for path in (written, tmp_path / "report.json"):
        assert path.stat().st_mode & 0o777 == 0o644, oct(path.stat().st_mode)
