"""The preview overlay: the mask SAM proposes, shown before the user applies it.

It lives in its own hidden segmentation node so that showing, moving and discarding a proposal
never touches the user's segments or their undo history. The preview's colour follows the target
segment so the user sees what Apply will add.
"""

from __future__ import annotations

import numpy as np

from .segment_io import oriented_labelmap, remove_with_display, slice_slab

PREVIEW_NODE_NAME = "SAMSegment preview"
UNCERTAINTY_SEGMENT = "uncertain"


class PreviewOverlay:
    def __init__(self, scene, volume_node, opacity: float = 0.6) -> None:
        self.scene = scene
        self.volume_node = volume_node
        self.opacity = opacity
        self.node = None
        self.segment_id = ""
        self.slice: tuple[int, int] | None = None  # (axis, index) currently shown

    def _ensure(self) -> None:
        if self.node is not None and self.node.GetScene() is self.scene:
            return
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", PREVIEW_NODE_NAME)
        node.SetHideFromEditors(True)
        node.SetSaveWithScene(False)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(self.volume_node)
        display = node.GetDisplayNode()
        if display is not None:
            display.SetOpacity2DFill(self.opacity)
            display.SetOpacity2DOutline(1.0)
            display.SetVisibility3D(False)
        self.segment_id = node.GetSegmentation().AddEmptySegment("SAM preview", "SAM preview")
        self.node = node

    def set_color(self, rgb: tuple[float, float, float]) -> None:
        self._ensure()
        self.node.GetSegmentation().GetSegment(self.segment_id).SetColor(*rgb)

    def show(self, axis: int, index: int, mask2d: np.ndarray) -> None:
        """Show ``mask2d`` on slice ``index`` of ``axis``; any earlier proposal disappears."""
        import slicer

        self._ensure()
        slab, offset = slice_slab(mask2d, axis, index)
        labelmap = oriented_labelmap(self.volume_node, self.node, slab, offset)
        # Replace the whole segment: a proposal on a new slice replaces the old one.
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, self.node, self.segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
        self.slice = (axis, index)

    def show_uncertainty(self, axis: int, index: int, uncertain2d: np.ndarray, visible: bool = True) -> None:
        """An outline-only segment over pixels where jittered prompts disagree (toggle with ``visible``)."""
        import slicer

        self._ensure()
        segmentation = self.node.GetSegmentation()
        if segmentation.GetSegment(UNCERTAINTY_SEGMENT) is None:
            segmentation.AddEmptySegment(UNCERTAINTY_SEGMENT, "uncertain", (1.0, 0.9, 0.0))
        slab, offset = slice_slab(uncertain2d, axis, index)
        labelmap = oriented_labelmap(self.volume_node, self.node, slab, offset)
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, self.node, UNCERTAINTY_SEGMENT, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
        self.set_uncertainty_visible(visible)

    def set_uncertainty_visible(self, visible: bool) -> None:
        if self.node is None:
            return
        display = self.node.GetDisplayNode()
        if display is not None and self.node.GetSegmentation().GetSegment(UNCERTAINTY_SEGMENT) is not None:
            display.SetSegmentVisibility(UNCERTAINTY_SEGMENT, bool(visible))

    def clear(self) -> None:
        if self.node is not None and self.node.GetScene() is self.scene:
            segmentation = self.node.GetSegmentation()
            for sid in (self.segment_id, UNCERTAINTY_SEGMENT):
                segment = segmentation.GetSegment(sid)
                if segment is not None:
                    segmentation.RemoveSegment(sid)
            self.segment_id = segmentation.AddEmptySegment("SAM preview", "SAM preview")
        self.slice = None

    def remove(self) -> None:
        if self.node is not None and self.node.GetScene() is self.scene:
            remove_with_display(self.scene, self.node)
        self.node = None
        self.slice = None
