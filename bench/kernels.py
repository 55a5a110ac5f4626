"""The resampling kernels of medsup's inference, old vs new, side by side.

1. ``argmax_reduce`` (a running maximum over channels) vs ``torch.argmax(0)`` on export-sized slabs
   ``(C, 512, 512, 8)``: cProfile showed torch's ``argmax`` over the outer (channel) dimension taking half
   of the export.
2. ``SlabResampler`` onto a 512 x 512 x 41 grid from 5 mm logits ``(3, 82, 82, 41)`` (the CRLM case of
   ``bench/infer_e2e.py``): the axis-aligned separable path vs ``grid_sample``, then argmax.
3. Preprocessing a 512 x 512 x 300 int16 CT onto 5 mm (``resample_to_spacing``): source slices kept as
   pushed pieces vs the former window re-concatenated on every push.

Prints medians over ``--repeats`` interleaved runs, the ratios, and checks the results agree.

    .venv/bin/python bench/kernels.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import medsup.data.resample as resample
from medsup.data.resample import SlabResampler, argmax_reduce, push_array


class ConcatWindowResampler(SlabResampler):
    """The former window handling: every push re-concatenates the whole pending window (for comparison)."""

    def push(self, chunk: torch.Tensor) -> None:
        chunk = chunk.to(self.device, torch.float32)
        window = getattr(self, "window", None)
        self.window = chunk if window is None else torch.cat([window, chunk], dim=3)
        self.received += chunk.shape[3]
        self._produce()

    def _slices(self, lo: int, hi: int) -> torch.Tensor:
        if lo > self.w0:  # what the old code trimmed after each slab
            self.window = self.window[..., lo - self.w0:]
            self.w0 = lo
        return self.window[..., lo - self.w0: hi + 1 - self.w0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} torch thread(s); median of {args.repeats}")
    print("| slab (C, X, Y, n) | x.argmax(0) s | argmax_reduce s | speed-up |")
    print("|---|---|---|---|")
    for channels in (2, 3, 14):
        x = torch.randn(channels, 512, 512, 8, generator=g)
        if not torch.equal(x.argmax(0).to(torch.uint8), argmax_reduce(x)):
            raise SystemExit(f"argmax_reduce disagrees with argmax for {channels} channels")
        old, new = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            x.argmax(0).to(torch.uint8)
            t1 = time.perf_counter()
            argmax_reduce(x)
            t2 = time.perf_counter()
            old.append(t1 - t0)
            new.append(t2 - t1)
        a, b = statistics.median(old), statistics.median(new)
        print(f"| {tuple(x.shape)} | {a:.3f} | {b:.3f} | {a / b:.1f}x |")
    resampling(args.repeats)
    preprocessing(args.repeats)


def resampling(repeats: int) -> None:
    """5 mm logits onto the 0.797 x 0.797 x 5 mm grid of a 512 x 512 x 41 CT, grid_sample vs separable."""
    src = np.diag([5.0, 5.0, 5.0, 1.0])
    src[:3, 3] = [-1.2, 0.7, 0.0]
    dst = np.diag([0.797, 0.797, 5.0, 1.0])
    logits = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 82, 82, 41)).astype(np.float32))
    times: dict[bool, list[float]] = {False: [], True: []}
    labels: dict[bool, np.ndarray] = {}
    for _ in range(repeats):
        for separable in (False, True):
            out = np.empty((512, 512, 41), np.uint8)
            resampler = SlabResampler((82, 82, 41), src, dst, out, argmax_reduce)
            resampler.separable = separable and resampler.separable
            t0 = time.perf_counter()
            push_array(resampler, logits)
            resampler.close()
            times[separable].append(time.perf_counter() - t0)
            labels[separable] = out
    a, b = statistics.median(times[False]), statistics.median(times[True])
    agree = float((labels[False] == labels[True]).mean())
    print("\n| export (3, 82, 82, 41) -> 512x512x41 + argmax | grid_sample s | separable s | speed-up | same label |")
    print("|---|---|---|---|---|")
    print(f"| SlabResampler | {a:.3f} | {b:.3f} | {a / b:.1f}x | {100 * agree:.4f}% |")



def preprocessing(repeats: int) -> None:
    """A 512 x 512 x 300 int16 CT (0.8 x 0.8 x 1 mm) onto 5 mm, pieces vs re-concatenated window."""
    ct = np.random.default_rng(0).integers(-1000, 1000, (1, 512, 512, 300)).astype(np.int16)
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    times: dict[str, list[float]] = {"window": [], "pieces": []}
    values: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for name, cls in (("window", ConcatWindowResampler), ("pieces", SlabResampler)):
            resample.SlabResampler = cls  # type: ignore[misc]  # what resample_to_spacing instantiates
            try:
                t0 = time.perf_counter()
                values[name], _ = resample.resample_to_spacing(ct, affine, (5.0, 5.0, 5.0))
                times[name].append(time.perf_counter() - t0)
            finally:
                resample.SlabResampler = SlabResampler  # type: ignore[misc]
    a, b = statistics.median(times["window"]), statistics.median(times["pieces"])
    same = torch.equal(values["window"], values["pieces"])
    print("\n| preprocess 512x512x300 int16 -> 5 mm | concatenated window s | pieces s | speed-up | identical |")
    print("|---|---|---|---|---|")
    print(f"| resample_to_spacing | {a:.3f} | {b:.3f} | {a / b:.1f}x | {same} |")


if __name__ == "__main__":
    main()
