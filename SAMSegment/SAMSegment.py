"""SAMSegment: interactive Segment Anything (LiteMedSAM, SAM, MedSAM) segmentation in 3D Slicer.

The five classes Slicer expects, each kept thin: every decision is in ``SAMSegmentSlicer`` (MRML
logic, geometry, prompts, segment writes, effect interaction, the server link), which is tested on
headless MRML against a real server. The engine (``SAMSegmentLib``) never runs in Slicer's process:
the module is a client of a SAMSegment server, local or remote. The widget only builds the panel,
forwards events, polls the requests from its timer and shows state.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Callable, Optional

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if MODULE_DIR not in sys.path:  # SAMSegmentSlicer sits beside this file
    sys.path.insert(0, MODULE_DIR)
# An installed extension has SAMSegmentLib beside the module (on sys.path already); a source
# checkout loaded with --additional-module-paths has it one level up.
_SOURCE_ROOT = os.path.dirname(MODULE_DIR)
if os.path.isdir(os.path.join(_SOURCE_ROOT, "SAMSegmentLib")) and _SOURCE_ROOT not in sys.path:
    sys.path.append(_SOURCE_ROOT)

# The effect lives in a folder of its own that nothing imports: Slicer loads an effect file as a
# module named after its folder and (5.10+) replaces sys.modules[<folder>] with it.
EFFECT_SOURCE = os.path.join(MODULE_DIR, "SegmentEditorSAMLib", "SegmentEditorEffect.py").replace("\\", "/")

from SAMSegmentSlicer.dependencies import check_supported  # noqa: E402 - needs MODULE_DIR on sys.path
from SAMSegmentSlicer.logic import ADAPTER_SUFFIX, SAMSegmentCore  # noqa: E402
from SAMSegmentSlicer.server_link import stop_local_servers  # noqa: E402
from SAMSegmentSlicer.status import show_status  # noqa: E402

MODEL_IDS = SAMSegmentCore.model_ids()


# --------------------------------------------------------------------------------------------- module
class SAMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAMSegment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["SAMSegment developers"]
        self.parent.helpText = _(
            "Segment structures with Segment Anything models (LiteMedSAM by default, offline): place a box "
            "(ROI: click one corner, then the opposite corner) on any slice view, refine with include/exclude "
            "points, accept, then propagate through adjacent slices. 'Adapt to this scan' fine-tunes the model to the "
            "slices accepted for one structure. Also available as the 'SAM' effect in the Segment Editor, where a box "
            "is dragged. Needs 3D Slicer 5.10 or later. "
            '<a href="https://github.com/samsegment/SlicerSAMSegment">Documentation</a>.')
        self.parent.acknowledgementText = _(
            "LiteMedSAM and MedSAM: Ma J. et al., Nature Communications 2024. Segment Anything: Kirillov A. et al., "
            "ICCV 2023.")
        slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)
        slicer.app.connect("aboutToQuit()", stop_local_servers)  # the local server ends with Slicer


def registerSegmentEditorEffect() -> None:
    """Add the "SAM" effect to the Segment Editor (runs once Slicer has started)."""
    try:
        import qSlicerSegmentationsEditorEffectsPythonQt as effects
    except ImportError:  # Slicer without the Segment Editor (e.g. a custom app)
        logging.warning("SAMSegment: Segment Editor effects are unavailable; the SAM effect is not registered")
        return
    if check_supported((slicer.app.majorVersion, slicer.app.minorVersion), sys.version_info[:2]) is not None:
        return  # the module panel says why
    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    if not instance.setPythonSource(EFFECT_SOURCE) or instance.self() is None:
        logging.error("SAMSegment: the SAM effect could not be loaded from %s (see the messages above)", EFFECT_SOURCE)
        return
    instance.self().register()


def segmentEditorWidget():
    """The Segment Editor module's editor widget if the user has opened that module, else None.

    ``slicer.modules.SegmentEditorWidget`` exists only once the module's widget was created
    (qSlicerScriptedLoadableModuleWidget); looking it up never creates it."""
    return getattr(getattr(slicer.modules, "SegmentEditorWidget", None), "editor", None)


# --------------------------------------------------------------------------------------------- parameters
@parameterNodeWrapper
class SAMSegmentParameterNode:
    """GUI state saved with the scene, so a reloaded scene comes back as the user left it."""

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentID: str = ""
    model: Annotated[str, Choice(MODEL_IDS)] = SAMSegmentCore.default_model()
    checkpoint: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    windowFromDisplay: bool = True
    boxMargin: bool = True
    includePoints: vtkMRMLMarkupsFiducialNode
    excludePoints: vtkMRMLMarkupsFiducialNode
    boxROI: vtkMRMLMarkupsROINode
    direction: Annotated[str, Choice(["both", "up", "down"])] = "both"
    withinBox: bool = False
    limitRange: bool = False
    rangeFirst: Annotated[int, WithinRange(0, 100000)] = 0
    rangeLast: Annotated[int, WithinRange(0, 100000)] = 100000
    minIoU: Annotated[float, WithinRange(0.0, 1.0)] = 0.2
    minScore: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    minIntensityAgreement: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


# --------------------------------------------------------------------------------------------- widget
class SAMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[SAMSegmentLogic] = None
        self._parameterNode: Optional[SAMSegmentParameterNode] = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._interrupted = None  # a propagation the server's loss stopped; Propagate resumes it
        self._task = None
        self._adapterTask = None  # an adaptation, or an adapter being saved or loaded
        self.timer = qt.QTimer()
        self.timer.setInterval(40)
        self.timer.connect("timeout()", self.onTimer)

    # ---------------------------------------------------------------- panel
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = SAMSegmentLogic()
        self.logic.on_error = lambda exc: self.setStatus(str(exc), error=True)
        self.logic.on_status = lambda text: self.setStatus(text)
        self.ui = _build_panel(self.layout)
        self.ui.applyButton.connect("clicked()", self.onAccept)
        self.ui.undoButton.connect("clicked()", self.onUndo)
        self.ui.clearButton.connect("clicked()", self.onClear)
        self.ui.propagateButton.connect("clicked()", self.onPropagate)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.loadModelButton.connect("clicked()", self.onLoadModel)
        self.ui.everythingSliceButton.connect("clicked()", lambda: self.onEverything(volume=False))
        self.ui.everythingVolumeButton.connect("clicked()", lambda: self.onEverything(volume=True))
        self.ui.samaugButton.connect("clicked()", self.onSAMAug)
        self.ui.uncertaintyCheck.connect("toggled(bool)", self.onUncertainty)
        self.ui.adaptButton.connect("clicked()", self.onAdapt)
        self.ui.adaptCancelButton.connect("clicked()", self.onCancelAdaptation)
        self.ui.stockModelButton.connect("clicked()", self.onUseStockModel)
        self.ui.saveAdapterButton.connect("clicked()", self.onSaveAdapter)
        self.ui.loadAdapterButton.connect("clicked()", self.onLoadAdapter)
        self.ui.marginCheck.connect("toggled(bool)", lambda on: self.logic.set_box_margin(on))
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                             lambda node: self.ui.segmentSelector.setCurrentNode(node))
        self.ui.checkpointPath.connect("currentPathChanged(QString)", self.onCheckpointChanged)
        self.ui.serverMode.connect("currentIndexChanged(int)", self.onServerModeChanged)
        self.ui.serverURL.connect("editingFinished()", self.onServerSettingsEdited)
        self.ui.serverKey.connect("editingFinished()", self.onServerSettingsEdited)
        self.loadServerSettings()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        unsupported = check_supported((slicer.app.majorVersion, slicer.app.minorVersion), sys.version_info[:2])
        if unsupported is not None:
            self.setStatus(unsupported, error=True)
            for button in (self.ui.loadModelButton, self.ui.applyButton, self.ui.propagateButton,
                           self.ui.everythingSliceButton, self.ui.everythingVolumeButton, self.ui.samaugButton,
                           self.ui.adaptButton, self.ui.stockModelButton, self.ui.saveAdapterButton,
                           self.ui.loadAdapterButton):
                button.enabled = False
            return
        self.timer.start()

    def cleanup(self) -> None:
        self.timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.close()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        """Cancel running work before the scene's nodes go away; nothing lands in the next scene."""
        self.logic.release_scene(self._job, self._task, self._adapterTask)
        self._job = self._task = self._interrupted = self._adapterTask = None
        self.ui.propagateButton.enabled = True
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.ui.adaptProgressBar.setValue(0)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.inputVolume:
            p.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, node) -> None:
        if self._parameterNode is not None:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = node
        if node is None:
            return
        # Every widget with a parameter-node connector (guiConnectors.py); the combos take their
        # items from the parameters' Choice annotations.
        self._parameterNodeGuiTag = node.connectParametersToGui({
            "inputVolume": self.ui.volumeSelector, "segmentation": self.ui.segmentationSelector,
            "model": self.ui.modelSelector, "device": self.ui.deviceSelector,
            "direction": self.ui.directionSelector, "withinBox": self.ui.withinBoxCheck,
            "windowFromDisplay": self.ui.windowCheck,
            "boxMargin": self.ui.marginCheck,
            "includePoints": self.ui.includePlace.markupsSelectorComboBox(),
            "excludePoints": self.ui.excludePlace.markupsSelectorComboBox(),
            "boxROI": self.ui.boxPlace.markupsSelectorComboBox(),
            "limitRange": self.ui.limitRangeCheck, "rangeFirst": self.ui.rangeFirst,
            "rangeLast": self.ui.rangeLast, "minIoU": self.ui.minIoU, "minScore": self.ui.minScore,
            "minIntensityAgreement": self.ui.minIntensity})
        # A str path has no connector (ctkPathLineEditToPathConnector takes pathlib types only, whose
        # empty value is "."): the line edit follows the node here and writes it in onCheckpointChanged.
        self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is not None and self.ui.checkpointPath.currentPath != self._parameterNode.checkpoint:
            self.ui.checkpointPath.currentPath = self._parameterNode.checkpoint

    def onCheckpointChanged(self, path: str) -> None:
        if self._parameterNode is not None and self._parameterNode.checkpoint != str(path):
            self._parameterNode.checkpoint = str(path)

    # ---------------------------------------------------------------- helpers
    def setStatus(self, text: str, error: bool = False) -> None:
        show_status(self.ui.statusLabel, text, error)

    def guarded(self, message: str, action: Callable[[], object], waitCursor: bool = False) -> bool:
        """Run ``action``; on failure show ``message`` and the error once and return False.

        ``slicer.util.tryWithErrorDisplay`` shows the error and then re-raises (util.py), which
        would send a second traceback out of the Qt slot; the slot gets False instead."""
        try:
            with slicer.util.tryWithErrorDisplay(message, waitCursor=waitCursor):
                action()
            return True
        except Exception as exc:  # noqa: BLE001 - already shown to the user
            self.setStatus(f"{message}: {exc}", error=True)
            return False

    def _link(self):
        """The server chosen in the Server section (settings in Slicer's application settings, never
        in the scene), configured with the panel's device and checkpoint."""
        from SAMSegmentSlicer import server_link

        env_dir, log_file = server_link.local_paths(slicer.app.slicerUserSettingsFilePath)
        link = server_link.link_from_settings(slicer.app.userSettings(), env_dir, log_file)
        if isinstance(link, server_link.LocalServerLink):
            p = self._parameterNode
            if p is not None:
                link.configure(server_link.server_args(p.device, p.model or None, p.checkpoint or None))
        return link

    def _ensureServer(self) -> bool:
        """Point the logic at the chosen server; for the local one, offer (with consent) to create
        its Python environment, which is never Slicer's own. False when the user declined."""
        from SAMSegmentSlicer import server_link

        link = self._link()
        if isinstance(link, server_link.LocalServerLink) and not link.installed and link.setup_run is None:
            message = _("SAMSegment runs its model in a separate local server with its own Python environment, "
                        "so nothing is installed into Slicer's Python. Create it now in\n{path}?\n\nThis downloads "
                        "PyTorch and a few other packages (about 1 GB without a GPU) and takes several minutes; "
                        "Slicer stays usable meanwhile.").format(path=link.env_dir)
            if not slicer.util.confirmOkCancelDisplay(message):
                self.setStatus(_("The SAMSegment server is not set up; nothing was installed."), error=True)
                return False
            link.setup(_slicer_python())
            self.setStatus(_("Setting up the SAMSegment server environment (log: {log})...").format(log=link.log_file))
        self.logic.use_link(link)
        return True

    def _bind(self) -> bool:
        """Bind the logic to the selected nodes and the chosen server."""
        if not self._ensureServer():
            return False

        def bind() -> None:
            self.logic.configure_from_parameters(self._parameterNode, self.ui.segmentSelector.currentSegmentID())
            if self.ui.segmentSelector.currentSegmentID() != self.logic.segment_id:
                self.ui.segmentSelector.setCurrentSegmentID(self.logic.segment_id)
            self.logic.watch_markups(self.activeView)

        return self.guarded(_("Could not prepare SAMSegment"), bind)

    def activeView(self):
        """The view the last-changed prompt was placed in (its plane contains the point)."""
        return self.logic.active_view(list(slicer.util.getNodesByClass("vtkMRMLSliceNode")))

    # ---------------------------------------------------------------- server section
    def onServerModeChanged(self, index: int) -> None:
        from SAMSegmentSlicer import server_link

        remote = index == 1
        self.ui.serverURL.enabled = self.ui.serverKey.enabled = remote
        slicer.app.userSettings().setValue(server_link.MODE_KEY, "remote" if remote else "local")

    def onServerSettingsEdited(self) -> None:
        from SAMSegmentSlicer import server_link

        settings = slicer.app.userSettings()
        settings.setValue(server_link.REMOTE_URL_KEY, self.ui.serverURL.text.strip())
        settings.setValue(server_link.REMOTE_TOKEN_KEY, self.ui.serverKey.text)

    def loadServerSettings(self) -> None:
        from SAMSegmentSlicer import server_link

        settings = slicer.app.userSettings()
        self.ui.serverURL.text = str(settings.value(server_link.REMOTE_URL_KEY, ""))
        self.ui.serverKey.text = str(settings.value(server_link.REMOTE_TOKEN_KEY, ""))
        remote = str(settings.value(server_link.MODE_KEY, "local")) == "remote"
        self.ui.serverMode.currentIndex = 1 if remote else 0
        self.ui.serverURL.enabled = self.ui.serverKey.enabled = remote

    # ---------------------------------------------------------------- actions
    def onLoadModel(self) -> None:
        if self._bind():
            self.setStatus(_("Connecting to the SAMSegment server; then place the box (click one corner, then the "
                             "opposite corner) on a slice view."))
        self.updateServerStatus()

    def onSegmentChanged(self, segmentID) -> None:
        if self.logic.segmentation_node is not None and segmentID:
            self.guarded(_("Could not select the segment"), lambda: self.logic.set_segment(segmentID))

    def onAccept(self) -> None:
        def accept() -> None:
            n = self.logic.accept()
            self.setStatus(_("Applied {n} voxels to '{name}'. Undo in this panel reverts it.")
                           .format(n=n, name=self.logic.segment_name()))

        self.guarded(_("Could not apply the mask"), accept)

    def onUndo(self) -> None:
        def undo() -> None:
            if self.logic.current is not None:
                self.logic.undo_prompt()  # the previous proposal arrives on the timer
            elif not self.logic.undo_edit():
                self.setStatus(_("Nothing to undo."))

        self.guarded(_("Nothing to undo"), undo)

    def onClear(self) -> None:
        self.logic.clear()
        self.setStatus(_("Prompts cleared."))

    def onPropagate(self) -> None:
        if self.logic.segmentation_node is None and not self._bind():
            return

        def start() -> None:
            last = self._interrupted
            if last is not None and last.segment_id == self.logic.segment_id:
                self._job = self.logic.resume_propagation(last)  # the same request; written slices stay
            else:
                self._job = self.logic.start_propagation(self._parameterNode.direction,
                                                         rules=self.logic.rules_from_parameters(self._parameterNode),
                                                         within_roi=self._parameterNode.withinBox)
            self._interrupted = None

        if self.guarded(_("Could not start propagation"), start):
            self.ui.propagateButton.enabled = False
            self.ui.cancelButton.enabled = True
            self.ui.progressBar.setValue(0)

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel.cancel()
            self.setStatus(_("Cancelling; slices already written stay (one Undo removes them all)."))
        if self._task is not None:
            self._task.cancel.cancel()
            self.setStatus(_("Cancelling {name}; nothing is added to the scene.").format(name=self._task.name))

    def _startTask(self, name, make, finish) -> None:
        """Run the server request ``make(progress, cancel)``; ``finish(result)`` makes the nodes."""
        if self._task is not None or (self.logic.segmentation_node is None and not self._bind()):
            return

        def start() -> None:
            self._task = self.logic.start_task(name, make, finish)

        if self.guarded(_("Could not start {name}").format(name=name), start):
            self.ui.cancelButton.enabled = True
            self.ui.progressBar.setValue(0)
            self.setStatus(_("{name} running on the server...").format(name=name))

    def onEverything(self, volume: bool) -> None:
        from SAMSegmentSlicer import research_nodes

        view = self.logic.current_view or self.activeView()
        if view is None:
            layout = slicer.app.layoutManager()
            if layout is None:
                self.setStatus(_("Place a prompt on the slice to segment first."), error=True)
                return
            views = []
            if not self.guarded(_("Could not read the Red view"), lambda: views.append(
                    self.logic.view_slice(layout.sliceWidget("Red").mrmlSliceNode()))):
                return
            view = views[0]
        kwargs = {"axis": view.axis} if volume else {"view": view}
        self._startTask(_("everything mode"),
                        lambda progress, cancel: research_nodes.everything_flow(self.logic, progress=progress,
                                                                                cancel=cancel, **kwargs),
                        lambda result: research_nodes.labels_to_segmentation(slicer.mrmlScene, self.logic.volume_node,
                                                                             *result))

    def onSAMAug(self) -> None:
        from SAMSegmentSlicer import research_nodes

        axis = self.logic.current_view.axis if self.logic.current_view is not None else 0
        self._startTask(_("SAMAug priors"),
                        lambda progress, cancel: research_nodes.samaug_flow(self.logic, axis, progress=progress,
                                                                            cancel=cancel),
                        lambda priors: research_nodes.priors_to_volumes(self.logic, *priors))

    def onUncertainty(self, checked: bool) -> None:
        from SAMSegmentSlicer import research_nodes

        if not checked:
            if self.logic.preview is not None:
                self.logic.preview.set_uncertainty_visible(False)
            return

        def show(result) -> None:
            view, _mean, entropy = result
            research_nodes.overlay_uncertainty(self.logic, view, entropy)
            share = float((entropy >= research_nodes.UNCERTAIN_ENTROPY_BITS).mean())
            self.setStatus(_("Uncertain pixels outlined in yellow ({share:.1f}% of the slice).")
                           .format(share=100 * share))

        if self.logic.current_prompts is None:
            self.setStatus(_("Segment a slice first; the uncertainty is that of its prompt."), error=True)
            self.ui.uncertaintyCheck.blockSignals(True)
            self.ui.uncertaintyCheck.checked = False
            self.ui.uncertaintyCheck.blockSignals(False)
            return
        self._startTask(_("prompt uncertainty"),
                        lambda progress, cancel: research_nodes.uncertainty_flow(self.logic), show)

    # ---------------------------------------------------------------- adaptation to accepted slices
    def _startAdapterTask(self, message: str, start: Callable[[], object]) -> None:
        """Start an adaptation, or an adapter save/load (``start`` returns the logic's task)."""
        if self._adapterTask is not None or (self.logic.segmentation_node is None and not self._bind()):
            return

        def run() -> None:
            self._adapterTask = start()

        if self.guarded(message, run):
            self.ui.adaptProgressBar.setValue(0)
            self.updateAdaptationSection()

    def onAdapt(self) -> None:
        def start():
            view = self.logic.current_view or self.activeView()
            return self.logic.start_adaptation(view.axis if view is not None else None)

        self._startAdapterTask(_("Could not start the adaptation"), start)

    def onCancelAdaptation(self) -> None:
        if self._adapterTask is not None:
            self._adapterTask.cancel.cancel()
            self.setStatus(_("Cancelling the adaptation; the model in use stays."))

    def onUseStockModel(self) -> None:
        self.logic.use_stock_model()
        self.updateAdaptationSection()

    def onSaveAdapter(self) -> None:
        if not self.logic.adapter_in_use or self.logic.segmentation_node is None:
            self.setStatus(_("No adapter is in use: adapt to accepted slices, or load an adapter, first."), error=True)
            return
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.logic.segment_name()) or "adapter"
        suggested = os.path.join(slicer.app.defaultScenePath, name + ADAPTER_SUFFIX)
        path = qt.QFileDialog.getSaveFileName(None, _("Save adapter"), suggested,
                                              _("SAMSegment adapter (*{suffix})").format(suffix=ADAPTER_SUFFIX))
        if not path:
            return
        path = str(path)
        # the file dialog asked before choosing an existing file; a suffix added here was not asked about
        if not path.lower().endswith(ADAPTER_SUFFIX):
            path += ADAPTER_SUFFIX
            if os.path.exists(path) and not slicer.util.confirmYesNoDisplay(
                    _("{path} exists. Replace it?").format(path=path)):
                return
        self._startAdapterTask(_("Could not save the adapter"),
                               lambda: self.logic.start_save_adapter(path, overwrite=True))

    def onLoadAdapter(self) -> None:
        path = qt.QFileDialog.getOpenFileName(None, _("Load adapter"), slicer.app.defaultScenePath,
                                              _("SAMSegment adapter (*{suffix});;All files (*)")
                                              .format(suffix=ADAPTER_SUFFIX))
        if path:
            self._startAdapterTask(_("Could not load the adapter"), lambda: self.logic.start_load_adapter(str(path)))

    def pollAdaptation(self) -> None:
        """From the timer: follow the adaptation (or adapter save/load); the logic reports its outcome
        through ``on_status``."""
        task = self._adapterTask
        if task is None:
            return
        try:
            done = self.logic.poll_task(task)
        except Exception as exc:  # noqa: BLE001 - cancelled or failed: the logic kept the model in use
            if task.cancel.cancelled:
                self.setStatus(self.logic.adaptation_status)  # "Adaptation cancelled: ... stays."
            else:
                self.setStatus(_("{name} stopped: {error}").format(name=task.name.capitalize(), error=exc), error=True)
            done = True
        count, total, _message = task.progress
        if total:
            self.ui.adaptProgressBar.setValue(int(100 * count / total))
        if done:
            self._adapterTask = None

    def updateAdaptationSection(self) -> None:
        """Buttons enabled only when they make sense; the report line or the training progress."""
        task, logic = self._adapterTask, self.logic
        running = task is not None
        bound = logic.segmentation_node is not None
        self.ui.adaptButton.enabled = not running
        self.ui.adaptCancelButton.enabled = running and task.name == "adaptation"
        self.ui.stockModelButton.enabled = logic.adapter_in_use and not running
        self.ui.saveAdapterButton.enabled = logic.adapter_in_use and bound and not running
        self.ui.loadAdapterButton.enabled = not running
        if running and task.name == "adaptation" and task.progress[2]:
            text = task.progress[2]
        elif running:
            text = logic.adaptation_status
        else:
            text = logic.describe_adapter()
        if self.ui.adaptReport.text != text:
            self.ui.adaptReport.setText(text)

    def onTimer(self) -> None:
        """Every 40 ms: advance the server requests a few milliseconds and show what arrived."""
        if self.logic is None:
            return
        try:
            if self.logic.poll() is not None:
                pred = self.logic.current
                self.setStatus(_("Proposal on slice {index}: {area} px, score {score:.2f}. Accept to keep it.")
                               .format(index=self.logic.current_view.index, area=pred.area, score=pred.score))
        except Exception as exc:  # noqa: BLE001 - shown, not raised into Qt
            self.setStatus(str(exc), error=True)
        if self._task is not None:
            try:
                done = self.logic.poll_task(self._task)
            except Exception as exc:  # noqa: BLE001 - cancelled or failed: a message, no partial nodes
                self.setStatus(_("{name} stopped: {error}").format(name=self._task.name, error=exc), error=True)
                done = True
            count, total, _message = self._task.progress
            if total:
                self.ui.progressBar.setValue(int(100 * count / total))
            if done:
                if self._task.error is None:
                    self.setStatus(_("{name} finished.").format(name=self._task.name))
                self._task = None
                self.ui.cancelButton.enabled = self._job is not None
        if self._job is not None:
            try:
                self.logic.poll_propagation(self._job)
            except Exception as exc:  # noqa: BLE001
                self.setStatus(_("Propagation stopped: {error}").format(error=exc), error=True)
            done, total, _message = self._job.progress
            if total:
                self.ui.progressBar.setValue(int(100 * done / total))
            if self._job.finished:
                if self._job.interrupted is not None:
                    self._interrupted = self._job  # Propagate resumes it
                self.setStatus(self.logic.describe_job(self._job), error=self._job.interrupted is not None)
                self.ui.propagateButton.enabled = True
                self.ui.cancelButton.enabled = False
                self._job = None
        self.pollAdaptation()
        self.updateAdaptationSection()
        self.updateServerStatus()

    def updateServerStatus(self) -> None:
        self.ui.serverStatus.setText(self.logic.server_status())


def _slicer_python() -> str:
    """Slicer's own Python (PythonSlicer), from which the server's separate environment is created."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidate = os.path.join(slicer.app.slicerHome, "bin", name)
    return candidate if os.path.exists(candidate) else sys.executable


def _build_panel(layout):
    """The module panel, built in code (one place, no .ui file to keep in sync)."""

    class UI:
        pass

    ui = UI()
    server = ctk.ctkCollapsibleButton()
    server.text = _("Server")
    layout.addWidget(server)
    form = qt.QFormLayout(server)
    ui.serverMode = qt.QComboBox()
    ui.serverMode.addItems([_("Local (started by Slicer, own Python environment)"), _("Remote server")])
    ui.serverMode.toolTip = _("Where the model runs. The local server starts on first use and stops with Slicer; "
                              "a remote one (e.g. a GPU machine) is shared by a department.")
    form.addRow(_("Engine:"), ui.serverMode)
    ui.serverURL = qt.QLineEdit()
    ui.serverURL.placeholderText = "https://gpu-box.example.org:8765"
    form.addRow(_("URL:"), ui.serverURL)
    ui.serverKey = qt.QLineEdit()
    ui.serverKey.echoMode = qt.QLineEdit.Password
    ui.serverKey.toolTip = _("The server's API key; kept in Slicer's application settings, never in the scene.")
    form.addRow(_("API key:"), ui.serverKey)
    ui.serverStatus = qt.QLabel(_("Not connected"))
    ui.serverStatus.wordWrap = True
    form.addRow(_("Status:"), ui.serverStatus)

    inputs = ctk.ctkCollapsibleButton()
    inputs.text = _("Inputs")
    layout.addWidget(inputs)
    form = qt.QFormLayout(inputs)
    ui.volumeSelector = _node_combo(["vtkMRMLScalarVolumeNode"], _("Volume to segment (never modified)."))
    form.addRow(_("Source volume:"), ui.volumeSelector)
    ui.segmentationSelector = _node_combo(["vtkMRMLSegmentationNode"], _("Segmentation that receives the masks."),
                                          add=True)
    form.addRow(_("Segmentation:"), ui.segmentationSelector)
    ui.segmentSelector = slicer.qMRMLSegmentSelectorWidget()
    ui.segmentSelector.setMRMLScene(slicer.mrmlScene)
    ui.segmentSelector.noneEnabled = True
    ui.segmentSelector.segmentationNodeSelectorVisible = False  # the Segmentation row above selects it
    form.addRow(_("Segment:"), ui.segmentSelector)

    model = ctk.ctkCollapsibleButton()
    model.text = _("Model")
    layout.addWidget(model)
    form = qt.QFormLayout(model)
    ui.modelSelector = qt.QComboBox()
    ui.modelSelector.toolTip = _("LiteMedSAM is packaged and works offline; SAM/MedSAM need a checkpoint file.")
    form.addRow(_("Model:"), ui.modelSelector)
    ui.checkpointPath = ctk.ctkPathLineEdit()
    ui.checkpointPath.filters = ctk.ctkPathLineEdit.Files
    ui.checkpointPath.nameFilters = ["PyTorch checkpoint (*.pth *.pt)"]
    ui.checkpointPath.toolTip = _("For SAM/MedSAM: the weights file, given to the local server (a remote server has "
                                  "its own).")
    form.addRow(_("Checkpoint:"), ui.checkpointPath)
    ui.deviceSelector = qt.QComboBox()
    form.addRow(_("Device:"), ui.deviceSelector)
    ui.windowCheck = qt.QCheckBox(_("Use the volume's window/level"))
    ui.windowCheck.toolTip = _("SAM sees the contrast shown in the views; uncheck for an automatic window.")
    form.addRow(ui.windowCheck)
    ui.marginCheck = qt.QCheckBox(_("Widen boxes by the model's margin"))
    ui.marginCheck.toolTip = (_("LiteMedSAM learnt from loose boxes and under-segments from a box drawn tight to the "
                              "organ; this adds 10 % of the box side. Uncheck to use boxes exactly as drawn."))
    form.addRow(ui.marginCheck)
    ui.loadModelButton = qt.QPushButton(_("Start"))
    ui.loadModelButton.toolTip = _("Connect to the server (starting the local one if needed), send the volume and "
                                   "start watching the prompts.")
    form.addRow(ui.loadModelButton)

    prompts = ctk.ctkCollapsibleButton()
    prompts.text = _("Prompts")
    layout.addWidget(prompts)
    form = qt.QFormLayout(prompts)
    ui.boxPlace = _place_widget("vtkMRMLMarkupsROINode", _(
        "Box around the structure: click the place button, then click one corner and then the opposite corner "
        "on a slice view (Slicer places an ROI with two clicks)."))
    form.addRow(_("Box:"), ui.boxPlace)
    ui.includePlace = _place_widget("vtkMRMLMarkupsFiducialNode", _("Points that must be inside."))
    form.addRow(_("Include points:"), ui.includePlace)
    ui.excludePlace = _place_widget("vtkMRMLMarkupsFiducialNode", _("Points that must be outside."))
    form.addRow(_("Exclude points:"), ui.excludePlace)
    row = qt.QHBoxLayout()
    ui.applyButton = qt.QPushButton(_("Accept"))
    ui.undoButton = qt.QPushButton(_("Undo"))
    ui.clearButton = qt.QPushButton(_("Clear"))
    for b in (ui.applyButton, ui.undoButton, ui.clearButton):
        row.addWidget(b)
    form.addRow(row)

    propagation = ctk.ctkCollapsibleButton()
    propagation.text = _("Propagate")
    layout.addWidget(propagation)
    form = qt.QFormLayout(propagation)
    ui.directionSelector = qt.QComboBox()
    form.addRow(_("Direction:"), ui.directionSelector)
    ui.withinBoxCheck = qt.QCheckBox(_("Keep within the box (3D)"))
    ui.withinBoxCheck.toolTip = _("The box ROI is a 3D box: propagation stays inside it and stops at its ends; with an "
                                  "empty segment its middle slice is segmented first. Resize the ROI in any view, Undo "
                                  "and propagate again.")
    form.addRow(ui.withinBoxCheck)
    ui.limitRangeCheck = qt.QCheckBox(_("Limit to slices"))
    ui.rangeFirst, ui.rangeLast = qt.QSpinBox(), qt.QSpinBox()
    for spin in (ui.rangeFirst, ui.rangeLast):
        spin.maximum = 100000
    row = qt.QHBoxLayout()
    row.addWidget(ui.limitRangeCheck)
    row.addWidget(ui.rangeFirst)
    row.addWidget(ui.rangeLast)
    form.addRow(row)
    ui.minIoU, ui.minScore, ui.minIntensity = (ctk.ctkSliderWidget() for _i in range(3))
    for slider, tip in ((ui.minIoU, _("Stop when the mask overlaps the previous slice's less than this.")),
                        (ui.minScore, _("Stop when the model's predicted quality falls below this.")),
                        (ui.minIntensity, _("Stop when the mask's intensities stop matching the accepted slice."))):
        slider.minimum, slider.maximum, slider.singleStep, slider.decimals = 0.0, 1.0, 0.05, 2
        slider.toolTip = tip
    form.addRow(_("Min IoU with previous:"), ui.minIoU)
    form.addRow(_("Min score:"), ui.minScore)
    form.addRow(_("Min intensity agreement:"), ui.minIntensity)
    ui.propagateButton, ui.cancelButton, ui.progressBar = _job_controls(form, _("Propagate"))

    automatic = ctk.ctkCollapsibleButton()
    automatic.text = _("Automatic and uncertainty")
    automatic.collapsed = True
    layout.addWidget(automatic)
    form = qt.QFormLayout(automatic)
    row = qt.QHBoxLayout()
    ui.everythingSliceButton = qt.QPushButton(_("Everything: this slice"))
    ui.everythingSliceButton.toolTip = _("Grid of prompts on the current slice; one new segment per region found.")
    ui.everythingVolumeButton = qt.QPushButton(_("Everything: all slices"))
    ui.everythingVolumeButton.toolTip = _("Every slice along the view's axis, regions linked across slices.")
    row.addWidget(ui.everythingSliceButton)
    row.addWidget(ui.everythingVolumeButton)
    form.addRow(row)
    ui.samaugButton = qt.QPushButton(_("SAMAug prior maps"))
    ui.samaugButton.toolTip = (_("Segmentation and boundary prior maps (SAMAug, Zhang et al. 2023) as new volumes "
                               "with the source geometry."))
    form.addRow(ui.samaugButton)
    ui.uncertaintyCheck = qt.QCheckBox(_("Show prompt uncertainty"))
    ui.uncertaintyCheck.toolTip = (_("Re-run the current prompt with jittered boxes/points and outline the pixels "
                                   "where the results disagree."))
    form.addRow(ui.uncertaintyCheck)

    adaptation = ctk.ctkCollapsibleButton()
    adaptation.text = _("Adapt to this scan")
    adaptation.collapsed = True
    layout.addWidget(adaptation)
    form = qt.QFormLayout(adaptation)
    note = qt.QLabel(_("Fine-tunes the model's mask decoder to the slices you accepted for the selected segment "
                       "(2-3 slices spread over the structure; about 15 s on a laptop CPU). A held-back slice decides "
                       "whether the adapted model is kept. It is for this structure of this scan: selecting another "
                       "segment or volume returns to the stock model."))
    note.wordWrap = True
    form.addRow(note)
    ui.adaptButton, ui.adaptCancelButton, ui.adaptProgressBar = _job_controls(form, _("Adapt to accepted slices"))
    ui.adaptButton.toolTip = _("Train on the selected segment's accepted slices along the view's axis; prompts, "
                               "propagation and everything mode then use the adapted model when it does better.")
    ui.adaptReport = qt.QLabel(_("Stock model in use."))
    ui.adaptReport.wordWrap = True
    form.addRow(_("Model:"), ui.adaptReport)
    row = qt.QHBoxLayout()
    ui.stockModelButton = qt.QPushButton(_("Use stock model"))
    ui.stockModelButton.toolTip = _("Back to the model as shipped, for every prompt and job.")
    ui.saveAdapterButton = qt.QPushButton(_("Save adapter..."))
    ui.saveAdapterButton.toolTip = _("Save the adapted decoder (a signed file) for the next scan of the same kind.")
    ui.loadAdapterButton = qt.QPushButton(_("Load adapter..."))
    ui.loadAdapterButton.toolTip = _("Use a saved adapter for the selected segment (same model; signed on this machine "
                                     "or with the site's key).")
    ui.stockModelButton.enabled = ui.saveAdapterButton.enabled = False  # until an adapter is in use
    for button in (ui.stockModelButton, ui.saveAdapterButton, ui.loadAdapterButton):
        row.addWidget(button)
    form.addRow(row)

    ui.statusLabel = qt.QLabel(_("Select a volume, press Start, then place a box (two clicks: opposite corners) "
                                 "on a slice view."))
    ui.statusLabel.wordWrap = True
    layout.addWidget(ui.statusLabel)
    layout.addStretch(1)
    return ui


def _job_controls(form, label):
    """A long job's controls added to ``form``: its start button (``label``) beside a Cancel button, which
    stays disabled until the job runs, and a progress bar below them. Returns (start, cancel, progress)."""
    start, cancel = qt.QPushButton(label), qt.QPushButton(_("Cancel"))
    cancel.enabled = False
    row = qt.QHBoxLayout()
    row.addWidget(start)
    row.addWidget(cancel)
    form.addRow(row)
    progress = qt.QProgressBar()
    form.addRow(progress)
    return start, cancel, progress


def _node_combo(classes, tip, add=False):
    combo = slicer.qMRMLNodeComboBox()
    combo.nodeTypes = classes
    combo.selectNodeUponCreation = True
    combo.addEnabled = add
    combo.removeEnabled = False
    combo.noneEnabled = add
    combo.showHidden = False
    combo.setMRMLScene(slicer.mrmlScene)
    combo.toolTip = tip
    return combo


def _place_widget(node_class, tip):
    widget = slicer.qSlicerSimpleMarkupsWidget()
    widget.setMRMLScene(slicer.mrmlScene)
    widget.markupsSelectorComboBox().nodeTypes = [node_class]
    # Default True: each node the parameter node writes into the combo would start place mode.
    widget.enterPlaceModeOnNodeChange = False
    widget.toolTip = tip
    return widget


# --------------------------------------------------------------------------------------------- logic
class SAMSegmentLogic(SAMSegmentCore, ScriptedLoadableModuleLogic):
    """Scripted-module logic; all behaviour is SAMSegmentCore's, usable from the Python console.

    SAMSegmentCore comes first in the bases: ScriptedLoadableModuleLogic.__init__ calls
    ``super().__init__()``, which is then ``object.__init__``, so each initialiser runs exactly once.
    """

    def __init__(self) -> None:
        SAMSegmentCore.__init__(self, slicer.mrmlScene, slicer.app.applicationLogic(),
                                segment_editor=segmentEditorWidget)
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SAMSegmentParameterNode(super().getParameterNode())


# --------------------------------------------------------------------------------------------- test
class SAMSegmentTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: the module logic and the SAM effect on a generated oblique volume.

    Headless: Testing/SAMSegmentSlicer/slicer_selftest.py, run by the command in the README.
    """

    def setUp(self) -> None:
        """A clean scene and a server: the one chosen in the module's Server section (the local one
        must have been set up there; the test never downloads anything)."""
        from SAMSegmentSlicer import server_link

        slicer.mrmlScene.Clear()
        problem = check_supported((slicer.app.majorVersion, slicer.app.minorVersion), sys.version_info[:2])
        if problem is not None:
            self.skipTest(problem)
        env_dir, log_file = server_link.local_paths(slicer.app.slicerUserSettingsFilePath)
        self.link = server_link.link_from_settings(slicer.app.userSettings(), env_dir, log_file)
        if isinstance(self.link, server_link.LocalServerLink) and not self.link.installed:
            self.skipTest("the SAMSegment server environment is not set up (module panel: Start)")

    def runTest(self) -> None:
        self.setUp()
        self.test_logic_box_accept_propagate_undo()
        self.setUp()
        self.test_segment_editor_effect()

    def test_logic_box_accept_propagate_undo(self) -> None:
        from SAMSegmentSlicer.selftest import run_logic_flow

        self.delayDisplay("SAMSegment logic: box, accept, propagate, undo")
        logic = SAMSegmentLogic()
        logic.use_link(self.link)
        report = run_logic_flow(slicer.mrmlScene, logic)
        self.assertGreater(report["slice_dice"], 0.9)
        self.assertGreater(report["volume_dice"], 0.85)
        self.assertTrue(report["anchor_kept"])
        self.assertTrue(report["undo_exact"])
        self.assertTrue(report["source_unchanged"])
        self.delayDisplay("Logic test passed")

    def test_segment_editor_effect(self) -> None:
        from SAMSegmentSlicer.selftest import run_effect_flow

        self.delayDisplay("SAM Segment Editor effect: drag a box, apply, undo")
        report = run_effect_flow(slicer.mrmlScene)
        self.assertGreater(report["slice_dice"], 0.9)
        self.assertTrue(report["undo_exact"])
        self.delayDisplay("Effect test passed")
