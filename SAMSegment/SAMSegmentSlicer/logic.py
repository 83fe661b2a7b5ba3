"""The SAMSegment logic: MRML nodes in, engine calls, masks written back to segments.

Usable from Slicer's Python console without any widget::

    from SAMSegmentSlicer.logic import SAMSegmentCore
    core = SAMSegmentCore(slicer.mrmlScene)
    core.set_inputs(volumeNode, segmentationNode)
    view = core.view_slice(slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode())
    core.segment(view, Prompts(box=[40, 30, 90, 80]))
    core.accept()
    core.propagate("both")

Threads: the engine's inference worker and the propagation/prompt threads never touch MRML. They
hand results to queues that ``poll()`` drains on the calling (GUI) thread, where all node writes
happen. Headless callers can use the blocking variants, which write on the calling thread too.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from SAMSegmentLib.errors import SAMSegmentError
from SAMSegmentLib.preprocessing import IntensityWindow
from SAMSegmentLib.prompts import Prompts
from SAMSegmentLib.propagation import PromptPolicy, PropagationResult, SliceOutcome, StopRules, propagate
from SAMSegmentLib.volume import SliceRef
from SAMSegmentLib.worker import PRIORITY_INTERACTIVE, CancelToken

from .geometry import ViewSlice, vtk_to_numpy_matrix, view_slice as _view_slice
from .markups_prompts import MarkupsPrompts
from .preview import PreviewOverlay
from .segment_io import EditSink, SegmentWriter, segment_array

log = logging.getLogger("SAMSegment")

WINDOW_FROM_DISPLAY = "display"


def window_from_display(volume_node) -> IntensityWindow | None:
    """The window/level the user sees in the slice views, so SAM sees the same contrast."""
    display = volume_node.GetDisplayNode() if volume_node is not None else None
    if display is None or not hasattr(display, "GetWindow"):
        return None
    width, level = float(display.GetWindow()), float(display.GetLevel())
    if not np.isfinite(width) or not np.isfinite(level) or width <= 0:
        return None
    return IntensityWindow.from_level_width(level, width, source="Slicer display window/level")


@dataclass
class PropagationJob:
    """A propagation running on a background thread; ``poll()`` writes its slices on the GUI thread."""

    axis: int
    segment_id: str
    cancel: CancelToken = field(default_factory=CancelToken)
    slices: "queue.Queue[tuple[int, np.ndarray, SliceOutcome]]" = field(default_factory=queue.Queue)
    progress: tuple[int, int, str] = (0, 0, "")
    result: PropagationResult | None = None
    error: BaseException | None = None
    written: list[int] = field(default_factory=list)
    thread: threading.Thread | None = None
    finished: bool = False  # set by poll() once the thread ended and every slice is written


@dataclass
class BackgroundTask:
    """Engine work on a thread; ``finish(result)`` then runs on the GUI thread in ``poll_task``."""

    name: str
    finish: Callable[[Any], Any]
    cancel: CancelToken = field(default_factory=CancelToken)
    progress: tuple[int, int, str] = (0, 0, "")
    result: Any = None
    output: Any = None
    error: BaseException | None = None
    thread: threading.Thread | None = None
    finished: bool = False


class SAMSegmentCore:
    """One volume, one segmentation, one target segment, one engine session."""

    def __init__(self, scene=None, app_logic=None, segment_editor: Callable[[], Any] | None = None,
                 autoload: bool = True) -> None:
        """``segment_editor``: returns the Segment Editor module's editor widget if it exists (its
        undo state is saved before our writes into the segmentation it edits); ``autoload``: load
        the model on first use (False for the SAM effect, which loads it on activation, never inside
        a mouse handler)."""
        import slicer

        self.scene = scene if scene is not None else slicer.mrmlScene
        self.app_logic = app_logic
        self.segment_editor = segment_editor
        self.autoload = autoload
        self.session: Any = None
        self.model_key: tuple[Any, ...] | None = None
        self.volume_node = None
        self.segmentation_node = None
        self.segment_id: str | None = None
        self.window: IntensityWindow | None = None
        self.prompts = MarkupsPrompts(self.scene)
        self.preview: PreviewOverlay | None = None
        self.writer: SegmentWriter | None = None
        self._window_request: Any = WINDOW_FROM_DISPLAY
        self._owns_session = True
        self.current = None  # latest Prediction shown in the preview
        self.current_view: ViewSlice | None = None
        self.write_mode = "replace"
        self.last_timing: dict[str, float] = {}
        self._last_index: dict[int, int] = {}
        self._scroll: int = 0
        self.on_error: Callable[[BaseException], None] | None = None
        self.last_error: BaseException | None = None
        self._pending: "queue.Queue[tuple[int, Any]]" = queue.Queue()
        self._request_generation = 0
        self._request_thread: threading.Thread | None = None
        self._request_lock = threading.Lock()
        self._next_request: tuple[int, ViewSlice, Prompts] | None = None

    # ---------------------------------------------------------------- model
    def load_model(self, model_id: str | None = None, checkpoint: str | None = None, device: str | None = None,
                   runtime: str | None = None) -> Any:
        """Create (or keep) the engine session; the volume is handed over to a new session."""
        from SAMSegmentLib.model_registry import default_model_id
        from SAMSegmentLib.session import SegmentationSession

        model_id = model_id or default_model_id()
        key = (model_id, str(checkpoint or ""), device or "", runtime or "")
        if self.session is not None and self.model_key == key:
            return self.session
        kwargs: dict[str, Any] = {}
        if runtime:
            kwargs["runtime"] = runtime
        session = SegmentationSession(model=model_id, checkpoint=checkpoint, device=device, **kwargs)
        if self.session is not None and self._owns_session:
            self.session.close()
        self.session, self.model_key, self._owns_session = session, key, True
        if self.volume_node is not None:
            self._load_volume()
        return session

    def use_session(self, session: Any, own: bool = True) -> None:
        """Adopt an existing engine session (e.g. one whose model is already loaded).

        ``own=False`` shares it (the SAM effect borrowing the module's session and its cache):
        then ``close()`` leaves it running for its owner.
        """
        if self.session is not None and self.session is not session and self._owns_session:
            self.session.close()
        self.session, self.model_key, self._owns_session = session, ("external", id(session)), own
        if self.volume_node is not None:
            self._load_volume()

    def close(self) -> None:
        self.cancel_requests()
        if self.session is not None and self._owns_session:
            self.session.close()
        self.prompts.unobserve()
        if self.preview is not None:
            self.preview.remove()
        if self.writer is not None:
            self.writer.close()

    def release_scene(self, *running: PropagationJob | BackgroundTask | None) -> None:
        """The scene is about to close: cancel ``running`` work and forget every node.

        Nothing is written afterwards: a cancelled propagation's remaining slices and a task's
        ``finish`` are dropped instead of landing in the next scene. The model stays loaded.
        """
        for work in running:
            if work is not None:
                work.cancel.cancel()
                work.finished = True
        self.cancel_requests()
        self.prompts.unobserve()
        self.prompts = MarkupsPrompts(self.scene)
        self.current, self.current_view = None, None
        self.writer = self.preview = None
        self.volume_node = self.segmentation_node = None
        self.segment_id = None

    # ---------------------------------------------------------------- inputs
    def set_inputs(self, volume_node, segmentation_node, segment_id: str | None = None,
                   window: IntensityWindow | str | tuple[float, float] | None = WINDOW_FROM_DISPLAY,
                   sink: EditSink | None = None) -> str:
        """Bind the source volume, the segmentation and the target segment (created when missing).

        ``sink``: where writes go (the SAM effect passes itself); None = the module's own Segment
        Editor logic, which follows the Segment Editor's masking/overlap settings.
        Returns the target segment's id."""
        if volume_node is None:
            raise SAMSegmentError("No source volume selected", "select the volume to segment")
        if volume_node.GetImageData() is None:
            raise SAMSegmentError(f"Volume '{volume_node.GetName()}' has no image data", "load the image first")
        if segmentation_node is None:
            segmentation_node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                             f"{volume_node.GetName()} segmentation")
            segmentation_node.CreateDefaultDisplayNodes()
        changed_volume = volume_node is not self.volume_node or window != self._window_request
        if self.writer is not None and (self.writer.segmentation_node is not segmentation_node
                                        or self.writer.volume_node is not volume_node
                                        or (sink is not None and sink is not self.writer.sink)):
            self.writer.close()
            self.writer = None
        self.volume_node, self.segmentation_node = volume_node, segmentation_node
        self._window_request = window
        if self.writer is None:
            self.writer = SegmentWriter(self.scene, segmentation_node, volume_node, self.app_logic, sink=sink,
                                        segment_editor=self.segment_editor)
        self.segment_id = self.writer.ensure_segment(segment_id, "SAM")
        if self.preview is None or self.preview.volume_node is not volume_node:
            if self.preview is not None:
                self.preview.remove()
            self.preview = PreviewOverlay(self.scene, volume_node)
        color = self.segmentation_node.GetSegmentation().GetSegment(self.segment_id).GetColor()
        self.preview.set_color(tuple(color))
        if changed_volume and self.session is not None:
            self._load_volume()
        return self.segment_id

    def set_segment(self, segment_id: str) -> None:
        if self.segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise SAMSegmentError(f"Segment '{segment_id}' does not exist", "pick a segment of the segmentation")
        self.segment_id = segment_id
        if self.preview is not None:
            self.preview.set_color(tuple(self.segmentation_node.GetSegmentation().GetSegment(segment_id).GetColor()))

    def _load_volume(self) -> None:
        import slicer

        array = slicer.util.arrayFromVolume(self.volume_node)
        window = self._window_request
        if window == WINDOW_FROM_DISPLAY:
            window = window_from_display(self.volume_node)  # None -> automatic window
        self.window = self.session.set_volume(np.array(array, copy=True), window)
        self.current, self.current_view = None, None

    def _require(self) -> None:
        if self.session is None:
            if not self.autoload:
                raise SAMSegmentError("The SAM model is not loaded", "select the SAM effect again to load it")
            self.load_model()
        if self.volume_node is None or self.writer is None:
            raise SAMSegmentError("No source volume/segmentation selected", "call set_inputs(volume, segmentation)")
        if not self.session.has_volume:
            self._load_volume()

    # ---------------------------------------------------------------- views
    def view_slice(self, slice_node) -> ViewSlice:
        """The volume slice shown in ``slice_node`` (axis from the view's plane, not its name)."""
        self._require()
        return _view_slice(self.volume_node, vtk_to_numpy_matrix(slice_node.GetSliceToRAS()), self.session.shape)

    def active_view(self, slice_nodes: list) -> ViewSlice | None:
        """The view whose plane holds the prompt the user changed last (None if none does).

        Slicer places and drags markups in the plane of the view under the mouse, so the plane
        containing the point identifies the view without asking Qt which widget has focus.
        """
        ras = self.prompts.last_changed_ras
        if ras is None or not slice_nodes:
            return self.current_view
        best, best_distance = None, np.inf
        for node in slice_nodes:
            m = vtk_to_numpy_matrix(node.GetSliceToRAS())
            normal = m[:3, 2] / np.linalg.norm(m[:3, 2])
            distance = abs(float(normal @ (ras - m[:3, 3])))
            if distance < best_distance:
                best, best_distance = node, distance
        return self.view_slice(best)

    def _note_view(self, view: ViewSlice) -> int:
        """Remember the scrolling direction per axis, for look-ahead encoding."""
        last = self._last_index.get(view.axis)
        if last is not None and last != view.index:
            self._scroll = 1 if view.index > last else -1
        self._last_index[view.axis] = view.index
        return self._scroll

    # ---------------------------------------------------------------- prompting
    def warm(self, view: ViewSlice) -> Any:
        """Start encoding ``view``'s slice on the worker, ahead of the neighbours it prefetches
        (nothing when it is cached); the future resolves when the embedding is in the cache."""
        self._require()
        return self.session.encode_async(view.ref, PRIORITY_INTERACTIVE)

    def segment(self, view: ViewSlice, prompts: Prompts, refine: bool = True) -> Any:
        """Decode ``prompts`` on ``view``'s slice and show the result as the preview (blocking)."""
        self._require()
        t0 = time.perf_counter()
        prediction = None if prompts.is_empty else self.session.predict(view.ref, prompts, refine=refine)
        t1 = time.perf_counter()
        self._present(view, prediction)
        self.last_timing = {"engine_s": t1 - t0, "mrml_s": time.perf_counter() - t1}
        return prediction

    def _present(self, view: ViewSlice, prediction: Any) -> None:
        """Show ``prediction`` as the preview (None clears it) and encode neighbours ahead of the user."""
        self.current, self.current_view = prediction, view
        if prediction is None:
            if self.preview is not None:
                self.preview.clear()
            return
        self.preview.show(view.axis, view.index, prediction.mask)
        self.session.prefetch(view.ref, radius=2, direction=self._note_view(view))

    def update_from_markups(self, view: ViewSlice) -> Any:
        """Re-run the decoder with the markups prompts on ``view``'s slice (blocking)."""
        self._require()
        t0 = time.perf_counter()
        prompts = self.prompts.prompts_for(self.volume_node, view.axis, view.index)
        t_prompts = time.perf_counter() - t0
        prediction = self.segment(view, prompts, refine=False)
        self.last_timing["prompts_s"] = t_prompts
        return prediction

    def watch_markups(self, view_provider: Callable[[], ViewSlice | None], asynchronous: bool = True) -> None:
        """Re-segment whenever a markups prompt changes; ``view_provider`` names the active view."""
        self.prompts.ensure_nodes()

        def changed() -> None:
            view = view_provider()
            if view is None:
                return
            # VTK observers swallow exceptions; a bad prompt must reach the user instead.
            self.last_error = None
            try:
                if asynchronous:
                    self.request(view, self.prompts.prompts_for(self.volume_node, view.axis, view.index))
                else:
                    self.update_from_markups(view)
            except SAMSegmentError as exc:
                self.last_error = exc
                self.current = None
                if self.preview is not None:
                    self.preview.clear()
                if self.on_error is not None:
                    self.on_error(exc)

        self.prompts.observe(changed)

    # Asynchronous prompting: the GUI never waits for an encoder. Newer requests replace older ones.
    def request(self, view: ViewSlice, prompts: Prompts) -> int:
        self._require()
        with self._request_lock:
            self._request_generation += 1
            self._next_request = (self._request_generation, view, prompts)
            if self._request_thread is None or not self._request_thread.is_alive():
                self._request_thread = threading.Thread(target=self._serve_requests, name="samsegment-prompts",
                                                        daemon=True)
                self._request_thread.start()
            return self._request_generation

    def _serve_requests(self) -> None:
        while True:
            with self._request_lock:
                job, self._next_request = self._next_request, None
            if job is None:
                return
            generation, view, prompts = job
            try:
                result = None if prompts.is_empty else self.session.predict(view.ref, prompts, refine=False)
                self._pending.put((generation, (view, result, None)))
            except BaseException as exc:  # noqa: BLE001 - handed to the GUI thread, not lost
                self._pending.put((generation, (view, None, exc)))

    def cancel_requests(self) -> None:
        with self._request_lock:
            self._request_generation += 1
            self._next_request = None

    def poll(self) -> Any:
        """On the GUI thread: show the newest finished prompt result; raise its error if it failed."""
        newest = None
        while True:
            try:
                newest = self._pending.get_nowait()
            except queue.Empty:
                break
        if newest is None:
            return None
        generation, (view, prediction, error) = newest
        if generation != self._request_generation:
            return None  # superseded by a newer request still running
        if error is not None:
            raise error
        self._present(view, prediction)
        return prediction

    def wait_for_requests(self, timeout: float = 60.0) -> Any:
        """Block until the latest request is shown (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            thread = self._request_thread
            finished = thread is None or not thread.is_alive()  # checked before draining: nothing left behind
            self.poll()
            if finished and self._pending.empty():
                return self.current
            time.sleep(0.005)
        raise SAMSegmentError("Segmentation request did not finish in time", "check the Python console for errors")

    def undo_prompt(self) -> Any:
        """Back to the previous proposal on the current slice (the preview only; segments untouched)."""
        if self.current_view is None:
            return None
        previous = self.session.undo(self.current_view.ref)
        self._present(self.current_view, previous)
        return previous

    def clear(self) -> None:
        """Drop the proposal and the prompts; the segment keeps what was applied."""
        self.cancel_requests()
        if self.current_view is not None and self.session is not None:
            self.session.reset(self.current_view.ref)
        self.current = None
        if self.preview is not None:
            self.preview.clear()
        self.prompts.blocked = True
        try:
            self.prompts.clear()
        finally:
            self.prompts.blocked = False

    # ---------------------------------------------------------------- applying
    def accept(self, mode: str | None = None) -> int:
        """Write the previewed mask into the target segment (one undo step); returns voxels set."""
        if self.current is None or self.current_view is None:
            raise SAMSegmentError("There is no proposal to apply", "place a point or a box on a slice first")
        view = self.current_view
        self.writer.write_slice(self.segment_id, view.axis, view.index, self.current.mask, mode or self.write_mode)
        self.preview.clear()
        written = int(np.count_nonzero(self.current.mask))
        self.current = None
        return written

    def undo_edit(self) -> bool:
        """Undo the last write into the segmentation (accept or a whole propagation)."""
        return self.writer.undo()

    # ---------------------------------------------------------------- propagation
    def anchors(self, axis: int) -> dict[int, np.ndarray]:
        """Non-empty slices of the target segment along ``axis``: never overwritten by propagation."""
        arr = segment_array(self.segmentation_node, self.segment_id, self.volume_node)
        filled = np.nonzero(arr.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        return {int(i): np.take(arr, int(i), axis=axis).astype(bool) for i in filled}

    def start_propagation(self, direction: str = "both", axis: int | None = None, rules: StopRules | None = None,
                          policy: PromptPolicy | None = None) -> PropagationJob:
        """Propagate the target segment from its non-empty slices on a background thread.

        One undo state is saved before the first slice is written, so the whole run (even a
        cancelled one) is undone in one step. Call ``poll_propagation`` from the GUI thread.
        """
        self._require()
        if axis is None:
            axis = self.current_view.axis if self.current_view is not None else 0
        anchors = self.anchors(axis)
        if not anchors:
            raise SAMSegmentError("The target segment is empty along this view's axis",
                                  "segment and apply at least one slice, then propagate")
        self.writer.save_state_for_undo()
        job = PropagationJob(axis=axis, segment_id=self.segment_id)

        def on_slice(ref: SliceRef, mask: np.ndarray, outcome: SliceOutcome) -> None:
            job.slices.put((ref.index, mask, outcome))

        def progress(done: int, total: int, message: str) -> None:
            job.progress = (done, total, message)

        def run() -> None:
            try:
                job.result = propagate(self.session, axis, anchors, direction, rules=rules, policy=policy,
                                       on_slice=on_slice, progress=progress, cancel=job.cancel)
            except BaseException as exc:  # noqa: BLE001 - surfaced by poll_propagation
                job.error = exc

        job.thread = threading.Thread(target=run, name="samsegment-propagation", daemon=True)
        job.thread.start()
        return job

    def poll_propagation(self, job: PropagationJob) -> list[int]:
        """Write every slice decided so far (GUI thread); mark the job finished when it is done."""
        alive = job.thread is not None and job.thread.is_alive()
        written = []
        while True:
            try:
                index, mask, _ = job.slices.get_nowait()
            except queue.Empty:
                break
            self.writer.write_slice(job.segment_id, job.axis, index, mask, "replace", save_undo=False)
            job.written.append(index)
            written.append(index)
        if not alive and job.slices.empty():
            job.finished = True
            if job.error is not None:
                error, job.error = job.error, None
                raise error
        return written

    def propagate(self, direction: str = "both", axis: int | None = None, rules: StopRules | None = None,
                  policy: PromptPolicy | None = None, cancel_after: int | None = None,
                  progress: Callable[[int, int, str], None] | None = None) -> PropagationJob:
        """Blocking propagation for the console and tests; ``cancel_after`` cancels after N written slices."""
        job = self.start_propagation(direction, axis, rules, policy)
        while not job.finished:
            self.poll_propagation(job)
            if progress is not None:
                progress(*job.progress)
            if cancel_after is not None and len(job.written) >= cancel_after:
                job.cancel.cancel()
            time.sleep(0.01)
        return job

    # ---------------------------------------------------------------- long engine tasks
    def start_task(self, name: str, compute: Callable[..., Any], finish: Callable[[Any], Any]) -> BackgroundTask:
        """Run ``compute(progress=..., cancel=...)`` on a thread; MRML work goes in ``finish``."""
        self._require()
        task = BackgroundTask(name, finish)

        def progress(done: int, total: int, message: str) -> None:
            task.progress = (done, total, message)

        def run() -> None:
            try:
                task.result = compute(progress=progress, cancel=task.cancel)
            except BaseException as exc:  # noqa: BLE001 - surfaced by poll_task
                task.error = exc

        task.thread = threading.Thread(target=run, name=f"samsegment-{name}", daemon=True)
        task.thread.start()
        return task

    def poll_task(self, task: BackgroundTask) -> bool:
        """On the GUI thread: True once the task ended (its ``finish`` ran, or its error is raised)."""
        if task.finished:
            return True
        if task.thread is not None and task.thread.is_alive():
            return False
        task.finished = True
        if task.error is not None:
            raise task.error
        task.output = task.finish(task.result)
        return True

    def run_task(self, name: str, compute: Callable[..., Any], finish: Callable[[Any], Any]) -> Any:
        """Blocking variant for the console and tests."""
        task = self.start_task(name, compute, finish)
        while not self.poll_task(task):
            time.sleep(0.01)
        return task.output

    # ---------------------------------------------------------------- module panel support
    @staticmethod
    def model_ids() -> list[str]:
        """The models of the registry, for the model selector."""
        from SAMSegmentLib.model_registry import load_registry

        return list(load_registry())

    @staticmethod
    def default_model() -> str:
        """The registry's default model (LiteMedSAM: packaged, works offline)."""
        from SAMSegmentLib.model_registry import default_model_id

        return default_model_id()

    @staticmethod
    def ensure_dependencies(confirm: Callable[[str], bool]) -> bool:
        """Install missing packages with the user's consent (PyTorch through its extension);
        True when everything is present. Raises DependencyError when installing failed."""
        import slicer

        from . import dependencies

        install_torch = None
        try:
            import PyTorchUtils  # the PyTorch extension

            torch_logic = PyTorchUtils.PyTorchUtilsLogic()
            install_torch = lambda: torch_logic.installTorch(askConfirmation=False,  # noqa: E731
                                                             torchVersionRequirement=">=2.1")
        except ImportError:
            pass
        return dependencies.ensure(confirm, install_torch, slicer.util.pip_install)

    def set_box_margin(self, enabled: bool) -> None:
        """Widen the user's boxes by the model's margin (models.json), or take them as drawn; the
        next prompt uses it. Before a model is loaded there is nothing to set."""
        if self.session is not None:
            self.session.box_margin = self.session.backend.spec.box_margin if enabled else 0.0

    def configure_from_parameters(self, params: Any, segment_id: str | None = None) -> None:
        """Load model, volume, segmentation and markups named by the module's parameter node."""
        device = None if params.device == "auto" else params.device
        self.load_model(params.model or None, params.checkpoint or None, device)
        self.set_box_margin(getattr(params, "boxMargin", True))
        window = WINDOW_FROM_DISPLAY if params.windowFromDisplay else None
        sid = self.set_inputs(params.inputVolume, params.segmentation, segment_id or params.segmentID or None,
                              window)
        params.segmentation = self.segmentation_node
        params.segmentID = sid
        self.prompts.set_nodes(params.includePoints, params.excludePoints, params.boxROI)
        self.prompts.ensure_nodes()
        params.includePoints, params.excludePoints, params.boxROI = (
            self.prompts.include_node, self.prompts.exclude_node, self.prompts.roi_node)

    @staticmethod
    def rules_from_parameters(params: Any) -> StopRules:
        rules = StopRules()
        rules.min_iou = float(params.minIoU)
        rules.min_score = float(params.minScore)
        rules.min_intensity_agreement = float(params.minIntensityAgreement)
        if params.limitRange:
            rules.index_range = (int(params.rangeFirst), int(params.rangeLast))
        return rules

    def segment_name(self) -> str:
        segment = self.segmentation_node.GetSegmentation().GetSegment(self.segment_id)
        return segment.GetName() if segment is not None else str(self.segment_id)

    @staticmethod
    def describe_job(job: PropagationJob) -> str:
        """One line for the status bar: how many slices, and why each direction stopped."""
        if job.result is None:
            return f"Propagation wrote {len(job.written)} slices."
        stops = "; ".join(f"{'up' if s.direction > 0 else 'down'} from {s.anchor}: {s.reason.value}"
                          for s in job.result.stops)
        head = "Propagation cancelled" if job.result.cancelled else "Propagation done"
        return f"{head}: {len(job.written)} slices written ({stops}). One Undo removes them all."

    # ---------------------------------------------------------------- status
    def cache_status(self) -> dict[str, float]:
        if self.session is None:
            return {"slices": 0, "mib": 0.0}
        cache = self.session.cache
        return {"slices": len(cache), "mib": cache.bytes_used / 2**20}
