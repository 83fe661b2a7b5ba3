"""Prompts held in Markups nodes: include points, exclude points and an ROI for the box.

Markups are what Slicer users already know for placing and dragging points in any view, they are
saved with the scene and they are undoable by themselves. This class turns them into engine
prompts for one volume slice and tells a listener whenever any of them changes, so that placing
or dragging a point re-runs the decoder.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import vtk

from SAMSegmentLib.prompts import EXCLUDE, INCLUDE, Prompts

from .geometry import box_on_slice, points_on_slice, roi_corners_ras, voxel_box

INCLUDE_NAME = "SAM include"
EXCLUDE_NAME = "SAM exclude"
BOX_NAME = "SAM box"

# Events after which the prompt set may differ. PointModifiedEvent also fires while dragging, which
# is what makes the mask follow the mouse.
_POINT_EVENTS = ("PointAddedEvent", "PointModifiedEvent", "PointRemovedEvent")


def control_points_world(node) -> np.ndarray:
    """Defined control points of a markups node in world RAS, shape (N, 3)."""
    pts = []
    for n in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(n) != node.PositionDefined:
            continue
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(n, p)
        pts.append(p)
    return np.asarray(pts, dtype=np.float64).reshape(-1, 3)


class MarkupsPrompts:
    """Include/exclude point lists and a box ROI, observed; created on demand with clear colours."""

    def __init__(self, scene, include_node=None, exclude_node=None, roi_node=None) -> None:
        self.scene = scene
        self.include_node = include_node
        self.exclude_node = exclude_node
        self.roi_node = roi_node
        self._observations: list[tuple[object, int]] = []
        self._listener: Callable[[], None] | None = None
        self.blocked = False
        self.last_changed_ras: np.ndarray | None = None

    # ---------------------------------------------------------------- nodes
    def ensure_nodes(self) -> None:
        """Create the three markups nodes if missing (green include, red exclude, yellow box)."""
        if self.include_node is None:
            self.include_node = self._new_points(INCLUDE_NAME, (0.2, 0.9, 0.2))
        if self.exclude_node is None:
            self.exclude_node = self._new_points(EXCLUDE_NAME, (0.95, 0.2, 0.2))
        if self.roi_node is None:
            roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", BOX_NAME)
            roi.CreateDefaultDisplayNodes()
            if roi.GetDisplayNode() is not None:
                roi.GetDisplayNode().SetSelectedColor(0.95, 0.85, 0.1)
                roi.GetDisplayNode().SetFillVisibility(False)
            self.roi_node = roi
        if self._listener is not None:
            self.observe(self._listener)

    def _new_points(self, name: str, color: tuple[float, float, float]):
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*color)
            display.SetColor(*color)
            display.SetPointLabelsVisibility(False)
        return node

    def set_nodes(self, include_node=None, exclude_node=None, roi_node=None) -> None:
        listener = self._listener
        self.unobserve()
        self.include_node, self.exclude_node, self.roi_node = include_node, exclude_node, roi_node
        if listener is not None:
            self.observe(listener)

    # ---------------------------------------------------------------- observation
    def observe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after any point is added, moved or removed, or the ROI changes."""
        self.unobserve()
        self._listener = listener
        for node in (self.include_node, self.exclude_node):
            if node is None:
                continue
            for event in _POINT_EVENTS:
                tag = node.AddObserver(getattr(node, event), self._on_point_event)
                self._observations.append((node, tag))
        if self.roi_node is not None:
            for event in ("PointModifiedEvent", "ModifiedEvent"):
                tag = self.roi_node.AddObserver(getattr(self.roi_node, event, event), self._on_event)
                self._observations.append((self.roi_node, tag))

    def unobserve(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations.clear()

    @vtk.calldata_type(vtk.VTK_INT)
    def _on_point_event(self, caller, event, index=None) -> None:
        # Remember where the user just put or dragged a point: that tells which view they work in.
        if index is not None and 0 <= index < caller.GetNumberOfControlPoints():
            p = [0.0, 0.0, 0.0]
            caller.GetNthControlPointPositionWorld(int(index), p)
            self.last_changed_ras = np.array(p)
        self._on_event(caller, event)

    def _on_event(self, caller, event) -> None:
        if caller is not None and caller is self.roi_node and self.roi_defined():
            c = [0.0, 0.0, 0.0]
            self.roi_node.GetCenterWorld(c)
            self.last_changed_ras = np.array(c)
        if self._listener is not None and not self.blocked:
            self._listener()

    # ---------------------------------------------------------------- prompts
    def roi_defined(self) -> bool:
        roi = self.roi_node
        if roi is None or roi.GetNumberOfControlPoints() == 0:
            return False
        radius = [0.0, 0.0, 0.0]
        roi.GetRadiusXYZ(radius)
        return roi.GetNthControlPointPositionStatus(0) == roi.PositionDefined and sum(r > 0 for r in radius) >= 2

    def box3d(self, volume_node, shape_kji: tuple[int, int, int]) -> dict[str, list[int]] | None:
        """The ROI as the engine's 3D box prompt (voxels of the volume it encloses), or None."""
        if not self.roi_defined():
            return None
        return voxel_box(volume_node, roi_corners_ras(self.roi_node), shape_kji)

    def prompts_for(self, volume_node, axis: int, index: int) -> Prompts:
        """Engine prompts for slice ``index`` of array ``axis``: the points on it and the ROI's box."""
        xy_parts, label_parts = [], []
        for node, label in ((self.include_node, INCLUDE), (self.exclude_node, EXCLUDE)):
            if node is None:
                continue
            xy, _ = points_on_slice(volume_node, control_points_world(node), axis, index)
            xy_parts.append(xy)
            label_parts.append(np.full(len(xy), label, dtype=np.int64))
        points = np.vstack(xy_parts) if xy_parts else np.zeros((0, 2))
        labels = np.concatenate(label_parts) if label_parts else np.zeros((0,), dtype=np.int64)
        box = None
        if self.roi_defined():
            box = box_on_slice(volume_node, roi_corners_ras(self.roi_node), axis, index)
        return Prompts(points, labels, box)

    def clear(self) -> None:
        """Remove every prompt (one listener call, not one per point)."""
        self.blocked = True
        try:
            for node in (self.include_node, self.exclude_node):
                if node is not None:
                    node.RemoveAllControlPoints()
            if self.roi_node is not None:
                self.roi_node.RemoveAllControlPoints()
        finally:
            self.blocked = False
        if self._listener is not None:
            self._listener()

    def add_point(self, ras: np.ndarray, include: bool) -> int:
        self.ensure_nodes()
        node = self.include_node if include else self.exclude_node
        return node.AddControlPointWorld(float(ras[0]), float(ras[1]), float(ras[2]))

    def set_box(self, corner_a_ras: np.ndarray, corner_b_ras: np.ndarray, plane_to_ras: np.ndarray | None = None,
                thickness_mm: float = 1.0) -> None:
        """A box drawn in a view from corner a to corner b, as an ROI aligned with that view's plane.

        ``plane_to_ras`` is the view's SliceToRAS (4x4); its rotation orients the ROI so that a box
        dragged in a rotated or oblique view stays the rectangle the user saw.
        """
        self.ensure_nodes()
        a, b = np.asarray(corner_a_ras, float), np.asarray(corner_b_ras, float)
        rot = np.eye(3) if plane_to_ras is None else np.asarray(plane_to_ras, float)[:3, :3]
        rot = rot / np.linalg.norm(rot, axis=0)
        center = (a + b) / 2
        extent_local = np.abs(rot.T @ (b - a))
        size = np.maximum(extent_local, thickness_mm)
        import vtk

        m = vtk.vtkMatrix4x4()
        for r in range(3):
            for c in range(3):
                m.SetElement(r, c, float(rot[r, c]))
        self.blocked = True
        try:
            self.roi_node.RemoveAllControlPoints()
            self.roi_node.SetAndObserveObjectToNodeMatrix(m)
            self.roi_node.SetCenterWorld(float(center[0]), float(center[1]), float(center[2]))
            self.roi_node.SetSize(float(size[0]), float(size[1]), float(size[2]))
        finally:
            self.blocked = False
        self._on_event(self.roi_node, None)
