"""RAS <-> IJK <-> slice pixels, and which volume slice a slice view shows.

Nothing here assumes that a volume is axis-aligned or that "axial" means array axis 0: an MR
acquired obliquely, or a CT whose direction matrix flips an axis, must still put the click on the
voxel under the mouse. All mappings go through the volume's IJK->RAS matrix (and a linear parent
transform when there is one) and the slice node's SliceToRAS / XYToRAS.

Conventions (see SAMSegmentLib.volume): the engine's array is ``arrayFromVolume`` order
``[K, J, I]``; array axis 0 is IJK axis K (component 2 of an ``(i, j, k)`` point), array axis 2 is
IJK axis I. On the slice of array axis ``a`` the pixel ``(x, y)`` is (column, row) of
``np.take(volume, index, a)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from SAMSegmentLib.errors import SAMSegmentError
from SAMSegmentLib.volume import SliceRef

# A view plane tilted less than this from a volume axis is treated as showing that axis' slices
# exactly; above it the user is told that prompts are projected onto the nearest volume slice.
OBLIQUE_TOLERANCE_DEG = 1.0


def vtk_to_numpy_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpy_to_vtk_matrix(array: np.ndarray):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def node_to_world(node) -> np.ndarray:
    """4x4 from a transformable node's local coordinates to world RAS (identity if untransformed).

    A non-linear parent transform has no 4x4; it gets an error rather than a silently wrong click.
    """
    import slicer

    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise SAMSegmentError(f"'{node.GetName()}' is under a non-linear transform ('{parent.GetName()}')",
                              "harden the transform on the volume (Transforms module > Harden) before segmenting")
    import vtk

    m = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(parent, None, m)
    return vtk_to_numpy_matrix(m)


def ijk_to_ras_matrix(volume_node) -> np.ndarray:
    """Voxel (i, j, k, 1) -> world RAS, including the volume's linear parent transform."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return node_to_world(volume_node) @ vtk_to_numpy_matrix(m)


def ras_to_ijk(volume_node, ras: np.ndarray) -> np.ndarray:
    """World RAS points (N, 3) -> continuous voxel coordinates (N, 3) as (i, j, k)."""
    pts = np.atleast_2d(np.asarray(ras, dtype=np.float64))
    inv = np.linalg.inv(ijk_to_ras_matrix(volume_node))
    homo = np.c_[pts, np.ones(len(pts))]
    return (homo @ inv.T)[:, :3]


def ijk_to_ras(volume_node, ijk: np.ndarray) -> np.ndarray:
    pts = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    homo = np.c_[pts, np.ones(len(pts))]
    return (homo @ ijk_to_ras_matrix(volume_node).T)[:, :3]


def ijk_component(axis: int) -> int:
    """Which component of an (i, j, k) point runs along array axis ``axis``."""
    return 2 - axis


def ijk_to_slice_xy(ijk: np.ndarray, axis: int) -> np.ndarray:
    """(N, 3) voxel (i, j, k) -> (N, 2) pixel (x, y) on the slices of array ``axis``."""
    pts = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    # array order (k, j, i); remove `axis`; the remaining two are (row, column) = (y, x)
    kji = pts[:, ::-1]
    rest = [a for a in range(3) if a != axis]
    return np.c_[kji[:, rest[1]], kji[:, rest[0]]]


def slice_xy_to_ijk(xy: np.ndarray, axis: int, index: float) -> np.ndarray:
    pts = np.atleast_2d(np.asarray(xy, dtype=np.float64))
    rest = [a for a in range(3) if a != axis]
    kji = np.zeros((len(pts), 3))
    kji[:, axis] = index
    kji[:, rest[0]] = pts[:, 1]
    kji[:, rest[1]] = pts[:, 0]
    return kji[:, ::-1]


@dataclass(frozen=True)
class ViewSlice:
    """The volume slice a slice view shows: array axis, index, and how far off-axis the view is."""

    axis: int
    index: int
    oblique_deg: float
    inside: bool  # False when the view plane lies outside the volume along that axis

    @property
    def ref(self) -> SliceRef:
        return SliceRef(self.axis, self.index)

    @property
    def is_oblique(self) -> bool:
        return self.oblique_deg > OBLIQUE_TOLERANCE_DEG


def view_slice(volume_node, slice_to_ras: np.ndarray, shape_kji: tuple[int, int, int]) -> ViewSlice:
    """Pick the volume slice that a view with ``slice_to_ras`` (4x4) shows.

    The array axis is the IJK axis most parallel to the view normal, so a "sagittal" view of a
    volume acquired sagittally picks array axis 0, as it should. The index is where the plane's
    centre falls along that axis.
    """
    s2r = np.asarray(slice_to_ras, dtype=np.float64)
    normal = s2r[:3, 2] / np.linalg.norm(s2r[:3, 2])
    m = ijk_to_ras_matrix(volume_node)
    best, best_cos = 0, -1.0
    for comp in range(3):
        direction = m[:3, comp] / np.linalg.norm(m[:3, comp])
        c = abs(float(direction @ normal))
        if c > best_cos:
            best, best_cos = comp, c
    axis = 2 - best
    ijk = ras_to_ijk(volume_node, s2r[:3, 3])[0]
    pos = ijk[best]
    index = int(np.floor(pos + 0.5))
    inside = 0 <= index < shape_kji[axis]
    angle = float(np.degrees(np.arccos(min(1.0, best_cos))))
    return ViewSlice(axis, int(np.clip(index, 0, shape_kji[axis] - 1)), angle, inside)


def points_on_slice(volume_node, ras: np.ndarray, axis: int, index: int,
                    tolerance: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Slice pixels of those RAS points within ``tolerance`` voxels of slice ``index``.

    Returns (xy (M, 2), selected row indices). Points on other slices prompt those slices, not this
    one; a point a hair off the plane (rounding in the view) still counts.
    """
    if len(ras) == 0:
        return np.zeros((0, 2)), np.zeros((0,), dtype=int)
    ijk = ras_to_ijk(volume_node, ras)
    along = ijk[:, ijk_component(axis)]
    keep = np.nonzero(np.abs(along - index) <= tolerance + 1e-6)[0]
    return ijk_to_slice_xy(ijk[keep], axis), keep


def box_on_slice(volume_node, corners_ras: np.ndarray, axis: int, index: int) -> np.ndarray | None:
    """The slice-pixel box (x0, y0, x1, y1) that encloses a 3D box's corners, if it meets the slice.

    The ROI may be rotated relative to the volume; the enclosing box of its projected corners is
    what a user drew. ``None`` when the ROI does not reach the slice.
    """
    ijk = ras_to_ijk(volume_node, corners_ras)
    along = ijk[:, ijk_component(axis)]
    if index < along.min() - 0.5 or index > along.max() + 0.5:
        return None
    xy = ijk_to_slice_xy(ijk, axis)
    return np.array([xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()])


def voxel_box(volume_node, corners_ras: np.ndarray, shape_kji: tuple[int, int, int]) -> dict[str, list[int]] | None:
    """The voxels a 3D box (its world corners, e.g. a markups ROI's, rotated or not) encloses, as the
    engine's 3D box prompt ``{"lo": [k, j, i], "hi": [k, j, i]}`` (inclusive, clipped to the volume);
    None when it misses the volume."""
    ijk = ras_to_ijk(volume_node, corners_ras)
    lo = np.ceil(ijk.min(axis=0) - 0.5).astype(int)[::-1]   # voxel centres inside the box, (k, j, i)
    hi = np.floor(ijk.max(axis=0) + 0.5).astype(int)[::-1]
    lo, hi = np.maximum(lo, 0), np.minimum(hi, np.asarray(shape_kji) - 1)
    if np.any(lo > hi):
        return None
    return {"lo": [int(v) for v in lo], "hi": [int(v) for v in hi]}


def roi_corners_ras(roi_node) -> np.ndarray:
    """The 8 world corners of a markups ROI (rotated or transformed ROIs included)."""
    radius = [0.0, 0.0, 0.0]
    roi_node.GetRadiusXYZ(radius)
    # ObjectToWorld carries the ROI's centre, orientation and any parent transform.
    m = vtk_to_numpy_matrix(roi_node.GetObjectToWorldMatrix())
    signs = np.array([[sx, sy, sz, 1.0] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    local = signs * np.array([radius[0], radius[1], radius[2], 1.0])
    return (local @ m.T)[:, :3]


def xy_to_ras(slice_node, xy: tuple[float, float]) -> np.ndarray:
    """A slice view's display pixel (x, y) -> world RAS, through the node's XYToRAS."""
    m = vtk_to_numpy_matrix(slice_node.GetXYToRAS())
    return (m @ np.array([xy[0], xy[1], 0.0, 1.0]))[:3]
