"""Bad input and fault suite (issue 8): every fault through the user-facing paths, each with a clear error
naming the file and the problem, a non-zero exit where the whole job fails, no partial output, no crashed batch.

Where: B = test_bad_inputs, R = test_resource_limits, S = test_interrupts (signals), F = test_fuzz_headers,
u/io = unit/test_io, u/check = unit/test_check, i/infer = integration/test_infer, i/train = integration/test_train.

| fault | what medsup does | tested in |
|---|---|---|
| truncated ``.nii.gz`` | "truncated or corrupt image data" | B (check, infer), u/io, i/infer |
| wrong magic (``.nii``) | "not a NIfTI-1/2 file" (ITK read it as Analyze 7.5) | B |
| garbage / empty file | "unreadable image header" / "empty file (0 bytes)" | B, u/io, u/check |
| header claiming a terabyte | "header claims [30000, ...]", nothing allocated (RLIMIT_AS) | R, B, u/io |
| header claiming 3.5 GB in a 15 kB file | "the file holds N bytes", nothing allocated | R, B |
| all-zero volume (deflate ~1020:1, control) | still read: the size bound is 1100:1 | R |
| 2-D image, single slice | "2-D image" / "single slice" | B, u/io, i/infer |
| 4-D image | "4-D image" | B, u/io, u/check |
| NaN / Inf voxels | "NaN/Inf voxels" (check lists it, infer refuses the case) | B, u/check, i/infer |
| float label (non-integer values) | "non-integer values [0.5]" | B (check, train), u/check |
| label values outside the task | "values [7] outside the task's [0, 1, 2]" | B, u/check |
| zero / negative / NaN spacing | "pixdim ... non-zero and finite" (ITK read 1 mm), "spacing" | B, F |
| NRRD spacing NaN, ``none`` or missing | "NRRD axis 0 has spacing nan ... unknown" (ITK read 1 mm) | B |
| non-orthogonal direction cosines | "not orthonormal" / ITK's "orthonormal direction cosines" | B, F |
| image/label geometry mismatch | "image X and label Y geometry differ: shape ..." | B, u/check |
| empty folders | check exit 2 / 1, infer exit 2, train exit 1 without a run folder | B, u/check |
| unreadable file or folder (EACCES) | "cannot open for reading (Permission denied)" | B (as uid nobody when root) |
| FIFO named like an image | "not a regular file" (ITK blocked forever opening it) | B |
| dangling symlink, symlink loop | "dangling symbolic link", "symbolic link loop" | B |
| directory symlink loop, ``--recursive`` | each folder searched once | B |
| dataset.json paths escaping / absolute / NUL | "escapes the dataset folder", "is absolute", "NUL byte" | B, u/check |
| malformed dataset.json | exit 2 naming dataset.json, or a problem per entry | B, u/check |
| output names escaping OUT | ``..`` in a list, ``--format``, a link in OUT: exit 2, nothing written | B |
| two inputs, one output name | "would both write", exit 2 | B |
| pickle-bomb checkpoint | refused by ``weights_only=True``: ``infer --model`` exit 2 | B; i/train (``--resume``) |
| file-size limit (RLIMIT_FSIZE, EFBIG) | "write failed", no temp or truncated file; resume redoes it | R |
| outputs unreadable to others | were 0600 (mkstemp); now 0666 less the umask | R |
| SIGKILL during training, ``--resume`` | same run, every epoch once | i/train::test_resume_after_sigkill |
| SIGTERM / SIGINT in batch inference, ``--resume`` | exit 143 / 130, no temp file, each case once | S |
| mutated NIfTI / NRRD / MHA headers | only ImageReadError naming the file | F |
| MHA ``NDims = 1e20`` (ITK hangs or segfaults) | "NDims = ...; expected a dimension count" | B, F |
| NIfTI sform with an Inf (ITK's reader never returns) | "sform (srow_x/y/z) holds NaN or Inf" | B, F |
| a read that hangs or crashes the process (any format) | fuzz example fails in its worker process, named | F |
| disk really full (256 kB tmpfs) in batch inference | batch stops: 1 error, the rest "not_run", exit 1 | R |

The model here is an untrained tiny bundle (the smoke preset's network, random weights, written with
:func:`medsup.inference.bundle.write_bundle`): these tests exercise reading, validation, writing and signals, not
segmentation quality, and it costs a second instead of a training run (``integration/test_infer`` has the
trained one).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from medsup.config import load
from medsup.data.planning import default_plan
from medsup.inference.bundle import write_bundle
from medsup.models.unet import build_model
from medsup.tasks import get_task


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model bundle (smoke preset: 4 mm grid, 32^3 patch, 3 stages)."""
    cfg = load("tiny", presets=["smoke"])
    plan = default_plan(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, plan)
    return write_bundle(tmp_path_factory.mktemp("bundle") / "model", model.state_dict(), cfg, plan,
                        dict(get_task("tiny").labels))


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-traversable temp folder (pytest's are 0700, so an unprivileged uid could not reach its files)."""
    path = Path(tempfile.mkdtemp(prefix="medsup-robustness-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
