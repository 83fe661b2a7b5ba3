"""The Segment Editor pieces SAMSegment talks to, mirrored on headless MRML for the Slicer-side tests.

Imported by name (``from mrml_fixtures import ...``); this folder is on the import path through
pyproject.toml's pytest ``pythonpath``. Scene fixtures (``mrml``, ``backend``) are in conftest.py.
"""

from __future__ import annotations

import slicer


def segment_editor_singleton(scene):
    """The Segment Editor module's parameter node, created as the module creates it when opened
    (Modules/Scripted/SegmentEditor/SegmentEditor.py@5.10, lines 83-89)."""
    node = scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
        node.UnRegister(None)
        node.SetSingletonTag("SegmentEditor")
        node = scene.AddNode(node)
    return node


class SegmentEditorWidgetMirror:
    """What SAMSegment uses of the Segment Editor module's ``qMRMLSegmentEditorWidget`` (Slicer 5.10,
    Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx), on the same C++ logic:
    the widget owns a ``vtkSlicerSegmentEditorLogic`` (l.235, 253) bound to the scene (l.1160-1161) and
    to its parameter node (l.1254); ``setSegmentationNode`` -> ``Logic->SetSegmentationNode`` (l.1320),
    ``saveStateForUndo`` -> ``Logic->SaveStateForUndo`` (l.1978-1982), ``undo`` -> ``Logic->Undo``
    (l.2271-2275). Effects edit through ``Logic->ModifySegmentByLabelmap``
    (qSlicerSegmentEditorAbstractEffect.cxx, ``modifySegmentByLabelmap``)."""

    def __init__(self, scene, app_logic, parameter_node) -> None:
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLApplicationLogic(app_logic)
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(parameter_node)
        self.parameter_node = parameter_node

    def setSegmentationNode(self, node) -> None:
        self.logic.SetSegmentationNode(node)

    def setSourceVolumeNode(self, node) -> None:
        self.logic.SetSourceVolumeNode(node)

    def segmentationNode(self):
        return self.parameter_node.GetSegmentationNode()

    def saveStateForUndo(self) -> None:
        self.logic.SaveStateForUndo()

    def undo(self) -> None:
        self.logic.Undo()

    def paint(self, segment_id: str, labelmap) -> None:
        """An edit by a built-in effect (Paint, Threshold...): save state, then modify the segment."""
        self.logic.SaveStateForUndo()
        self.logic.ModifySegmentByLabelmap(self.segmentationNode(), segment_id, labelmap,
                                           self.logic.ModificationModeAdd, True, False)


class ScriptedEffectMirror:
    """What the SAM effect's sink calls on its ``scriptedEffect`` (Slicer 5.10,
    qSlicerSegmentEditorAbstractEffect.cxx), routed to the editor widget's logic as Slicer routes it:
    ``defaultModifierLabelmap`` -> updateVolume signal -> ``Logic->UpdateVolume`` ->
    ``ResetModifierLabelmapToDefault`` (l.943-953, vtkSlicerSegmentEditorLogic.cxx l.1002-1011);
    ``saveStateForUndo`` -> the widget's ``saveStateForUndo`` (l.1023-1026);
    ``modifySelectedSegmentByLabelmap`` -> ``Logic->ModifySegmentByLabelmap`` on the parameter node's
    segmentation and *currently selected* segment with the effect's ``perSegment`` (l.264-307)."""

    def __init__(self, widget: SegmentEditorWidgetMirror, per_segment: bool = True) -> None:
        self.widget = widget
        self.per_segment = per_segment
        self.modes = {"add": widget.logic.ModificationModeAdd, "remove": widget.logic.ModificationModeRemove}

    def parameterSetNode(self):
        return self.widget.parameter_node

    def defaultModifierLabelmap(self):
        if not self.widget.logic.ResetModifierLabelmapToDefault():
            return None
        return self.widget.logic.GetModifierLabelmap()

    def saveStateForUndo(self) -> None:
        self.widget.saveStateForUndo()

    def modifySelectedSegmentByLabelmap(self, labelmap, mode) -> None:
        node = self.parameterSetNode()
        self.widget.logic.ModifySegmentByLabelmap(node.GetSegmentationNode(), node.GetSelectedSegmentID() or "",
                                                  labelmap, mode, self.per_segment, False)
