"""Writing SAM masks into segments the way the Segment Editor does, and reading segments back.

Every write goes through Slicer's ``vtkSlicerSegmentEditorLogic`` (the MRML-level half of the
Segment Editor): it applies the editor node's masking ("editable area", intensity range) and
overlap ("modify other segments") settings and keeps the undo history, so a SAM edit behaves like
a Paint or Threshold edit. The source volume is only read.

A slice is written as a one-voxel-thick labelmap in the volume's IJK geometry with the modification
limited to that slice's extent, so "replace" replaces exactly that slice of the segment and leaves
the others untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from SAMSegmentLib.errors import SAMSegmentError

from .geometry import ijk_to_ras_matrix, node_to_world, numpy_to_vtk_matrix

MODES = ("replace", "add", "remove")


def segment_editor_logic(scene, app_logic=None):
    """A Segment Editor logic bound to ``scene`` (the same class the Segment Editor widget uses)."""
    import slicer

    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    if app_logic is not None:
        logic.SetMRMLApplicationLogic(app_logic)
    return logic


def oriented_labelmap(volume_node, segmentation_node, mask_kji: np.ndarray, offset_kji: tuple[int, int, int]):
    """A vtkOrientedImageData holding ``mask_kji`` placed at voxel ``offset_kji`` of the volume.

    Its image-to-world matrix maps into the segmentation node's own coordinate frame, so a volume
    and segmentation under different linear transforms still line up.
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    mask = np.ascontiguousarray(np.asarray(mask_kji, dtype=np.uint8))
    if mask.ndim != 3:
        raise SAMSegmentError(f"Labelmap must be 3D (K, J, I), got shape {mask.shape}", "pass a slab of the volume")
    k0, j0, i0 = (int(v) for v in offset_kji)
    nk, nj, ni = mask.shape
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i0 + ni - 1, j0, j0 + nj - 1, k0, k0 + nk - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.reshape(-1)
    seg_to_world = node_to_world(segmentation_node)
    ijk_to_seg = np.linalg.inv(seg_to_world) @ ijk_to_ras_matrix(volume_node)
    image.SetImageToWorldMatrix(numpy_to_vtk_matrix(ijk_to_seg))
    image.Modified()
    return image


def slice_slab(mask2d: np.ndarray, axis: int, index: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A 2D slice mask as a one-voxel-thick (K, J, I) slab and its voxel offset."""
    slab = np.expand_dims(np.asarray(mask2d, dtype=np.uint8), axis)
    offset = [0, 0, 0]
    offset[axis] = int(index)
    return slab, (offset[0], offset[1], offset[2])


class EditSink:
    """Where edits go: Slicer's Segment Editor logic here, or the active effect inside the editor.

    Inside the Segment Editor, writes must go through the effect (``scriptedEffect``) so that the
    editor's own undo/redo stack records them; elsewhere our own editor logic keeps the history.
    """

    def save_state_for_undo(self) -> None:
        raise NotImplementedError

    def modify(self, segment_id: str, labelmap: Any, mode: str) -> None:
        raise NotImplementedError


class EditorLogicSink(EditSink):
    def __init__(self, writer: "SegmentWriter") -> None:
        self.writer = writer

    def save_state_for_undo(self) -> None:
        self.writer.logic.SaveStateForUndo()

    def modify(self, segment_id: str, labelmap: Any, mode: str) -> None:
        logic = self.writer.logic
        op = {"add": logic.ModificationModeAdd, "remove": logic.ModificationModeRemove}[mode]
        logic.ModifySegmentByLabelmap(self.writer.segmentation_node, segment_id, labelmap, op, False, False)


class SegmentWriter:
    """Writes masks into one segmentation, honouring a Segment Editor node's settings, with undo."""

    def __init__(self, scene, segmentation_node, volume_node, editor_node=None, app_logic=None,
                 max_undo_states: int = 20, sink: "EditSink | None" = None) -> None:
        import slicer

        if segmentation_node is None or volume_node is None:
            raise SAMSegmentError("A source volume and a segmentation are needed to write a mask",
                                  "select both in the SAMSegment module")
        self.scene = scene
        self.segmentation_node = segmentation_node
        self.volume_node = volume_node
        self.logic = segment_editor_logic(scene, app_logic)
        if editor_node is None:
            # Our own editor node when no Segment Editor is driving us (module or console use):
            # default masking (everywhere) and overlap (overwrite other segments), as in the editor.
            editor_node = slicer.vtkMRMLSegmentEditorNode()
            editor_node.SetName("SAMSegmentEditor")
            editor_node.SetHideFromEditors(True)
            editor_node.SetSaveWithScene(False)
            scene.AddNode(editor_node)
            self._owns_editor_node = True
        else:
            self._owns_editor_node = False
        self.editor_node = editor_node
        self.logic.SetMaximumNumberOfUndoStates(max_undo_states)
        self.logic.SetSegmentEditorNode(editor_node)
        self.logic.SetSegmentationNode(segmentation_node)
        self.logic.SetSourceVolumeNode(volume_node)
        self.sink: EditSink = sink if sink is not None else EditorLogicSink(self)
        if not segmentation_node.GetSegmentation().GetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()):
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)

    def close(self) -> None:
        if self._owns_editor_node and self.editor_node.GetScene() is not None:
            self.scene.RemoveNode(self.editor_node)

    # ---------------------------------------------------------------- segments
    def ensure_segment(self, segment_id: str | None, name: str = "SAM") -> str:
        """The id of ``segment_id`` if it exists, else of a new empty segment (undoable)."""
        segmentation = self.segmentation_node.GetSegmentation()
        if segment_id and segmentation.GetSegment(segment_id) is not None:
            return segment_id
        self.sink.save_state_for_undo()
        return segmentation.AddEmptySegment(segment_id or "", name)

    # ---------------------------------------------------------------- writes
    def save_state_for_undo(self) -> None:
        self.sink.save_state_for_undo()

    def write_slab(self, segment_id: str, slab_kji: np.ndarray, offset_kji: tuple[int, int, int],
                   mode: str = "replace", save_undo: bool = True) -> None:
        """Modify ``segment_id`` inside the slab's extent only; masking/overlap as the editor node says."""
        if mode not in MODES:
            raise SAMSegmentError(f"Unknown write mode {mode!r}", f"use one of {', '.join(MODES)}")
        if self.segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise SAMSegmentError(f"Segment '{segment_id}' is not in '{self.segmentation_node.GetName()}'",
                                  "select an existing segment or add one")
        modifier = oriented_labelmap(self.volume_node, self.segmentation_node, slab_kji, offset_kji)
        if save_undo:
            self.sink.save_state_for_undo()
        self.editor_node.SetSelectedSegmentID(segment_id)
        if mode == "replace":
            # The editor's "set" mode replaces the segment outside the modifier's extent too, which
            # would wipe every other slice. Replace = erase the slab, then add the mask: both honour
            # masking, and only "add" may touch other segments (as the overlap setting says).
            everything = oriented_labelmap(self.volume_node, self.segmentation_node,
                                           np.ones_like(slab_kji, dtype=np.uint8), offset_kji)
            self.sink.modify(segment_id, everything, "remove")
            if np.any(slab_kji):
                self.sink.modify(segment_id, modifier, "add")
            return
        self.sink.modify(segment_id, modifier, mode)

    def write_slice(self, segment_id: str, axis: int, index: int, mask2d: np.ndarray, mode: str = "replace",
                    save_undo: bool = True) -> None:
        slab, offset = slice_slab(mask2d, axis, index)
        self.write_slab(segment_id, slab, offset, mode, save_undo)

    # ---------------------------------------------------------------- undo
    def undo(self) -> bool:
        if not self.logic.CanUndo():
            return False
        self.logic.Undo()
        return True


def segment_array(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """A segment resampled to ``volume_node``'s grid, without relying on ``slicer.modules``."""
    import slicer
    from vtk.util import numpy_support

    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, [segment_id], labelmap, volume_node)
        if not ok:
            raise SAMSegmentError(f"Could not read segment '{segment_id}'", "check that it exists")
        image = labelmap.GetImageData()
        dims = image.GetDimensions()
        arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
        return (arr != 0).astype(np.uint8)
    finally:
        display = labelmap.GetDisplayNode()
        scene.RemoveNode(labelmap)
        if display is not None and display.GetScene() is not None:
            scene.RemoveNode(display)
