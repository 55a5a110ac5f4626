"""The training augmentation's random affine, run on a finished batch on the training device.

The random affine (rotation + scaling, MONAI's ``RandAffined``) resamples image and label through a full patch
grid: ~190 ms of a loader worker per 128^3 sample when it fires, two thirds of all its augmentation time
(bench/dataload.py), while a GPU does it in milliseconds. With ``augment.affine_on`` = step (``auto`` on CUDA)
the loader leaves it out and the training step applies this instead, before the forward pass.

It is the same transform with the same settings (:func:`medsup.data.transforms.rand_affine`), applied sample
by sample, so each sample gets what the loader would have given it for the same random draws; only its
place in the chain moves, from before the flips and intensity transforms to after them (flips map the
rotation distribution onto itself; scaling and shifting intensities commute with the interpolation, while the
Gaussian noise and gamma of a resampled sample are now resampled too). Its draws are seeded per epoch
(:meth:`BatchAffine.reseed`), so a resumed run draws what the uninterrupted one did from that epoch on.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from medsup.config import Config
from medsup.data.planning import Plan
from medsup.data.transforms import IMAGE, LABEL, rand_affine

#: what MONAI's transform resamples to draw a sample's affine (see :meth:`BatchAffine.draw`)
_STAND_IN = torch.zeros(1, 2, 2, 2)


class BatchAffine:
    """``(image, label) -> (image, label)``, both ``(B, 1, *patch)`` on any device, each sample through
    the training augmentation's random affine (image bilinear, label nearest, border padding).

    The draws are MONAI's (its transform's random states, on the host) and so is the matrix (rotation @ scale
    about the patch centre); the resampling is one ``affine_grid`` + ``grid_sample`` over the samples that drew the
    affine, with the matrices handed to the device from pinned memory without waiting: MONAI's own call builds
    its matrix on the device from host numbers, a blocking copy that would make the host wait for the GPU in
    every step (see the CUDA test of host syncs).
    """

    def __init__(self, cfg: Config, plan: Plan, seed: int) -> None:
        transform = rand_affine(cfg.augment, plan)
        if transform is None:
            raise ValueError("augment.affine_prob is 0: there is no random affine to run in the training step")
        self.transform = transform
        self.seed = seed
        self.reseed(0)

    def reseed(self, epoch: int) -> None:
        """Start ``epoch``'s draws (a function of the seed and the epoch only)."""
        self.transform.set_random_state(seed=(self.seed + 7919 * epoch) % (2**32))

    def draw(self, n: int) -> list[torch.Tensor | None]:
        """The next ``n`` samples' draws: a ``(4, 4)`` voxel-space matrix about the patch centre (output -> input
        coordinates, MONAI's convention), or None where the affine does not fire.

        MONAI's transform is called on a 2^3 stand-in: its draws (which it makes more than once a call, from
        more than one random state) and its matrix are then exactly those it would give a real patch; the
        matrix does not depend on the patch's size.
        """
        out: list[torch.Tensor | None] = []
        for _ in range(n):
            self.transform({IMAGE: _STAND_IN, LABEL: _STAND_IN})
            fired = self.transform._do_transform
            out.append(torch.as_tensor(self.transform.rand_affine.rand_affine_grid.affine, dtype=torch.float64)
                       if fired else None)
        return out

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        drawn = self.draw(image.shape[0])
        fired = [b for b, a in enumerate(drawn) if a is not None]
        if not fired:  # decided on the host: no device work, no wait
            return image, label
        size = image.shape[2:]
        theta = _to(image.device, torch.stack([_theta(a, size) for a in drawn if a is not None]).to(torch.float32))
        grid = functional.affine_grid(theta, [len(fired), 1, *size], align_corners=True)
        index = _to(image.device, torch.tensor(fired))
        moved = functional.grid_sample(image.index_select(0, index), grid.to(image.dtype), mode="bilinear",
                                       padding_mode="border", align_corners=True)
        labels = functional.grid_sample(label.index_select(0, index).float(), grid, mode="nearest",
                                        padding_mode="border", align_corners=True)
        return image.index_copy(0, index, moved), label.index_copy(0, index, labels.to(label.dtype))


def _to(device: torch.device, host: torch.Tensor) -> torch.Tensor:
    """``host`` on ``device``; to a GPU from pinned memory, so that the host does not wait for the copy."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _theta(affine: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """MONAI's voxel-space matrix (output -> input, about the centre, axes in array order) as ``affine_grid``'s
    ``(3, 4)`` theta with ``align_corners=True`` (normalised coordinates, axes in (W, H, D) order).

    A centred voxel coordinate c along an axis of n voxels is 2 c / (n - 1) normalised, so entry (i, j) scales
    by (n_j - 1) / (n_i - 1) and the translation by 2 / (n_i - 1); then both orders reverse.
    """
    n = torch.tensor([max(int(s), 2) - 1 for s in size], dtype=torch.float64)
    linear = affine[:3, :3] * n[None, :] / n[:, None]
    shift = 2 * affine[:3, 3] / n
    flip = torch.arange(2, -1, -1)
    return torch.cat([linear[flip][:, flip], shift[flip, None]], dim=1)
