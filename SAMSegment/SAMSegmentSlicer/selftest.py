"""The self-test flows, shared by pytest on slicer-core and the ScriptedLoadableModuleTest in Slicer.

One generated phantom (a bright block in an oblique, mirrored, anisotropic volume) and one script
of user actions, so the headless tests and the in-Slicer test check the same thing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from SAMSegmentLib.metrics import dice

from .geometry import ijk_to_ras, vtk_to_numpy_matrix
from .segment_io import segment_array


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


# Oblique and mirrored (det < 0), like an angled MR acquisition stored LPS-flipped.
OBLIQUE_DIRECTIONS = rotation("z", 25) @ rotation("x", -15) @ np.diag([-1.0, 1.0, 1.0])
ANISOTROPIC_SPACING = (0.8, 1.1, 2.5)
ORIGIN = (12.5, -30.0, 47.0)


def headless_mrml() -> tuple[Any, Any, list[Any]]:
    """(scene, application logic, module logics) set up as Slicer's startup does, without Qt.

    For slicer-core: module logics register their node classes and default nodes (colour tables)
    with the scene; ``slicer.mrmlScene`` is set so ``slicer.util`` helpers find the scene.
    """
    import slicer

    import os

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    # Slicer's home/share hold its colour table files; slicer-core has only the built-in tables,
    # which is all we need (the colour logic then logs one warning about the missing folder).
    app.SetHomeDirectory(os.path.dirname(slicer.__file__))
    app.SetShareDirectory("share")
    app.SetMRMLScene(scene)
    logics = []
    for name in ("vtkSlicerColorLogic", "vtkSlicerSegmentationsModuleLogic", "vtkSlicerMarkupsLogic",
                 "vtkSlicerVolumesLogic"):
        logic = getattr(slicer, name)()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        logics.append(logic)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    slicer.mrmlScene = scene
    return scene, app, logics


def box_phantom(shape=(14, 48, 56), lo=(4, 14, 16), hi=(11, 34, 40)) -> tuple[np.ndarray, np.ndarray]:
    """A bright block with mild noise in a dark background, and its exact voxel mask (K, J, I)."""
    rng = np.random.default_rng(7)
    vol = rng.normal(0, 8, shape).astype(np.float32)
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    vol[mask] += 400
    return vol, mask


def add_volume(scene, array: np.ndarray, directions=OBLIQUE_DIRECTIONS, spacing=ANISOTROPIC_SPACING,
               origin=ORIGIN, name: str = "source"):
    """A scalar volume node from a (K, J, I) array with the given geometry and a display node."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, array)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    node.SetIJKToRASDirections([list(map(float, row)) for row in np.asarray(directions)])
    node.CreateDefaultDisplayNodes()
    return node


def make_oblique_phantom(scene) -> tuple[Any, np.ndarray]:
    vol, truth = box_phantom()
    node = add_volume(scene, vol, name="SAMSegment phantom")
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(600, 200)
    return node, truth


def slice_node_through(scene, volume_node, orientation: str, ras: np.ndarray, node=None):
    """A slice view (new, or ``node``) of ``orientation`` rotated onto the volume, centred on ``ras``."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        node.SetLayoutName(f"SAMSegmentTest{orientation}{scene.GetNumberOfNodes()}")
        node.SetDimensions(256, 256, 1)
        node.SetFieldOfView(200, 200, 1)
    node.SetOrientation(orientation)
    node.RotateToVolumePlane(volume_node)
    node.JumpSliceByCentering(*map(float, ras))
    node.UpdateMatrices()
    return node


def block_corners_ras(volume, truth, axis: int, index: int, margin: int = 1) -> np.ndarray:
    lo, hi = np.argwhere(truth).min(axis=0) - margin, np.argwhere(truth).max(axis=0) + margin  # (k, j, i)
    lo[axis] = hi[axis] = index
    return ijk_to_ras(volume, [lo[::-1], hi[::-1]])


def run_logic_flow(scene, logic, slice_node=None, orientation: str = "Axial") -> dict[str, Any]:
    """Box on a slice view -> preview -> accept -> propagate -> undo twice; returns measurements."""
    import slicer

    volume, truth = make_oblique_phantom(scene)
    source = np.array(slicer.util.arrayFromVolume(volume), copy=True)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SAMSegment test")
    seg.CreateDefaultDisplayNodes()
    logic.set_inputs(volume, seg)
    centre = np.round(np.argwhere(truth).mean(axis=0)).astype(int)  # k, j, i
    node = slice_node_through(scene, volume, orientation, ijk_to_ras(volume, [centre[::-1]])[0], slice_node)
    logic.watch_markups(lambda: logic.view_slice(node), asynchronous=False)
    view = logic.view_slice(node)
    a, b = block_corners_ras(volume, truth, view.axis, view.index)
    logic.prompts.set_box(a, b, vtk_to_numpy_matrix(node.GetSliceToRAS()))
    if logic.current is None:
        raise AssertionError(f"no proposal after the box prompt: {logic.last_error}")
    plane = np.take(truth, view.index, view.axis)
    report: dict[str, Any] = {"axis": view.axis, "index": view.index,
                              "preview_dice": dice(logic.current.mask, plane)}
    before = segment_array(seg, logic.segment_id, volume)
    logic.accept()
    after_accept = segment_array(seg, logic.segment_id, volume)
    report["slice_dice"] = dice(np.take(after_accept, view.index, view.axis), plane)
    report["outside_slice_voxels"] = int(np.delete(after_accept, view.index, view.axis).sum())
    job = logic.propagate("both", axis=view.axis)
    full = segment_array(seg, logic.segment_id, volume)
    report["volume_dice"] = dice(full, truth)
    report["anchor_kept"] = bool(np.array_equal(np.take(full, view.index, view.axis),
                                                np.take(after_accept, view.index, view.axis)))
    report["slices_written"] = len(job.written)
    logic.undo_edit()
    undo1 = np.array_equal(segment_array(seg, logic.segment_id, volume), after_accept)
    logic.undo_edit()
    undo2 = np.array_equal(segment_array(seg, logic.segment_id, volume), before)
    report["undo_exact"] = bool(undo1 and undo2)
    report["source_unchanged"] = bool(np.array_equal(slicer.util.arrayFromVolume(volume), source))
    logic.clear()
    return report


def run_effect_flow(scene) -> dict[str, Any]:
    """Inside Slicer: the "SAM" effect in a real Segment Editor widget, driven like a user would."""
    import slicer

    from .effect_interaction import Action

    volume, truth = make_oblique_phantom(scene)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SAMSegment effect test")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = seg.GetSegmentation().AddEmptySegment("block")
    editor = slicer.qMRMLSegmentEditorWidget()
    editor.setMRMLScene(scene)
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.setMRMLSegmentEditorNode(editor_node)
    editor.setSegmentationNode(seg)
    editor.setSourceVolumeNode(volume)
    editor.setCurrentSegmentID(segment_id)
    editor.setActiveEffectByName("SAM")
    effect = editor.activeEffect().self()
    layout = slicer.app.layoutManager()
    red = layout.sliceWidget("Red").mrmlSliceNode() if layout is not None else None
    centre = np.round(np.argwhere(truth).mean(axis=0)).astype(int)
    node = slice_node_through(scene, volume, "Axial", ijk_to_ras(volume, [centre[::-1]])[0], red)
    view = effect.controller.core.view_slice(node)
    a, b = block_corners_ras(volume, truth, view.axis, view.index)
    xy_to_ras = vtk_to_numpy_matrix(node.GetXYToRAS())
    xy = [tuple((np.linalg.inv(xy_to_ras) @ np.r_[p, 1.0])[:2]) for p in (a, b)]
    effect.controller.handle(node, Action("box", xy[0], xy[1]))
    effect.controller.wait()  # the effect's timer shows the preview when the server answers
    effect.onApply()
    written = segment_array(seg, segment_id, volume)
    plane = np.take(truth, view.index, view.axis)
    report = {"slice_dice": dice(np.take(written, view.index, view.axis), plane)}
    editor.undo()
    report["undo_exact"] = bool(segment_array(seg, segment_id, volume).sum() == 0)
    editor.setActiveEffect(None)
    return report
