"""Writing SAM masks into segments the way the Segment Editor does, and reading segments back.

Every write honours the Segment Editor's own settings: masking ("editable area", "editable
intensity range") and overlap ("modify other segments") are read from the editor's parameter node
at every write, so a SAM edit is clipped exactly like a Paint or Threshold edit. Two ways in:

* ``EditorLogicSink`` (the module's Accept and propagation): a private ``vtkSlicerSegmentEditorLogic``
  (Slicer >= 5.10) with its own undo history, whose private parameter node copies the settings of
  the Segment Editor's singleton node (``"SegmentEditor"``, created by the Segment Editor module,
  ``Modules/Scripted/SegmentEditor/SegmentEditor.py``) before each write;
* the SAM effect's sink (``SegmentEditorSAMLib``), which writes through the effect itself so that
  the Segment Editor's own logic, settings and undo stack apply.

Masks are placed on the segmentation's modifier geometry (the reference geometry every Segment
Editor effect paints on, ``defaultModifierLabelmap()``): when that grid differs from the volume's
(oversampled segmentation, segmentation made on another volume) the slice is resampled onto it,
because Slicer silently drops a modifier whose geometry differs from the source volume's when the
intensity range is on (``vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap``). The source
volume is only read.

A slice is written as a one-voxel-thick labelmap limited to that slice's extent, so "replace"
replaces exactly that slice of the segment and leaves the others untouched.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from SAMSegmentLib.errors import SAMSegmentError

from .geometry import ijk_to_ras_matrix, node_to_world, numpy_to_vtk_matrix, vtk_to_numpy_matrix

MODES = ("replace", "add", "remove")

# The Segment Editor module's parameter node is a scene singleton with this tag (SegmentEditor.py).
SEGMENT_EDITOR_SINGLETON_TAG = "SegmentEditor"


def segment_editor_logic(scene, app_logic=None):
    """A Segment Editor logic bound to ``scene`` (the class qMRMLSegmentEditorWidget uses, Slicer >= 5.10)."""
    import slicer

    if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
        raise SAMSegmentError("This Slicer has no vtkSlicerSegmentEditorLogic (it appeared in Slicer 5.10)",
                              "install 3D Slicer 5.10 or later")
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    if app_logic is not None:
        logic.SetMRMLApplicationLogic(app_logic)
    return logic


def segment_editor_settings_node(scene):
    """The Segment Editor module's own parameter node, or None before the Segment Editor was opened."""
    return scene.GetSingletonNode(SEGMENT_EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")


def copy_edit_settings(source, target) -> None:
    """Copy masking and overlap settings from ``source`` (None = a new editor node's defaults) to ``target``."""
    import slicer

    if source is None:
        source = slicer.vtkMRMLSegmentEditorNode()
    target.SetMaskMode(source.GetMaskMode())
    target.SetMaskSegmentID(source.GetMaskSegmentID())
    target.SetOverwriteMode(source.GetOverwriteMode())
    target.SetSourceVolumeIntensityMask(source.GetSourceVolumeIntensityMask())
    target.SetSourceVolumeIntensityMaskRange(*source.GetSourceVolumeIntensityMaskRange())


def check_mask_segment(editor_node, segmentation_node) -> None:
    """Refuse a write that Slicer would drop: "inside segment X" where X is not in this segmentation.

    (``vtkMRMLSegmentationNode::GenerateEditMask`` fails for a missing mask segment, and
    ``ModifySegmentByLabelmap`` then returns without editing and without telling the caller.)
    """
    import slicer

    if editor_node.GetMaskMode() != slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment:
        return
    mask_id = editor_node.GetMaskSegmentID() or ""
    if not mask_id or segmentation_node.GetSegmentation().GetSegment(mask_id) is None:
        raise SAMSegmentError(
            f"The Segment Editor's editable area is a single segment ('{mask_id}') that is not in "
            f"'{segmentation_node.GetName()}'",
            "in the Segment Editor's Masking section set 'Editable area' to a segment of this segmentation "
            "or to 'Everywhere'")


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


def image_to_world(image) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return vtk_to_numpy_matrix(m)


def on_modifier_geometry(labelmap, geometry):
    """``labelmap`` on the grid of ``geometry`` (a modifier labelmap; only its geometry and extent are used).

    Returns ``labelmap`` itself when the grids already agree (the usual case: a segmentation made
    on the source volume); otherwise a nearest-neighbour resampling limited to the voxels of
    ``geometry`` that the labelmap covers, or None when it covers none of them.
    """
    import slicer
    import vtk

    if geometry is None or np.allclose(image_to_world(labelmap), image_to_world(geometry), atol=1e-6):
        return labelmap
    labelmap_to_geometry = vtk.vtkTransform()
    labelmap_to_geometry.Concatenate(numpy_to_vtk_matrix(np.linalg.inv(image_to_world(geometry))
                                                         @ image_to_world(labelmap)))
    covered = [0, -1, 0, -1, 0, -1]
    slicer.vtkOrientedImageDataResample.TransformExtent(labelmap.GetExtent(), labelmap_to_geometry, covered)
    full = geometry.GetExtent()
    extent = [max(covered[0], full[0]), min(covered[1], full[1]), max(covered[2], full[2]),
              min(covered[3], full[3]), max(covered[4], full[4]), min(covered[5], full[5])]
    if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
        return None
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(extent)
    reference.SetImageToWorldMatrix(numpy_to_vtk_matrix(image_to_world(geometry)))
    output = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, output, False, False):
        return None
    return output


def remove_with_display(scene, node) -> None:
    """Remove ``node`` and its display node from ``scene`` (a scene keeps an orphaned display node)."""
    if node is None or node.GetScene() is None:
        return
    display = node.GetDisplayNode()
    scene.RemoveNode(node)
    if display is not None and display.GetScene() is not None:
        scene.RemoveNode(display)


def slice_slab(mask2d: np.ndarray, axis: int, index: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A 2D slice mask as a one-voxel-thick (K, J, I) slab and its voxel offset."""
    slab = np.expand_dims(np.asarray(mask2d, dtype=np.uint8), axis)
    offset = [0, 0, 0]
    offset[axis] = int(index)
    return slab, (offset[0], offset[1], offset[2])


class EditSink:
    """Where edits go: a private Segment Editor logic (the module), or the active SAM effect.

    ``modifier_geometry()`` is the grid edits must be placed on (None = the labelmap's own);
    ``prepare(segment_id)`` runs before every write (settings, checks); ``undo()`` reverts the
    last saved state where the sink keeps its own history.
    """

    def prepare(self, segment_id: str) -> None:
        """Called before each write of ``segment_id``."""

    def modifier_geometry(self) -> Any:
        return None

    def save_state_for_undo(self) -> None:
        raise NotImplementedError

    def modify(self, segment_id: str, labelmap: Any, mode: str) -> None:
        raise NotImplementedError

    def undo(self) -> bool:
        return False

    def close(self) -> None:
        """Release what the sink created in the scene."""


class EditorLogicSink(EditSink):
    """The module's writes: a private Segment Editor logic whose settings mirror the Segment Editor's.

    ``segment_editor``, when given, returns the Segment Editor module's ``qMRMLSegmentEditorWidget``
    if it exists (None otherwise). When it edits this segmentation, its undo state is saved before
    each of our writes, so the Segment Editor's Ctrl+Z reverts exactly our write instead of our write
    plus the user's last Segment Editor edit (``vtkSegmentationHistory::RestorePreviousState`` goes
    back to the last *saved* state).
    """

    def __init__(self, scene, segmentation_node, volume_node, app_logic=None, max_undo_states: int = 20,
                 segment_editor: Callable[[], Any] | None = None) -> None:
        import slicer

        self.scene = scene
        self.segmentation_node = segmentation_node
        self.segment_editor = segment_editor
        self.logic = segment_editor_logic(scene, app_logic)
        # A private, hidden parameter node: binding the logic to the Segment Editor's own node would
        # switch the user's segmentation and selected segment there (SetSegmentationNode writes into it).
        node = slicer.vtkMRMLSegmentEditorNode()
        node.SetName("SAMSegment editor settings")
        node.SetHideFromEditors(True)
        node.SetSaveWithScene(False)
        self.editor_node = scene.AddNode(node)
        self.logic.SetMaximumNumberOfUndoStates(max_undo_states)
        self.logic.SetSegmentEditorNode(self.editor_node)
        self.logic.SetSegmentationNode(segmentation_node)
        self.logic.SetSourceVolumeNode(volume_node)

    def settings_source(self):
        """Where masking/overlap settings come from: the Segment Editor's singleton node (None: defaults)."""
        return segment_editor_settings_node(self.scene)

    def prepare(self, segment_id: str) -> None:
        copy_edit_settings(self.settings_source(), self.editor_node)
        self.editor_node.SetSelectedSegmentID(segment_id)
        check_mask_segment(self.editor_node, self.segmentation_node)

    def modifier_geometry(self) -> Any:
        if not self.logic.ResetModifierLabelmapToDefault():
            return None
        return self.logic.GetModifierLabelmap()

    def save_state_for_undo(self) -> None:
        editor = self.segment_editor() if self.segment_editor is not None else None
        if editor is not None and editor.segmentationNode() is self.segmentation_node:
            editor.saveStateForUndo()
        self.logic.SaveStateForUndo()

    def modify(self, segment_id: str, labelmap: Any, mode: str) -> None:
        logic = self.logic
        op = {"add": logic.ModificationModeAdd, "remove": logic.ModificationModeRemove}[mode]
        logic.ModifySegmentByLabelmap(self.segmentation_node, segment_id, labelmap, op, False, False)

    def undo(self) -> bool:
        if not self.logic.CanUndo():
            return False
        self.logic.Undo()
        return True

    def close(self) -> None:
        if self.editor_node.GetScene() is not None:
            self.scene.RemoveNode(self.editor_node)


class SegmentWriter:
    """Writes masks into one segmentation through an ``EditSink``, with the editor's masking, overlap and undo."""

    def __init__(self, scene, segmentation_node, volume_node, app_logic=None, max_undo_states: int = 20,
                 sink: EditSink | None = None, segment_editor: Callable[[], Any] | None = None) -> None:
        import slicer

        if segmentation_node is None or volume_node is None:
            raise SAMSegmentError("A source volume and a segmentation are needed to write a mask",
                                  "select both in the SAMSegment module")
        self.scene = scene
        self.segmentation_node = segmentation_node
        self.volume_node = volume_node
        if not segmentation_node.GetSegmentation().GetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()):
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        self.sink: EditSink = sink if sink is not None else EditorLogicSink(
            scene, segmentation_node, volume_node, app_logic, max_undo_states, segment_editor)

    def close(self) -> None:
        self.sink.close()

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

    def _modifier(self, slab_kji: np.ndarray, offset_kji: tuple[int, int, int], geometry: Any):
        labelmap = oriented_labelmap(self.volume_node, self.segmentation_node, slab_kji, offset_kji)
        return on_modifier_geometry(labelmap, geometry)

    def write_slab(self, segment_id: str, slab_kji: np.ndarray, offset_kji: tuple[int, int, int],
                   mode: str = "replace", save_undo: bool = True) -> None:
        """Modify ``segment_id`` inside the slab's extent only; masking/overlap as the Segment Editor says."""
        if mode not in MODES:
            raise SAMSegmentError(f"Unknown write mode {mode!r}", f"use one of {', '.join(MODES)}")
        if self.segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise SAMSegmentError(f"Segment '{segment_id}' is not in '{self.segmentation_node.GetName()}'",
                                  "select an existing segment or add one")
        self.sink.prepare(segment_id)
        geometry = self.sink.modifier_geometry()
        modifier = self._modifier(slab_kji, offset_kji, geometry)
        if modifier is None:
            raise SAMSegmentError("The slice lies outside the segmentation's geometry",
                                  "specify the segmentation's geometry from the source volume "
                                  "(Segment Editor > Specify geometry)")
        if save_undo:
            self.sink.save_state_for_undo()
        if mode == "replace":
            # The editor's "set" mode replaces the segment outside the modifier's extent too, which
            # would wipe every other slice. Replace = erase the slab, then add the mask: both honour
            # masking, and only "add" may touch other segments (as the overlap setting says).
            everything = self._modifier(np.ones_like(slab_kji, dtype=np.uint8), offset_kji, geometry)
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
        """Revert the last saved state of this writer's own history (False when it keeps none or has none)."""
        return self.sink.undo()


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
        remove_with_display(scene, labelmap)
