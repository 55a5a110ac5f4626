"""The training augmentation run on a finished batch on the training device, instead of in the data loader.

In a loader worker the augmentation after the patch crop is ~50 of ~80 ms per 128^3 sample (bench/dataload.py;
the random affine alone, MONAI's ``RandAffined`` through a full patch grid, ~190 ms when it fires), and every
sample crosses from the worker as float32 image and label: 16 MB. A GPU does the same work on the batch in
milliseconds. With ``augment.runs_in`` = step (``auto`` on CUDA) the loader only crops and hands over the
cache's float16 image and uint8 label (6 MB), and the training step runs :class:`BatchAugment` before the
forward pass.

It is the loader's chain (:func:`medsup.data.transforms.augmentations`), in the loader's order, with the
loader's settings and MONAI's own random draws: each transform's random state is drawn from as its call on a
real patch would (the affine's by a call on a 2^3 stand-in), and the step reads what it drew (fired or not, the
affine's matrix, the flip, the factor, the offset, the gamma). So a sample gets what the loader's chain would give it
for the same draws, to float rounding (tests/unit/test_batch_augment.py). The Gaussian noise is the exception:
MONAI draws it on the host, voxel by voxel, so the step draws whether and how strong (the same distribution)
and the noise itself on the device. Draws are seeded per epoch (:meth:`BatchAugment.reseed`), so a resumed run
draws what the uninterrupted one did from that epoch on.

Nothing reads the device: the per-sample numbers travel in one small tensor from pinned memory without a
blocking copy, and what fired is known on the host, so a stage nobody drew costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.transforms import Compose
from torch.nn import functional

from medsup.config import Config
from medsup.data.planning import Plan
from medsup.data.transforms import IMAGE, LABEL, augmentations

#: what MONAI's affine is called on to draw a sample's matrix (see :meth:`BatchAugment.draw`)
_STAND_IN = torch.zeros(1, 2, 2, 2)
#: MONAI's ``AdjustContrast``: the epsilon of the range and of the standard deviation
_RANGE_EPS, _STD_EPS = 1e-7, 1e-8


@dataclass(frozen=True)
class Draw:
    """One sample's draws. ``affine``: the ``(4, 4)`` voxel-space matrix about the patch centre (output -> input
    coordinates, MONAI's convention), None where it did not fire; ``flip``: the spatial axes flipped; ``rot90``:
    quarter turns in the plane of axes 0 and 1; ``scale`` / ``shift`` / ``gamma``: MONAI's factor (the image is
    multiplied by ``1 + scale``), offset and exponent, None where they did not fire; ``noise_std``: the
    Gaussian noise's standard deviation, None where it did not fire."""

    affine: torch.Tensor | None = None
    flip: tuple[int, ...] = ()
    rot90: int = 0
    scale: float | None = None
    shift: float | None = None
    gamma: float | None = None
    noise_std: float | None = None


class BatchAugment:
    """``(image, label) -> (image, label)``: both ``(B, 1, *patch)`` on any device (image any float type, label
    any type), out as float32 image and the label in its own type, each sample through the training
    augmentation (see the module docstring).

    Stages in the loader's order: affine (one ``affine_grid`` + ``grid_sample`` over the samples that drew it:
    image bilinear, label nearest, border padding), flips and quarter turns (per sample), intensity scale and
    shift (one multiply-add over the batch), gamma with the sample's mean and standard deviation kept, noise.
    """

    def __init__(self, cfg: Config, plan: Plan, seed: int) -> None:
        self.augment = augmentations(cfg.augment, plan)
        # a Compose of the loader's chain only to seed it: each transform then gets the seed that it gets in
        # a loader Compose of the same chain (MONAI draws one seed per transform, in order)
        self._seeder = Compose(self.augment.chain())
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._epoch_seed = 0
        self.reseed(0)

    def reseed(self, epoch: int) -> None:
        """Start ``epoch``'s draws (a function of the seed and the epoch only)."""
        self._epoch_seed = (self.seed + 7919 * epoch) % (2**32)
        self._seeder.set_random_state(seed=self._epoch_seed)
        self._generator = None  # the noise's, made on the batch's device at the next call

    def draw(self, n: int) -> list[Draw]:
        """The next ``n`` samples' draws, from MONAI's transforms' random states as their calls draw them.

        The affine is called on a 2^3 stand-in: it draws more than once a call, from more than one random state,
        and its matrix (which does not depend on the patch's size) is made in the call. The others draw in
        ``randomize`` alone (the flips and quarter turns), or in their own and then their inner transform's
        (the intensity transforms, where they fire): that is called directly, ~0.1 ms a transform less than a
        call on MetaTensors. The equality tests against the loader's chain hold all of it to MONAI's order.
        """
        a = self.augment
        out: list[Draw] = []
        for _ in range(n):
            affine = None
            if a.affine is not None:
                a.affine({IMAGE: _STAND_IN, LABEL: _STAND_IN})
                if a.affine._do_transform:
                    affine = torch.as_tensor(a.affine.rand_affine.rand_affine_grid.affine, dtype=torch.float64)
            flip = []
            for axis, t in enumerate(a.flips):  # one per spatial axis, in order
                t.randomize(None)
                if t._do_transform:
                    flip.append(axis)
            rot90 = 0
            if a.rot90 is not None:
                a.rot90.randomize()
                rot90 = a.rot90._rand_k if a.rot90._do_transform else 0
            scale = shift = gamma = noise_std = None
            for outer, inner in ((a.scale, a.scale.scaler), (a.shift, a.shift.shifter), (a.gamma, a.gamma.adjuster),
                                 (a.noise, None)):
                outer.randomize(None)
                if outer._do_transform and inner is not None:
                    inner.randomize(None)
            if a.scale._do_transform:
                scale = float(a.scale.scaler.factor)
            if a.shift._do_transform:
                shift = float(a.shift.shifter._offset)
            if a.gamma._do_transform:
                gamma = float(a.gamma.adjuster.gamma_value)
            if a.noise._do_transform:  # how strong, from its own random state; MONAI's inner would draw the noise
                noise_std = float(a.noise.R.uniform(0, a.noise.rand_gaussian_noise.std))
            out.append(Draw(affine, tuple(flip), int(rot90), scale, shift, gamma, noise_std))
        return out

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        draws = self.draw(image.shape[0])
        image = image.float()
        affine = [b for b, d in enumerate(draws) if d.affine is not None]
        if affine:  # what fired is decided on the host: a stage nobody drew launches nothing
            image, label = _affine(image, label, affine, [d.affine for d in draws if d.affine is not None])
        if any(d.flip or d.rot90 for d in draws):
            image, label = (torch.stack([_turn(x[b], d) for b, d in enumerate(draws)]) for x in (image, label))
        linear = any(d.scale is not None or d.shift is not None for d in draws)
        gamma = any(d.gamma is not None for d in draws)
        noise = any(d.noise_std is not None for d in draws)
        if not (linear or gamma or noise):
            return image, label
        # per sample: multiplier, offset, gamma, gamma fired, noise std; identities where nothing fired
        scalars = _to(image.device, torch.tensor(
            [[1.0 + (d.scale or 0.0), d.shift or 0.0, d.gamma or 1.0, d.gamma is not None, d.noise_std or 0.0]
             for d in draws], dtype=torch.float32)).view(-1, 5, *(1,) * (image.dim() - 1))
        if linear:  # MONAI: img * (1 + factor), then img + offset
            image = image * scalars[:, 0] + scalars[:, 1]
        if gamma:
            image = torch.where(scalars[:, 3] > 0, _gamma(image, scalars[:, 2]), image)
        if noise:
            if self._generator is None or self._generator.device != image.device:
                self._generator = torch.Generator(device=image.device).manual_seed(self._epoch_seed)
            draw = torch.randn(image.shape, generator=self._generator, device=image.device, dtype=image.dtype)
            image = image + draw * scalars[:, 4]  # std 0 where it did not fire: exactly the sample
        return image, label


def _affine(image: torch.Tensor, label: torch.Tensor, fired: list[int],
            matrices: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples ``fired`` of the batch through their affine ``matrices`` (MONAI's voxel-space convention)."""
    size = image.shape[2:]
    theta = _to(image.device, torch.stack([_theta(m, size) for m in matrices]).to(torch.float32))
    grid = functional.affine_grid(theta, [len(fired), 1, *size], align_corners=True)
    index = _to(image.device, torch.tensor(fired))
    moved = functional.grid_sample(image.index_select(0, index), grid, mode="bilinear", padding_mode="border",
                                   align_corners=True)
    labels = functional.grid_sample(label.index_select(0, index).float(), grid, mode="nearest",
                                    padding_mode="border", align_corners=True)
    return image.index_copy(0, index, moved), label.index_copy(0, index, labels.to(label.dtype))


def _turn(sample: torch.Tensor, draw: Draw) -> torch.Tensor:
    """One ``(C, X, Y, Z)`` sample flipped along ``draw.flip``, then turned ``draw.rot90`` quarter turns in the
    (X, Y) plane: MONAI's ``Flip`` and ``Rotate90`` (torch.flip / torch.rot90 over the spatial dims)."""
    if draw.flip:
        sample = sample.flip([axis + 1 for axis in draw.flip])
    return sample.rot90(draw.rot90, (1, 2)) if draw.rot90 else sample


def _gamma(image: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI's ``AdjustContrast(gamma, retain_stats=True)`` per sample of ``(B, ...)``, ``gamma`` ``(B, 1, ...)``:
    rescale to [0, 1], raise to gamma, back to the range, then restore the sample's mean and standard
    deviation."""
    dims = tuple(range(1, image.dim()))
    mean, std = image.mean(dims, keepdim=True), image.std(dims, keepdim=True)
    low = image.amin(dims, keepdim=True)
    span = image.amax(dims, keepdim=True) - low
    out = ((image - low) / (span + _RANGE_EPS)) ** gamma * span + low
    out = out - out.mean(dims, keepdim=True)
    return std * (out / (out.std(dims, keepdim=True) + _STD_EPS)) + mean


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
