"""A 3D box prompt: an axis-aligned box of voxels (Slicer's ROI, ``--box3d``).

Propagation takes it as ``propagate(..., bounds=Box3D(...))``: its in-plane box prompts the seed
slice (the middle of its slice range unless a box or an accepted mask is given), every
propagated slice's box is kept inside it (widened by the model's box margin, as a user's box
is), no mask pixel lies outside it and no slice outside its range is written.

Indices are voxel indices in the volume array's order (K, J, I), inclusive at both ends, as
``mask_bbox`` gives them: ``Box3D(lo=(k0, j0, i0), hi=(k1, j1, i1))``. ``from_ijk`` takes ITK
order (I, J, K), as the command line does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import PromptError
from .volume import slice_shape


def _in_plane(axis: int) -> tuple[int, int]:
    """(row axis, column axis) of a slice along ``axis``: slice pixels are x = column, y = row."""
    rows, cols = [a for a in (0, 1, 2) if a != axis]
    return rows, cols


@dataclass(frozen=True)
class Box3D:
    """An axis-aligned box of voxels, inclusive, in array order (K, J, I)."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]

    def __post_init__(self) -> None:
        lo, hi = tuple(self.lo), tuple(self.hi)
        ok = len(lo) == 3 and len(hi) == 3 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in lo + hi)
        if not ok:
            raise PromptError(f"A 3D box needs two corners of 3 integer voxel indices, got {self.lo!r} and {self.hi!r}",
                              "give (k0, j0, i0) and (k1, j1, i1), e.g. Box3D((10, 20, 30), (20, 60, 70))")
        if any(a > b for a, b in zip(lo, hi)):
            raise PromptError(f"3D box {list(lo)}..{list(hi)} is empty: a first index is after the last",
                              "give the lower corner first on every axis")
        object.__setattr__(self, "lo", tuple(int(v) for v in lo))
        object.__setattr__(self, "hi", tuple(int(v) for v in hi))

    @classmethod
    def from_ijk(cls, i0: int, j0: int, k0: int, i1: int, j1: int, k1: int) -> "Box3D":
        """The box of two corners in ITK voxel order (I, J, K), in either order per axis."""
        a, b = (k0, j0, i0), (k1, j1, i1)
        return cls(tuple(min(x, y) for x, y in zip(a, b)), tuple(max(x, y) for x, y in zip(a, b)))

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> "Box3D":
        """The bounding box of a non-empty 3D mask."""
        nz = np.nonzero(mask)
        if not nz[0].size:
            raise PromptError("The mask is empty: it has no bounding box", "give a mask with at least one voxel")
        return cls(tuple(int(a.min()) for a in nz), tuple(int(a.max()) for a in nz))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Box3D":
        """The box of ``to_json``'s dict ({"lo": [k, j, i], "hi": [k, j, i]})."""
        try:
            return cls(tuple(int(v) for v in data["lo"]), tuple(int(v) for v in data["hi"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PromptError(f"Cannot read a 3D box from {data!r}",
                              'give {"lo": [k0, j0, i0], "hi": [k1, j1, i1]} (voxel indices, inclusive)') from exc

    def to_json(self) -> dict[str, list[int]]:
        return {"lo": list(self.lo), "hi": list(self.hi)}

    def slice_range(self, axis: int) -> tuple[int, int]:
        """(first, last) slice index along ``axis``, inclusive."""
        return self.lo[axis], self.hi[axis]

    def middle(self, axis: int) -> int:
        """The middle slice along ``axis`` (the lower of two)."""
        return (self.lo[axis] + self.hi[axis]) // 2

    def plane_box(self, axis: int) -> np.ndarray:
        """The in-plane box (x0, y0, x1, y1) in the slice pixels of an ``axis`` slice, float64."""
        rows, cols = _in_plane(axis)
        return np.array([self.lo[cols], self.lo[rows], self.hi[cols], self.hi[rows]], dtype=np.float64)

    def plane_mask(self, shape: tuple[int, int, int], axis: int) -> np.ndarray:
        """Bool (H, W) of an ``axis`` slice of a ``shape`` volume: True inside the in-plane box."""
        rows, cols = _in_plane(axis)
        out = np.zeros(slice_shape(shape, axis), dtype=bool)
        out[self.lo[rows]:self.hi[rows] + 1, self.lo[cols]:self.hi[cols] + 1] = True
        return out

    def mask(self, shape: Sequence[int]) -> np.ndarray:
        """Bool volume of ``shape``: True inside the box."""
        out = np.zeros(tuple(shape), dtype=bool)
        out[tuple(slice(a, b + 1) for a, b in zip(self.lo, self.hi))] = True
        return out

    def check(self, shape: Sequence[int]) -> None:
        """Refuse a box that does not lie inside a volume of ``shape`` (K, J, I).

        Raises:
            PromptError: a corner outside the volume, with the axis named.
        """
        for axis, (a, b, n) in enumerate(zip(self.lo, self.hi, shape)):
            if a < 0 or b > n - 1:
                raise PromptError(f"3D box {list(self.lo)}..{list(self.hi)} reaches outside the volume along axis "
                                  f"{'kji'[axis]} (0..{n - 1})", "give voxel indices inside the volume")
