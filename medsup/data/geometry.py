"""The voxel grid of a 3-D image (:class:`Geometry`: ITK's spacing, origin and direction in LPS world mm) and an
image on it (:class:`Volume`), with exact reorientation.

Conventions (used everywhere in medsup): arrays are indexed ``(i, j, k)``, ``array[i, j, k]`` being the voxel
at ITK index ``(i, j, k)`` (nibabel's and MONAI's order); :meth:`Geometry.affine` is the RAS voxel-to-world
matrix of nibabel and MONAI; orientation codes name the direction each array axis increases toward
(``RAS``: i toward the patient's Right, j Anterior, k Superior). Readers and writers: :mod:`medsup.data.io`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel.orientations as nio
import numpy as np

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a 3-D image in ITK terms.

    Attributes:
        shape: voxels along ``(i, j, k)``.
        spacing: mm between voxel centres along ``(i, j, k)``.
        origin: world position (LPS, mm) of voxel ``(0, 0, 0)``.
        direction: 3x3 direction cosines, row-major as ITK stores them; column ``a`` is axis ``a``'s unit
            vector in LPS.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def direction_matrix(self) -> np.ndarray:
        """Direction cosines as a (3, 3) array."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def affine(self) -> np.ndarray:
        """(4, 4) voxel-index -> RAS world (mm) matrix, as nibabel and MONAI use."""
        lps = np.eye(4)
        lps[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        lps[:3, 3] = self.origin
        return _LPS_TO_RAS @ lps

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: tuple[int, ...]) -> Geometry:
        """Inverse of :meth:`affine` for a (4, 4) RAS affine and a 3-D shape."""
        lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        if np.any(spacing <= 0):
            raise ValueError(f"affine has a zero-length axis: {affine.tolist()}")
        direction = lps[:3, :3] / spacing[None, :]
        return cls(
            shape=_triple_int(shape),
            spacing=_triple(spacing),
            origin=_triple(lps[:3, 3]),
            direction=tuple(float(v) for v in direction.ravel()),
        )

    @classmethod
    def from_itk(cls, size: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
                 direction: Sequence[float]) -> Geometry:
        """From ITK header values (``GetSize()``, ``GetSpacing()``...); a 4-D image with one time point keeps its
        spatial 3-D part."""
        cosines = np.asarray(direction, dtype=np.float64)
        if cosines.size == 16:
            cosines = cosines.reshape(4, 4)[:3, :3]
        return cls(shape=_triple_int(size[:3]), spacing=_triple(spacing[:3]), origin=_triple(origin[:3]),
                   direction=tuple(float(v) for v in cosines.ravel()))

    @property
    def orientation(self) -> str:
        """Orientation code, e.g. ``"LPS"`` or ``"RAS"`` (direction each axis increases toward)."""
        return "".join(nio.aff2axcodes(self.affine()))

    def mismatches(self, other: Geometry, tol: float = 1e-3) -> list[str]:
        """Human-readable differences from ``other`` (empty when they describe the same grid).

        Spacing is compared relative to its size (``tol`` per mm), origin in mm, direction in cosines.
        """
        problems = []
        if self.shape != other.shape:
            problems.append(f"shape {list(self.shape)} != {list(other.shape)}")
        if not np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol):
            problems.append(f"spacing {_fmt(self.spacing)} != {_fmt(other.spacing)}")
        if not np.allclose(self.origin, other.origin, rtol=0, atol=max(tol, 1e-4) * 10):
            problems.append(f"origin {_fmt(self.origin)} != {_fmt(other.origin)}")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=tol):
            problems.append(f"direction {_fmt(self.direction)} != {_fmt(other.direction)}")
        return problems

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Geometry:
        """Inverse of :meth:`as_dict` (its derived ``orientation`` is ignored)."""
        return cls(shape=_triple_int(data["shape"]), spacing=_triple(data["spacing"]), origin=_triple(data["origin"]),
                   direction=tuple(float(v) for v in data["direction"]))

    def as_dict(self) -> dict[str, list[float] | list[int] | str]:
        """JSON-ready view."""
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "orientation": self.orientation,
        }


@dataclass(frozen=True)
class Volume:
    """A 3-D scalar image: ``array`` of shape ``(I, J, K)`` and its :class:`Geometry`."""

    array: np.ndarray
    geometry: Geometry

    def reoriented(self, code: str) -> Volume:
        """Exact reorientation (axis permutation and flips, no interpolation) to ``code`` (e.g. ``"RAS"``).

        The world position of every voxel is unchanged; only the array order and the affine change.
        """
        current = nio.io_orientation(self.geometry.affine())
        target = nio.axcodes2ornt(tuple(code.upper()))
        transform = nio.ornt_transform(current, target)
        if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
            return self
        array = nio.apply_orientation(self.array, transform)
        affine = self.geometry.affine() @ nio.inv_ornt_aff(transform, self.array.shape)
        return Volume(array, Geometry.from_affine(affine, array.shape))


def _fmt(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _triple(values: object) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)  # type: ignore[attr-defined]
    return (a, b, c)


def _triple_int(values: object) -> tuple[int, int, int]:
    a, b, c = (int(v) for v in values)  # type: ignore[attr-defined]
    return (a, b, c)
