"""Volumes in voxel order and the slices the engine works on.

The engine sees a volume exactly as Slicer's ``arrayFromVolume`` returns it: a 3D array indexed
``[K, J, I]``. A slice is named by ``SliceRef(axis, index)`` where ``axis`` is 0, 1 or 2 of that
array. The 2D slice is ``np.take(volume, index, axis)``: its rows run along the first remaining
array axis and its columns along the second. Prompts use SAM's convention on that 2D image:
points are ``(x, y) = (column, row)`` and boxes ``(x0, y0, x1, y1)`` in pixel units.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import VolumeError

# Below this many voxels along an axis SAM has nothing to segment.
MIN_SLICE_SIDE = 2


@dataclass(frozen=True, order=True)
class SliceRef:
    """One 2D slice of a (K, J, I) volume: ``np.take(volume, index, axis)``."""

    axis: int
    index: int

    def __post_init__(self) -> None:
        if self.axis not in (0, 1, 2):
            raise VolumeError(f"Slice axis must be 0, 1 or 2, got {self.axis}",
                              "use 0 for K (usually axial), 1 for J, 2 for I")


def validate_volume(volume: np.ndarray, name: str = "volume") -> np.ndarray:
    """Check that ``volume`` is a finite 3D scalar array and return it as a numpy array.

    Raising here, before any model work, turns confusing tensor shape errors deep inside torch
    into a message that names the actual problem.

    Args:
        volume: the array (anything ``np.asarray`` accepts).
        name: what to call it in error messages.

    Returns:
        ``np.asarray(volume)`` (not copied).

    Raises:
        VolumeError: not numeric, complex, not 3D, empty, or with NaN/infinite voxels.
    """
    arr = np.asarray(volume)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise VolumeError(f"The {name} has a non-numeric data type ({arr.dtype})",
                          "load a scalar image (CT, MR, ...) rather than a label table or text")
    if np.iscomplexobj(arr):
        raise VolumeError(f"The {name} is complex-valued", "convert it to magnitude first")
    if arr.ndim == 4 and 1 in (arr.shape[0], arr.shape[-1]) and arr.size:
        raise VolumeError(f"The {name} is 4D with shape {arr.shape} (a single-frame or single-"
                          "component series)", "squeeze the singleton dimension to get a 3D volume")
    if arr.ndim != 3:
        kind = {2: "a 2D image", 4: "a 4D series (time or vector components)"}.get(arr.ndim, f"{arr.ndim}D")
        raise VolumeError(f"The {name} is {kind} with shape {arr.shape}; SAMSegment needs one 3D scalar volume",
                          "pick a single 3D frame/component, or stack 2D images into a volume with one slice")
    if arr.size == 0:
        raise VolumeError(f"The {name} is empty (shape {arr.shape})", "load a volume with voxels in it")
    small = [s for s in arr.shape if s < 1]
    if small:
        raise VolumeError(f"The {name} has an empty dimension: shape {arr.shape}", "load a complete volume")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            bad = int(arr.size - np.count_nonzero(finite))
            raise VolumeError(f"The {name} has {bad} NaN or infinite voxel(s)",
                              "replace them (e.g. with the minimum intensity) before segmenting")
    return arr


def constant_slice_error(ref: SliceRef, image: np.ndarray) -> VolumeError:
    """The error for a prompt on a slice that is one value after windowing.

    Args:
        ref: the slice.
        image: its windowed image (every pixel equal).

    Returns:
        The ``VolumeError`` to raise.
    """
    value = int(np.asarray(image).flat[0])
    return VolumeError(f"Slice {ref.index} along axis {ref.axis} is constant after windowing (all {value}); "
                       "there is nothing to segment on it", "choose another slice or widen the intensity window")


def check_slice_ref(shape: tuple[int, ...], ref: SliceRef) -> None:
    """Raise a clear error if ``ref`` does not name a usable slice of a volume of ``shape``.

    Args:
        shape: the (K, J, I) shape of the volume.
        ref: the slice.

    Raises:
        VolumeError: the index is outside the volume, or the slices along that axis are thinner
            than ``MIN_SLICE_SIDE`` pixels.
    """
    if not 0 <= ref.index < shape[ref.axis]:
        raise VolumeError(f"Slice {ref.index} along axis {ref.axis} is outside the volume "
                          f"(valid 0..{shape[ref.axis] - 1})", "choose a slice inside the volume")
    plane = slice_shape(shape, ref.axis)
    if min(plane) < MIN_SLICE_SIDE:
        raise VolumeError(f"Slices along axis {ref.axis} are {plane[0]}x{plane[1]} pixels, too thin to segment",
                          "segment along another axis")


def slice_shape(shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    """The (rows, columns) of a slice along ``axis`` of a volume of ``shape``.

    Args:
        shape: the (K, J, I) shape of the volume.
        axis: 0, 1 or 2.

    Returns:
        The two remaining sizes, in array order.
    """
    rest = [s for a, s in enumerate(shape) if a != axis]
    return int(rest[0]), int(rest[1])


def get_slice(volume: np.ndarray, ref: SliceRef) -> np.ndarray:
    """The 2D image of ``ref``.

    Args:
        volume: a (K, J, I) array.
        ref: the slice (refused with ``VolumeError`` if it is not a usable slice of ``volume``).

    Returns:
        ``np.take(volume, ref.index, ref.axis)``: a new (H, W) array.
    """
    check_slice_ref(volume.shape, ref)
    return np.take(volume, ref.index, axis=ref.axis)


def set_slice(volume: np.ndarray, ref: SliceRef, plane: np.ndarray) -> None:
    """Write ``plane`` into ``volume`` at ``ref`` in place.

    Args:
        volume: a writable (K, J, I) array.
        ref: the slice (refused with ``VolumeError`` if it is not a usable slice of ``volume``).
        plane: the (H, W) values (anything numpy broadcasts to the slice).
    """
    check_slice_ref(volume.shape, ref)
    index: list[object] = [slice(None)] * 3
    index[ref.axis] = ref.index
    volume[tuple(index)] = plane


def volume_signature(volume: np.ndarray) -> str:
    """A content hash identifying a volume, for cache keys and on-disk cache files.

    Hashing all voxels costs ~0.1 s for a 512x512x400 int16 volume, small next to one encoder
    call, and unlike hashing a strided sample it cannot confuse two edited copies.

    Args:
        volume: the array; its dtype and shape are part of the hash.

    Returns:
        A 32-character hex BLAKE2b digest.
    """
    arr = np.ascontiguousarray(volume)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(arr.dtype.str).encode())
    digest.update(str(arr.shape).encode())
    digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


def _grid_corners(geometry) -> np.ndarray:
    """(8, 3) LPS centres of the corner voxels of a grid (spacing, origin, direction rows, ITK size)."""
    size = np.asarray(geometry.size, dtype=np.float64) - 1.0
    corners = np.array([[i, j, k] for i in (0.0, size[0]) for j in (0.0, size[1]) for k in (0.0, size[2])])
    matrix = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3) @ np.diag(geometry.spacing)
    return np.asarray(geometry.origin, dtype=np.float64) + corners @ matrix.T


def mask_on_grid(mask: np.ndarray, mask_geometry, geometry, what: str = "The mask",
                 tolerance: float = 0.01) -> tuple[np.ndarray, str]:
    """``mask`` on the voxel grid of an image: as it is when the grids agree, else resampled.

    The grids agree when they have the same size and every corner voxel's centre lies within
    ``tolerance`` of the smallest voxel side of its counterpart (that covers spacing, origin and
    direction at once). Otherwise the mask is resampled onto the image's grid by nearest neighbour
    (SimpleITK), which is exact for a mask stored in another orientation of the same grid (e.g.
    saved as LPS- or RAS-canonical NIfTI by another tool), and the note says what differed.

    Args:
        mask: the mask's (K, J, I) array (any integer or bool type; nonzero is inside).
        mask_geometry: its grid: ``spacing``, ``origin``, ``direction`` (3x3 rows) and ``size`` in
            ITK (i, j, k) order, as ``io.ImageGeometry`` has them.
        geometry: the image's grid, likewise.
        what: how to name the mask in the note and errors (e.g. "--anchor-mask").
        tolerance: the largest corner offset, as a fraction of the smallest voxel side.

    Returns:
        (mask on the image grid, (K, J, I) with the image's shape; a note for the user, "" when
        the grids agree and the mask is returned unchanged).

    Raises:
        VolumeError: the mask and the image do not overlap at all (nothing of it lands on the image).
    """
    mask = np.asarray(mask)
    same_size = tuple(mask_geometry.size) == tuple(geometry.size)
    limit = tolerance * float(min(min(geometry.spacing), min(mask_geometry.spacing)))
    if same_size and float(np.abs(_grid_corners(mask_geometry) - _grid_corners(geometry)).max()) <= limit:
        return mask, ""
    import SimpleITK as sitk

    mine, theirs = _grid_corners(mask_geometry), _grid_corners(geometry)
    same_voxels = bool(np.prod(mask_geometry.size) == np.prod(geometry.size)
                       and np.abs(mine[:, None, :] - theirs[None, :, :]).max(axis=2).min(axis=1).max() <= limit
                       and np.allclose(sorted(mask_geometry.spacing), sorted(geometry.spacing), rtol=1e-4, atol=1e-6))
    differences = []
    if same_voxels:
        differences.append("the same voxels, stored in another axis order or direction")
    elif not np.allclose(np.asarray(mask_geometry.direction, dtype=np.float64).reshape(3, 3),
                       np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3), atol=1e-4):
        differences.append("axis directions")
    if not same_voxels and not np.allclose(mask_geometry.spacing, geometry.spacing, rtol=1e-4, atol=1e-6):
        differences.append(f"spacing {', '.join(f'{v:g}' for v in mask_geometry.spacing)} mm against "
                           f"{', '.join(f'{v:g}' for v in geometry.spacing)} mm")
    if not same_size and not same_voxels:
        differences.append(f"size {tuple(mask_geometry.size)} against {tuple(geometry.size)}")
    if not differences or (not same_voxels and not np.allclose(mask_geometry.origin, geometry.origin, atol=limit)):
        shift = float(np.linalg.norm(np.subtract(mask_geometry.origin, geometry.origin)))
        differences.append(f"origin {shift:.3g} mm apart")
    source = sitk.GetImageFromArray(mask.astype(np.uint8) if mask.dtype == bool else mask)
    reference = sitk.Image([int(v) for v in geometry.size], source.GetPixelID())
    for image, grid in ((source, mask_geometry), (reference, geometry)):
        image.SetSpacing([float(v) for v in grid.spacing])
        image.SetOrigin([float(v) for v in grid.origin])
        image.SetDirection([float(v) for v in np.asarray(grid.direction, dtype=np.float64).reshape(-1)])
    resampled = sitk.GetArrayFromImage(sitk.Resample(source, reference, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                     0, source.GetPixelID()))
    voxel = float(np.prod(mask_geometry.spacing))
    before = np.count_nonzero(mask) * voxel
    after = np.count_nonzero(resampled) * float(np.prod(geometry.spacing))
    if before and not after:
        raise VolumeError(f"{what} does not overlap the image: it lies on another voxel grid "
                          f"({'; '.join(differences)}) and none of it falls inside the image",
                          "give a mask of this image (same spacing, origin and direction), e.g. one saved from it")
    note = (f"{what} lies on another voxel grid than the image ({'; '.join(differences)}); it was resampled onto "
            "the image grid (nearest neighbour)")
    if before and abs(after - before) > 0.1 * before:
        note += f"; its volume changed from {before / 1000:.3g} to {after / 1000:.3g} ml"
    return resampled.astype(mask.dtype, copy=False), note
