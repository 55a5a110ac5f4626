"""Resampling between voxel grids by their affines, streamed slab by slab.

Used both ways: preprocessing resamples a scan onto the plan spacing (MONAI's ``Spacingd`` builds a full
coordinate grid, ~7x the input in memory), and inference maps network-resolution logits back onto the
input's exact grid (nnU-Net resamples full probability maps on the CPU, which dominates its inference time
and memory). Here the source arrives in slabs along its last axis and each destination slab is sampled
from just the source slices it needs and reduced at once (argmax, one softmax channel, CT normalisation),
so neither a full float copy of the source nor full-size logits on the destination grid ever exist.

Every grid pair medsup resamples between has the same axis directions (the plan grid keeps the input's
directions after exact reorientation; see :func:`spacing_grid`), so the destination's last axis maps
monotonically onto the source's: that is what makes streaming along it possible, and it is checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.nn.functional import grid_sample

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""``(C, X, Y, s)`` float32 resampled slab -> ``(X, Y, s)`` values to store (argmax, a channel, ...)."""


class SlabResampler:
    """Resample a source volume ``(C, x, y, z)`` that arrives as z-slabs onto a destination grid, writing
    reduced destination slabs into ``out`` (an ``(X, Y, Z)`` array, possibly a strided view) as soon as the
    source slices they need are in.

    Only the source slices still needed are kept (a few slices for argmax-back-to-input, a handful for
    preprocessing), so memory is one destination slab plus a thin source window.

    Args:
        src_shape: ``(x, y, z)`` of the whole source grid.
        src_affine, dst_affine: voxel -> world ``(4, 4)`` affines.
        out: destination array ``(X, Y, Z)``; its dtype is what ``reduce`` results are cast to.
        reduce: maps a resampled ``(C, X, Y, s)`` float32 slab to ``(X, Y, s)``.
        mode: ``bilinear`` (trilinear) or ``nearest``. Destination voxels outside the source take the
            nearest border value.
        slab: destination slices per step (bounds the ``(C, X, Y, slab)`` temporaries).
        device: where sampling runs (the GPU when there is one); source slabs are moved there.
    """

    def __init__(self, src_shape: tuple[int, int, int], src_affine: np.ndarray, dst_affine: np.ndarray,
                 out: np.ndarray, reduce: Reduce, mode: str = "bilinear", slab: int = 8,
                 device: torch.device | None = None) -> None:
        to_src = np.linalg.inv(src_affine) @ dst_affine
        if abs(to_src[2, 0]) > 1e-6 or abs(to_src[2, 1]) > 1e-6 or to_src[2, 2] <= 0:
            raise ValueError("streamed resampling needs the destination's last axis to run along the source's "
                             f"(voxel map {np.round(to_src[:3, :3], 4).tolist()})")
        self.src_shape, self.out, self.reduce, self.mode, self.slab = src_shape, out, reduce, mode, slab
        self.device = device or torch.device("cpu")
        self.to_src = torch.as_tensor(to_src, dtype=torch.float32, device=self.device)
        # onto a finer axis-aligned grid (logits back onto the input's grid: same directions), interpolate one axis
        # at a time: 3 gathers + lerps instead of grid_sample's 3-D kernel, 2-4x faster onto a 512^2 CT grid
        # (bench/profile_infer.py); onto a coarser grid (preprocessing) grid_sample is as fast and is kept
        linear = to_src[:3, :3]
        self.separable = (mode == "bilinear" and out.shape[0] * out.shape[1] > src_shape[0] * src_shape[1]
                          and bool(np.allclose(linear, np.diag(np.diag(linear)), atol=1e-6)))
        if self.separable:
            self.ci = torch.arange(out.shape[0], device=self.device, dtype=torch.float32) * self.to_src[0, 0] \
                + self.to_src[0, 3]
            self.cj = torch.arange(out.shape[1], device=self.device, dtype=torch.float32) * self.to_src[1, 1] \
                + self.to_src[1, 3]
        # grid_sample wants source coordinates ordered (z, y, x) for an input laid out (D=x, H=y, W=z): keep
        # the voxel map's rows reversed, and the (i, j) part of every slab's coordinates precomputed
        zyx = self.to_src[[2, 1, 0]]
        self.k_step = zyx[:, 2]  # (3,) source coordinates per destination slice
        ii, jj = torch.meshgrid(torch.arange(out.shape[0], device=self.device, dtype=torch.float32),
                                torch.arange(out.shape[1], device=self.device, dtype=torch.float32), indexing="ij")
        self.base = ii[..., None] * zyx[:, 0] + jj[..., None] * zyx[:, 1] + zyx[:, 3]  # (X, Y, 3)
        # source slices [w0, received) as pushed, (C, x, y, n) each: joined only for the slices one destination
        # slab needs (re-concatenating a growing window on every push cost more than the resampling itself)
        self.pieces: list[torch.Tensor] = []
        self.w0 = 0
        self.received = 0  # source slices pushed so far
        self.next_k = 0  # next destination slice to produce

    def push(self, chunk: torch.Tensor) -> None:
        """Append source slices ``(C, x, y, n)`` (the next ``n`` along z) and produce what they complete."""
        if tuple(chunk.shape[1:3]) != self.src_shape[:2]:
            raise ValueError(f"source slab {tuple(chunk.shape)} does not match the source grid {self.src_shape}")
        chunk = chunk.to(self.device, torch.float32)
        self.pieces.append(chunk)
        self.received += chunk.shape[3]
        self._produce()

    def close(self) -> np.ndarray:
        """Check every source and destination slice was handled; returns ``out``."""
        if self.received != self.src_shape[2] or self.next_k != self.out.shape[2]:
            raise RuntimeError(f"resampling incomplete: {self.received}/{self.src_shape[2]} source slices in, "
                               f"{self.next_k}/{self.out.shape[2]} destination slices out")
        self.pieces = []
        return self.out

    def _produce(self) -> None:
        Z = self.out.shape[2]
        last = self.src_shape[2] - 1
        while self.next_k < Z:
            k0, k1 = self.next_k, min(Z, self.next_k + self.slab)
            kk = torch.arange(k0, k1, device=self.device, dtype=torch.float32)
            z_src = kk * self.to_src[2, 2] + self.to_src[2, 3]  # source z depends on k only (checked above)
            lo = min(max(math.floor(float(z_src[0])), 0), last)
            hi = min(max(math.ceil(float(z_src[-1])), 0), last)
            if hi >= self.received:
                return  # wait for more source slices
            self.out[:, :, k0:k1] = self._sample(self._slices(lo, hi), lo, kk)
            self.next_k = k1
            # later destination slices need source slices >= lo only (monotone map): drop pieces below it
            while self.pieces and self.w0 + self.pieces[0].shape[3] <= lo:
                self.w0 += self.pieces.pop(0).shape[3]

    def _slices(self, lo: int, hi: int) -> torch.Tensor:
        """Source slices ``[lo, hi]`` ``(C, x, y, hi - lo + 1)``: a view when one piece holds them, else one copy."""
        parts, start = [], self.w0
        for piece in self.pieces:
            end = start + piece.shape[3]
            if end > lo and start <= hi:
                parts.append(piece[..., max(lo - start, 0): min(hi + 1, end) - start])
            start = end
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)

    def _sample(self, window: torch.Tensor, z0: int, kk: torch.Tensor) -> np.ndarray:
        if self.separable:
            ck = kk * self.to_src[2, 2] + (self.to_src[2, 3] - z0)
            sampled = separable_linear(window, (self.ci, self.cj, ck))
            return self.reduce(sampled).cpu().numpy().astype(self.out.dtype, copy=False)
        # continuous source indices (X, Y, n, 3) in (z, y, x) order, z relative to the window's first slice
        grid = self.base[:, :, None, :] + kk[:, None] * self.k_step
        grid[..., 0] -= z0
        size = torch.tensor(window.shape[1:][::-1], dtype=torch.float32, device=self.device)
        # to [-1, 1] (align_corners: -1 and 1 are the first and last voxel centres), in place
        grid.mul_(2 / (size - 1).clamp(min=1)).sub_(1)
        sampled = grid_sample(window[None], grid[None], mode=self.mode, padding_mode="border", align_corners=True)
        return self.reduce(sampled[0]).cpu().numpy().astype(self.out.dtype, copy=False)


def separable_linear(x: torch.Tensor, coords: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Trilinear samples of ``x`` ``(C, a, b, c)`` at the grid ``coords[0] x coords[1] x coords[2]`` of continuous
    voxel indices (coordinates outside clamp to the border), one axis at a time: what ``grid_sample`` with
    ``align_corners=True, padding_mode="border"`` gives on an axis-aligned grid. Returns ``(C, I, J, K)``.

    Shrinking axes go first (outermost first) and growing ones last (outermost last), so every pass gathers
    whole contiguous rows of the smallest intermediate.
    """
    shrinks = math.prod(len(c) for c in coords) < math.prod(x.shape[1:])
    for dim in ((1, 2, 3) if shrinks else (3, 2, 1)):
        size = x.shape[dim]
        pos = coords[dim - 1].clamp(0, size - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=size - 1)
        shape = [1, 1, 1, 1]
        shape[dim] = -1
        weight = (pos - lo).to(x.dtype).view(shape)
        x = torch.lerp(x.index_select(dim, lo), x.index_select(dim, hi), weight)
    return x


def float_chunks(source: np.ndarray | torch.Tensor, chunk: int = 16) -> Iterator[tuple[int, torch.Tensor]]:
    """``(z0, float32 slab)`` of a source ``(C, x, y, z)`` (numpy of any dtype and strides, or a tensor) in
    z-chunks, each converted on its own: a full-size int16 CT never exists as a float copy."""
    for z0 in range(0, source.shape[3], chunk):
        part = source[..., z0:z0 + chunk]
        if isinstance(part, np.ndarray):
            part = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))
        yield z0, part.float()


def push_array(resampler: SlabResampler, source: np.ndarray | torch.Tensor) -> None:
    """Feed a whole source ``(C, x, y, z)`` to ``resampler`` (see :func:`float_chunks`)."""
    for _, part in float_chunks(source):
        resampler.push(part)


def resample_slabs(logits: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray,
                   dst_shape: tuple[int, int, int], reduce: Reduce, dtype: type[np.generic],
                   slab: int = 8, mode: str = "bilinear") -> np.ndarray:
    """Resample a whole ``logits`` ``(C, x, y, z)`` onto ``dst_shape`` / ``dst_affine`` (see
    :class:`SlabResampler`); returns the reduced ``(X, Y, Z)`` array of ``dtype``."""
    out = np.empty(dst_shape, dtype=dtype)
    shape = (int(logits.shape[1]), int(logits.shape[2]), int(logits.shape[3]))
    resampler = SlabResampler(shape, src_affine, dst_affine, out, reduce, mode, slab, logits.device)
    push_array(resampler, logits)
    return resampler.close()


def argmax_reduce(x: torch.Tensor) -> torch.Tensor:
    """``(C, X, Y, s)`` logits -> ``(X, Y, s)`` uint8 labels (the first maximum on ties, as ``argmax``).

    A running maximum over the few channels instead of ``x.argmax(0)``: on the CPU torch reduces over the outer
    dimension with a strided scalar loop, ~8x slower than these elementwise passes, and it dominated the
    export of a full-size CT (``bench/profile_infer.py``; BENCHMARKS.md).
    """
    if x.shape[0] > 255:  # labels would not fit uint8 anyway
        return x.argmax(0).to(torch.uint8)
    best = x[0].clone()
    labels = torch.zeros(x.shape[1:], dtype=torch.uint8, device=x.device)
    for c in range(1, x.shape[0]):
        labels.masked_fill_(x[c] > best, c)
        torch.maximum(best, x[c], out=best)
    return labels


def resample_argmax(logits: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray,
                    dst_shape: tuple[int, int, int]) -> np.ndarray:
    """Labels (``uint8``) on the destination grid: argmax of the resampled logits."""
    return resample_slabs(logits, src_affine, dst_affine, dst_shape, argmax_reduce, np.uint8)


def resample_probability(logits: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray,
                         dst_shape: tuple[int, int, int], channel: int) -> np.ndarray:
    """Softmax probability of ``channel`` (``float32``) on the destination grid."""
    return resample_slabs(logits, src_affine, dst_affine, dst_shape,
                          lambda x: torch.softmax(x, 0)[channel], np.float32)


def spacing_grid(affine: np.ndarray, shape: tuple[int, ...], spacing: tuple[float, float, float]
                 ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The grid with voxel 0 and the axis directions of ``affine`` but ``spacing`` mm between voxels, covering
    the same span of voxel centres (MONAI ``Spacing``'s convention). Returns ``(affine, shape)``."""
    current = np.linalg.norm(affine[:3, :3], axis=0)
    target = np.asarray(spacing, dtype=np.float64)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] / current * target
    n = [max(1, round((s - 1) * c / t) + 1) for s, c, t in zip(shape, current, target, strict=True)]
    return out, (n[0], n[1], n[2])


def resample_to_spacing(volume: np.ndarray | torch.Tensor, affine: np.ndarray, spacing: tuple[float, float, float],
                        mode: str = "bilinear", reduce: Reduce | None = None,
                        dtype: type[np.generic] = np.float32) -> tuple[torch.Tensor, np.ndarray]:
    """``volume`` ``(C, x, y, z)`` (numpy of any dtype/strides, or a tensor) onto ``spacing`` (see
    :func:`spacing_grid`), one channel at a time; ``mode`` ``nearest`` for labels. ``reduce`` maps each
    resampled float32 slab ``(1, X, Y, s)`` to what is stored (default: the values); ``dtype`` is the stored
    type.

    Returns the resampled ``(C, X, Y, Z)`` CPU tensor of ``dtype`` and its affine.
    """
    reduce = reduce or (lambda x: x[0])
    dst_affine, dst_shape = spacing_grid(affine, tuple(volume.shape[1:]), spacing)
    same = dst_shape == tuple(volume.shape[1:]) and np.allclose(dst_affine, affine)
    out = np.empty((volume.shape[0], *dst_shape), dtype=dtype)
    for c in range(volume.shape[0]):  # CT has one channel: no stacking copy
        channel = volume[c:c + 1]
        if same:  # already on the grid: an exact converting (reducing) copy, chunk by chunk
            for z0, part in float_chunks(channel):
                out[c, ..., z0:z0 + part.shape[3]] = reduce(part).cpu().numpy()
            continue
        shape = (int(volume.shape[1]), int(volume.shape[2]), int(volume.shape[3]))
        resampler = SlabResampler(shape, affine, dst_affine, out[c], reduce, mode)
        push_array(resampler, channel)
        resampler.close()
    return torch.from_numpy(out), affine if same else dst_affine
