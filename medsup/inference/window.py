"""Streaming sliding-window inference: Gaussian-blended tiles, optional mirror TTA, bounded memory.

MONAI's ``SlidingWindowInferer`` (and nnU-Net's predictor) stitch into a full ``C x X x Y x Z`` float32
output plus a count map: for a 512 x 512 x 1000 CT at the native resolution of a 3-class liver model that
is ~4 GB, 8x the raw int16 volume. Here tiles are visited in order of their z start; once every tile
overlapping a slice has been added, the slice is final, so the stitch buffer only spans one patch depth
and finished slabs of logits are handed to a sink (resampling back to the input grid, argmax) right away.

The tile positions and Gaussian importance map are MONAI's (``dense_patch_slices`` scan, ``sigma_scale``
0.125 like nnU-Net), so the blended logits equal ``SlidingWindowInferer``'s (a unit test checks it).
Mirror TTA is done per tile, as nnU-Net does: each tile is predicted with all 8 flips and averaged.
A tile that holds one value throughout (air, or any tissue below the CT clip) is predicted once per value and
case and its logits reused for every other such tile (``bench/constant_tiles.py``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
from monai.data.utils import compute_importance_map
from torch.nn.functional import pad as torch_pad

#: distinct single-value tiles whose logits a case keeps (a CT has one or two: air, the clip's floor)
MAX_CONSTANT_TILES = 4

Network = Callable[[torch.Tensor], torch.Tensor]
Sink = Callable[[torch.Tensor], None]
TileHook = Callable[[int, int], None]
"""``(tiles done, tiles in the volume)`` after each network call (a per-case progress bar)."""


def constant_value(tile: torch.Tensor) -> float | None:
    """The one value a tile holds throughout, or None (host tensors; one pass over the tile)."""
    low, high = torch.aminmax(tile)
    return float(low) if bool(low == high) else None


def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of tiles of ``patch`` covering ``size`` (>= ``patch``) with ``overlap`` (MONAI's scan)."""
    if size <= patch:
        return [0]
    interval = max(1, int(patch * (1 - overlap)))
    count = next(d for d in range(math.ceil(size / interval)) if d * interval + patch >= size) + 1
    return [min(d * interval, size - patch) for d in range(count)]


def mirror_axes(tta: bool) -> list[tuple[int, ...]]:
    """Flip combinations of the three spatial dims (2, 3, 4) for mirror TTA: all 8, or just identity."""
    if not tta:
        return [()]
    return [c for n in range(4) for c in itertools.combinations((2, 3, 4), n)]


@lru_cache(maxsize=8)
def _importance(patch: tuple[int, int, int], blend: str, device: torch.device) -> torch.Tensor:
    return compute_importance_map(patch, mode=blend, sigma_scale=0.125, device=device, dtype=torch.float32)


class SlidingWindow:
    """Tiles of ``patch`` with ``overlap``, blended with a Gaussian importance map (sigma 1/8 of the patch,
    nnU-Net's) or uniformly (``blend="constant"``), ``batch_size`` tiles per network call.

    A volume smaller than the patch is padded with ``pad_value``: the normalised value of air that training
    pads with too (padding with 0 would show the network a wall of average-foreground tissue).
    """

    def __init__(self, patch: Sequence[int], overlap: float, batch_size: int, blend: str, pad_value: float,
                 tta: bool = False) -> None:
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.patch = (int(patch[0]), int(patch[1]), int(patch[2]))
        self.overlap, self.batch_size, self.blend, self.pad_value = overlap, max(1, batch_size), blend, pad_value
        self.flips = mirror_axes(tta)
        #: reuse the logits of tiles that hold a single value: the same function, computed once (off: an A/B)
        self.reuse_constant = True

    def run(self, image: torch.Tensor, network: Network, sink: Sink, device: torch.device,
            stitch_device: torch.device | None = None, on_tiles: TileHook | None = None) -> None:
        """Predict ``image`` ``(1, 1, X, Y, Z)`` (any float dtype, any device) and pass finished logits to
        ``sink`` as float32 slabs ``(C, X, Y, n)`` in z order, covering ``Z`` exactly once.

        Tiles are moved to ``device`` (where ``network`` lives); blending happens on ``stitch_device``
        (default ``device``). ``on_tiles(done, total)`` is called after every batch of tiles.
        """
        stitch = stitch_device or device
        px, py, pz = self.patch
        size = tuple(int(s) for s in image.shape[2:])
        # symmetric padding up to the patch, as MONAI does
        lows = [max(p - s, 0) // 2 for p, s in zip(self.patch, size, strict=True)]
        highs = [max(p - s, 0) - lo for p, s, lo in zip(self.patch, size, lows, strict=True)]
        if any(lows) or any(highs):
            image = torch_pad(image, (lows[2], highs[2], lows[1], highs[1], lows[0], highs[0]),
                              value=self.pad_value)
        X, Y, Z = (int(s) for s in image.shape[2:])
        xs, ys, zs = (tile_starts(n, p, self.overlap) for n, p in zip((X, Y, Z), self.patch, strict=True))
        weight = _importance(self.patch, self.blend, stitch)
        acc: torch.Tensor | None = None  # (C, X, Y, pz): blended logits of slices [z0, z0 + pz)
        count = torch.zeros((X, Y, pz), device=stitch)
        done = 0  # padded-grid slices already handed to the sink
        tiles = list(itertools.product(xs, ys))
        total, predicted = len(tiles) * len(zs), 0
        # the logits of a tile that holds one value throughout (air, or anything below the CT clip: 0-21 % of the
        # tiles of the real CTs at the liver plans, bench/constant_tiles.py) depend on that value alone, whatever
        # the tile's position: predicted once per value and case, reused for every other such tile. Checked on
        # the host only: on a GPU the check would cost a sync per tile.
        check = self.reuse_constant and image.device.type == "cpu"
        kept: dict[float, torch.Tensor] = {}  # value -> the logits of a tile holding only it
        for g, z0 in enumerate(zs):
            views = [image[..., i:i + px, j:j + py, z0:z0 + pz] for i, j in tiles]
            values = [constant_value(v) if check else None for v in views]
            run, keep, later = self._schedule(values, kept)
            for b in range(0, len(run), self.batch_size):
                chunk = run[b:b + self.batch_size]
                x = torch.cat([views[t] for t in chunk]).to(device, torch.float32, non_blocking=True)
                out = self._predict(network, x).to(stitch)
                if acc is None:
                    acc = torch.zeros((out.shape[1], X, Y, pz), device=stitch)
                for n, t in enumerate(chunk):
                    i, j = tiles[t]
                    acc[:, i:i + px, j:j + py].addcmul_(out[n], weight)
                    count[i:i + px, j:j + py].add_(weight)
                    if t in keep:  # a copy: a view would hold the whole batch
                        kept[keep[t]] = out[n].clone()
                predicted += len(chunk)
                if on_tiles is not None:
                    on_tiles(predicted, total)
            assert acc is not None  # a later tile's value was predicted in this group's run or an earlier one
            for t, value in later:  # tiles of a value predicted before: its logits, without a network call
                i, j = tiles[t]
                acc[:, i:i + px, j:j + py].addcmul_(kept[value], weight)
                count[i:i + px, j:j + py].add_(weight)
            if later:
                predicted += len(later)
                if on_tiles is not None:
                    on_tiles(predicted, total)
            # slices below the next group's start get no more tiles: they are final
            end = zs[g + 1] if g + 1 < len(zs) else Z
            finished = (acc[..., : end - z0] / count[..., : end - z0])
            self._emit(finished, done, lows, size, sink)
            done = end
            shift = end - z0
            if shift and g + 1 < len(zs):
                acc = torch.cat([acc[..., shift:], torch.zeros_like(acc[..., :shift])], dim=3)
                count = torch.cat([count[..., shift:], torch.zeros_like(count[..., :shift])], dim=2)

    @staticmethod
    def _emit(slab: torch.Tensor, z0: int, lows: list[int], size: tuple[int, ...], sink: Sink) -> None:
        """Crop the padding off a finished slab ``(C, X, Y, n)`` starting at padded slice ``z0``."""
        k0, k1 = max(z0, lows[2]), min(z0 + slab.shape[3], lows[2] + size[2])
        if k1 > k0:
            sink(slab[:, lows[0]:lows[0] + size[0], lows[1]:lows[1] + size[1], k0 - z0:k1 - z0])

    @staticmethod
    def _schedule(values: Sequence[float | None], kept: dict[float, torch.Tensor]
                  ) -> tuple[list[int], dict[int, float], list[tuple[int, float]]]:
        """Split a group's tiles (``values``: each tile's single value or None) into ``run``, those the network
        must see (in full batches, whatever lies between them), ``keep``, those of ``run`` whose logits are to
        be kept for their value (tile -> value: the first tile of a value not ``kept`` yet; at most
        ``MAX_CONSTANT_TILES`` values a case), and ``later``, ``(tile, value)`` pairs that take kept logits
        once ``run`` is done."""
        run: list[int] = []
        keep: dict[int, float] = {}
        later: list[tuple[int, float]] = []
        for t, value in enumerate(values):
            if value is not None:
                if value in kept or value in keep.values():
                    later.append((t, value))
                    continue
                if len(kept) + len(keep) < MAX_CONSTANT_TILES:
                    keep[t] = value
            run.append(t)
        return run, keep, later

    def _predict(self, network: Network, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, px, py, pz)`` float32 logits of tiles ``x``; with TTA the mean over the 8 mirrorings."""
        total: torch.Tensor | None = None
        for dims in self.flips:
            logits = network(torch.flip(x, dims) if dims else x).float()
            logits = torch.flip(logits, dims) if dims else logits
            total = logits if total is None else total.add_(logits)
        assert total is not None
        return total.div_(len(self.flips)) if len(self.flips) > 1 else total


def sliding_window_logits(image: torch.Tensor, network: Network, window: SlidingWindow,
                          device: torch.device | None = None) -> torch.Tensor:
    """Whole-volume logits ``(1, C, X, Y, Z)`` of ``image`` ``(1, 1, X, Y, Z)``: the slabs of
    :meth:`SlidingWindow.run` concatenated (for validation and small volumes, where memory is no issue)."""
    slabs: list[torch.Tensor] = []
    window.run(image, network, slabs.append, device or image.device)
    return torch.cat(slabs, dim=3)[None]
