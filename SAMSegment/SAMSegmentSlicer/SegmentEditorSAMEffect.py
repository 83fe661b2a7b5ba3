"""The "SAM" Segment Editor effect: a thin Qt shell over EffectController.

Left-click = include point, Ctrl/Shift-click = exclude point, left-drag = box. The proposal is
shown as a preview; Apply (or Enter) writes it through the Segment Editor, so undo/redo, masking
and overlap settings behave as for any built-in effect; Cancel (or Esc) drops it.
"""

from __future__ import annotations

import logging
import os
import sys

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(_HERE))

from SAMSegmentSlicer.effect_interaction import EffectController  # noqa: E402
from SAMSegmentSlicer.logic import SAMSegmentCore  # noqa: E402
from SAMSegmentSlicer.segment_io import EditSink  # noqa: E402


class _EffectSink(EditSink):
    """Edits through the effect, so they land in the Segment Editor's undo stack."""

    def __init__(self, scriptedEffect) -> None:
        self.scriptedEffect = scriptedEffect

    def save_state_for_undo(self) -> None:
        self.scriptedEffect.saveStateForUndo()

    def modify(self, segment_id, labelmap, mode) -> None:
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        base = effects.qSlicerSegmentEditorAbstractEffect
        op = {"add": base.ModificationModeAdd, "remove": base.ModificationModeRemove}[mode]
        self.scriptedEffect.modifySelectedSegmentByLabelmap(labelmap, op)


class SegmentEditorSAMEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "SAM"
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.controller: EffectController | None = None
        self._core: SAMSegmentCore | None = None
        self._rubberBand = {}

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(_HERE), "Resources", "Icons", "SAMSegmentEffect.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return ("<html>Segment with Segment Anything (LiteMedSAM by default)<br>"
                "<b>Left-drag</b>: box around the structure. <b>Left-click</b>: include point. "
                "<b>Ctrl/Shift-click</b>: exclude point. <b>Enter</b>/Apply keeps the preview, "
                "<b>Esc</b>/Cancel drops it.</html>")

    # ---------------------------------------------------------------- options panel
    def setupOptionsFrame(self):
        self.statusLabel = qt.QLabel("Drag a box around the structure on a slice view.")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        row = qt.QHBoxLayout()
        self.applyButton = qt.QPushButton("Apply")
        self.undoButton = qt.QPushButton("Undo prompt")
        self.cancelButton = qt.QPushButton("Cancel")
        for b in (self.applyButton, self.undoButton, self.cancelButton):
            row.addWidget(b)
        self.scriptedEffect.addOptionsWidget(row)
        self.applyButton.connect("clicked()", self.onApply)
        self.undoButton.connect("clicked()", self.onUndoPrompt)
        self.cancelButton.connect("clicked()", self.onCancel)

    def _status(self, text, error=False):
        if hasattr(self, "statusLabel"):
            self.statusLabel.setText(text)
            self.statusLabel.setStyleSheet("color: #c0392b" if error else "")

    # ---------------------------------------------------------------- lifecycle
    def activate(self):
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        volume = parameterSetNode.GetSourceVolumeNode()
        segmentation = parameterSetNode.GetSegmentationNode()
        if volume is None or segmentation is None:
            self._status("Select a segmentation and a source volume first.", error=True)
            return
        try:
            module_logic = slicer.util.getModuleLogic("SAMSegment")
            if self._core is None:
                self._core = SAMSegmentCore(slicer.mrmlScene, slicer.app.applicationLogic())
                if module_logic is not None and module_logic.session is not None:
                    self._core.use_session(module_logic.session, own=False)  # reuse model and cache
            self._core.set_inputs(volume, segmentation, parameterSetNode.GetSelectedSegmentID(),
                                  editor_node=parameterSetNode)
            self._core.writer.sink = _EffectSink(self.scriptedEffect)
            self.controller = EffectController(self._core)
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            logging.exception("SAM effect activation failed")
            self._status(str(exc), error=True)

    def deactivate(self):
        if self.controller is not None:
            self.controller.cancel()
        for view, band in list(self._rubberBand.items()):
            view.renderWindow().GetRenderers().GetFirstRenderer().RemoveViewProp(band)
        self._rubberBand.clear()

    # ---------------------------------------------------------------- interaction
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if self.controller is None or viewWidget.className() != "qMRMLSliceWidget":
            return False
        xy = callerInteractor.GetEventPosition()
        interpreter = self.controller.interpreter
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            self.controller.press(viewWidget.mrmlSliceNode(), xy, ctrl=bool(callerInteractor.GetControlKey()),
                                  shift=bool(callerInteractor.GetShiftKey()))
            return True
        if eventId == vtk.vtkCommand.MouseMoveEvent and interpreter.active:
            self._drawRubberBand(viewWidget, interpreter.move(xy))
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and interpreter.active:
            self._drawRubberBand(viewWidget, None)
            action = interpreter.release(xy)
            if action is not None:
                try:
                    prediction = self.controller.handle(viewWidget.mrmlSliceNode(), action)
                    if prediction is not None:
                        self._status(f"Preview: {prediction.area} px (score {prediction.score:.2f}). "
                                     "Apply or press Enter to keep it.")
                except Exception as exc:  # noqa: BLE001 - a bad prompt is a message, not a crash
                    self._status(str(exc), error=True)
            return True
        if eventId == vtk.vtkCommand.KeyPressEvent:
            key = callerInteractor.GetKeySym()
            if key in ("Return", "KP_Enter"):
                self.onApply()
                return True
            if key == "Escape":
                self.onCancel()
                return True
        return False

    def _drawRubberBand(self, viewWidget, rect):
        renderer = viewWidget.sliceView().renderWindow().GetRenderers().GetFirstRenderer()
        band = self._rubberBand.get(viewWidget.sliceView())
        if band is None:
            points, lines = vtk.vtkPoints(), vtk.vtkCellArray()
            points.SetNumberOfPoints(4)
            lines.InsertNextCell(5)
            for i in (0, 1, 2, 3, 0):
                lines.InsertCellPoint(i)
            poly = vtk.vtkPolyData()
            poly.SetPoints(points)
            poly.SetLines(lines)
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(poly)
            band = vtk.vtkActor2D()
            band.SetMapper(mapper)
            band.GetProperty().SetColor(0.95, 0.85, 0.1)
            renderer.AddViewProp(band)
            self._rubberBand[viewWidget.sliceView()] = band
        if rect is None:
            band.SetVisibility(False)
        else:
            (x0, y0), (x1, y1) = rect
            points = band.GetMapper().GetInput().GetPoints()
            for i, (x, y) in enumerate(((x0, y0), (x1, y0), (x1, y1), (x0, y1))):
                points.SetPoint(i, x, y, 0)
            points.Modified()
            band.SetVisibility(True)
        viewWidget.sliceView().scheduleRender()

    # ---------------------------------------------------------------- buttons
    def onApply(self):
        if self.controller is None:
            return
        try:
            n = self.controller.apply()
            self._status(f"Applied {n} voxels. Ctrl+Z undoes it.")
        except Exception as exc:  # noqa: BLE001
            self._status(str(exc), error=True)

    def onUndoPrompt(self):
        if self.controller is not None:
            self.controller.undo()

    def onCancel(self):
        if self.controller is not None:
            self.controller.cancel()
            self._status("Preview dropped.")
