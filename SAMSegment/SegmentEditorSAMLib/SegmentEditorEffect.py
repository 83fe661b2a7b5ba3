"""The "SAM" Segment Editor effect: a thin Qt shell over SAMSegmentSlicer.effect_interaction.

Slicer loads this file as a module named after its folder (``SegmentEditorSAMLib``) and, from 5.10
on, puts that module in ``sys.modules`` under the folder's name
(``qSlicerSegmentEditorScriptedEffect::setPythonSource`` -> ``qSlicerScriptedUtils::loadSourceAsModule``).
So this folder is not a package and nothing imports it; the Qt-free helpers live in the
``SAMSegmentSlicer`` package, which stays intact.

Left-drag = box, left-click = include point, Ctrl/Shift-click = exclude point. Every model call is a request
to the SAMSegment server (``SAMSegmentSlicer.server_link``), advanced by the effect's 40 ms timer,
so no mouse handler waits for the model. The proposal is a
preview; Apply (or Enter) writes it through the Segment Editor, so its undo/redo, masking and
overlap settings apply as for any built-in effect; Cancel drops it. Esc is the Segment Editor's
shortcut for leaving the effect (which also drops the preview).
"""

from __future__ import annotations

import logging
import os
import sys

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect
from slicer.i18n import tr as _

_MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _MODULE_DIR not in sys.path:  # the SAMSegmentSlicer package sits beside this folder
    sys.path.insert(0, _MODULE_DIR)

from SAMSegmentSlicer.effect_interaction import EffectController, EffectSink  # noqa: E402
from SAMSegmentSlicer.logic import SAMSegmentCore  # noqa: E402
from SAMSegmentSlicer.status import show_status  # noqa: E402
from SAMSegmentLib.errors import SAMSegmentError  # noqa: E402


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "SAM"
        scriptedEffect.perSegment = True  # edits exactly the selected segment
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.controller: EffectController | None = None
        self._rubberBand = {}
        self._timer = None  # created on activation (a QTimer polling the server requests)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(_MODULE_DIR, "Resources", "Icons", "SAMSegmentEffect.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return _("<html>Segment with Segment Anything (LiteMedSAM by default)<br>"
                 "<b>Left-drag</b>: box around the structure. <b>Left-click</b>: include point. "
                 "<b>Ctrl/Shift-click</b>: exclude point. <b>Enter</b> or Apply keeps the preview in the "
                 "selected segment (Ctrl+Z undoes it); Cancel drops it. <b>Esc</b> leaves the effect.</html>")

    # ---------------------------------------------------------------- options panel
    def setupOptionsFrame(self):
        self.statusLabel = qt.QLabel(_("Drag a box around the structure on a slice view."))
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        row = qt.QHBoxLayout()
        self.applyButton = qt.QPushButton(_("Apply"))
        self.undoButton = qt.QPushButton(_("Undo prompt"))
        self.cancelButton = qt.QPushButton(_("Cancel"))
        for b in (self.applyButton, self.undoButton, self.cancelButton):
            row.addWidget(b)
        self.scriptedEffect.addOptionsWidget(row)
        self.applyButton.connect("clicked()", self.onApply)
        self.undoButton.connect("clicked()", self.onUndoPrompt)
        self.cancelButton.connect("clicked()", self.onCancel)

    def _status(self, text, error=False):
        if hasattr(self, "statusLabel"):
            show_status(self.statusLabel, text, error)

    # ---------------------------------------------------------------- lifecycle
    def activate(self):
        """Connect to the SAMSegment server chosen in the module's Server section (the local one is
        started if needed, and shared with the module); nothing here waits for it: the effect's timer
        advances the connection and the requests. The model never runs in Slicer's process."""
        from SAMSegmentSlicer import server_link

        try:
            env_dir, log_file = server_link.local_paths(slicer.app.slicerUserSettingsFilePath)
            link = server_link.link_from_settings(slicer.app.userSettings(), env_dir, log_file)
            if isinstance(link, server_link.LocalServerLink) and not link.installed and link.setup_run is None:
                self._status(_("The SAMSegment server is not set up yet: open the SAMSegment module and press Start "
                               "(it asks before installing anything)."), error=True)
                return
            if self.controller is None:
                import qSlicerSegmentationsEditorEffectsPythonQt as effects

                base = effects.qSlicerSegmentEditorAbstractEffect
                sink = EffectSink(self.scriptedEffect, {"add": base.ModificationModeAdd,
                                                        "remove": base.ModificationModeRemove})
                core = SAMSegmentCore(slicer.mrmlScene, slicer.app.applicationLogic())
                self.controller = EffectController(core, self.scriptedEffect.parameterSetNode, sink)
            self.controller.core.use_link(link)
            self.controller.bind()
            if self._timer is None:
                self._timer = qt.QTimer()
                self._timer.setInterval(40)
                self._timer.connect("timeout()", self.onTimer)
            self._timer.start()
            self._status(_("Drag a box around the structure on a slice view."))
        except Exception as exc:  # noqa: BLE001 - shown in the panel, the effect stays usable
            logging.exception("SAM effect activation failed")
            self._status(str(exc), error=True)

    def deactivate(self):
        if self._timer is not None:
            self._timer.stop()
        if self.controller is not None:
            self.controller.cancel()
        for viewWidget, band in list(self._rubberBand.items()):
            self.scriptedEffect.removeActor2D(viewWidget, band)
        self._rubberBand.clear()

    def onTimer(self):
        """Every 40 ms while active: advance the server requests; show a preview that arrived."""
        if self.controller is None:
            return
        try:
            prediction = self.controller.poll()
            if prediction is not None:
                self._status(_("Preview: {area} px (score {score:.2f}). Apply or press Enter to keep it.")
                             .format(area=prediction.area, score=prediction.score))
        except Exception as exc:  # noqa: BLE001 - a refused prompt or a lost server is a message
            self._status(str(exc), error=True)

    def _rebind(self):
        if self.controller is not None and self.controller.core.link is not None:
            try:
                self.controller.bind()
            except SAMSegmentError as exc:
                self._status(str(exc), error=True)

    def sourceVolumeNodeChanged(self):
        self._rebind()

    def referenceGeometryChanged(self):
        self._rebind()

    def updateGUIFromMRML(self):
        self._rebind()

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
                    self.controller.handle(viewWidget.mrmlSliceNode(), action)  # sent; onTimer shows the mask
                    self._status(_("Segmenting..."))
                except Exception as exc:  # noqa: BLE001 - a bad prompt is a message, not a crash
                    self._status(str(exc), error=True)
            return True
        if eventId == vtk.vtkCommand.KeyPressEvent and callerInteractor.GetKeySym() in ("Return", "KP_Enter"):
            self.onApply()
            return True
        return False

    def _drawRubberBand(self, viewWidget, rect):
        band = self._rubberBand.get(viewWidget)
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
            self.scriptedEffect.addActor2D(viewWidget, band)  # schedules the render
            self._rubberBand[viewWidget] = band
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
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        # a hidden segment: ask, as the built-in effects do, before editing what the user cannot see
        not_confirmed = effects.qSlicerSegmentEditorAbstractEffect.NotConfirmed
        if self.scriptedEffect.confirmCurrentSegmentVisible() == not_confirmed:
            return
        try:
            n = self.controller.apply()
            self._status(_("Applied {n} voxels. Ctrl+Z undoes it.").format(n=n))
        except Exception as exc:  # noqa: BLE001
            self._status(str(exc), error=True)

    def onUndoPrompt(self):
        if self.controller is not None:
            self.controller.undo()

    def onCancel(self):
        if self.controller is not None:
            self.controller.cancel()
            self._status(_("Preview dropped."))
