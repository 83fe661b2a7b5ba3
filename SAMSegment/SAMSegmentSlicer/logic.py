"""The SAMSegment logic: MRML nodes in, requests to a SAMSegment server, masks written back to segments.

The engine never runs in Slicer's process: no torch, no model, no worker threads here. Every
engine call is a request to a ``samsegment serve`` server (the local one Slicer starts for itself,
or a remote one; see ``server_link``), made with ``SAMSegmentLib.client`` over non-blocking
sockets. ``poll()``, called from the module's 40 ms timer (or the effect's), advances the requests
a few milliseconds at a time and does every MRML write on the calling thread. Headless callers
(the Python console, tests) use the blocking variants, which run the same requests to their end.

Usable from Slicer's Python console without any widget::

    from SAMSegmentSlicer.logic import SAMSegmentCore
    core = SAMSegmentCore(slicer.mrmlScene)
    core.use_server("http://127.0.0.1:8765", token)        # or core.use_link(local server link)
    core.set_inputs(volumeNode, segmentationNode)
    view = core.view_slice(slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode())
    core.segment(view, Prompts(box=[40, 30, 90, 80]))
    core.accept()
    core.propagate("both")
    core.adapt()                        # fine-tune the decoder to the accepted slices of this segment
    core.save_adapter("/tmp/liver.samadapter")
    core.use_stock_model()

Requests that change the server session's state (volume, prompts, refinement, undo, reset, job
starts) go through one ordered lane; a newer prompt replaces one still waiting. A job's progress is
followed beside the lane, so the user can keep prompting while a propagation runs.

Adaptation to accepted slices (``start_adaptation``) takes its place in the lane like a job start and
then runs beside it: prompts are served meanwhile (with the model in use until the adapted one is
kept), while what must see its outcome (a volume, job and task starts, "use stock model", adapter
files) waits behind it in order. An adapter is for one structure of one scan: selecting another
segment, volume or window returns to the stock model, with a status message saying so.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from SAMSegmentLib.client import (Flow, Operation, PropagationCollector, PropagationInterrupted, RemoteSession,
                                  ServerError, ServerTimeout, ServerUnreachable)
from SAMSegmentLib.adaptation import AdaptationReport, AdaptSettings, read_adapter_file
from SAMSegmentLib.errors import CancelledError, SAMSegmentError
from SAMSegmentLib.preprocessing import IntensityWindow
from SAMSegmentLib.prompts import Prompts
from SAMSegmentLib.propagation import PropagationResult, SliceOutcome, StopRules
from SAMSegmentLib.volume import SliceRef
from SAMSegmentLib.worker import CancelToken

from .geometry import ViewSlice, vtk_to_numpy_matrix, view_slice as _view_slice
from .markups_prompts import MarkupsPrompts
from .preview import PreviewOverlay
from .segment_io import EditSink, SegmentWriter, segment_array
from .server_link import RemoteServer

log = logging.getLogger("SAMSegment")

WINDOW_FROM_DISPLAY = "display"
# A propagation interrupted by a local server that died is resumed at most this many times.
MAX_RESUMES = 3
# The suffix the module suggests for saved adapters.
ADAPTER_SUFFIX = ".samadapter"
# Adaptation trains on at most this many of a segment's slices (spread over them): each step decodes
# every one twice, so the time grows with the count; 4 keeps an adaptation near the 3-slice figure
# of bench/adapt.py on a laptop CPU (a propagated segment of 60 slices would take minutes per step).
MAX_ADAPT_SLICES = 4
# Lane requests that must see an adaptation's outcome: while one runs beside the lane they wait (in
# order); prompts, look-ahead encodes and undo pass them. A volume waits too, and nothing passes it.
AFTER_ADAPTATION = frozenset({"job", "task", "model", "adapt"})


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
    """A propagation on the server; ``poll_propagation()`` writes its slices on the GUI thread.

    ``interrupted``: the slices received before the server went away (``resume_propagation``
    continues from there); ``resumes``: how often it was resumed."""

    axis: int
    segment_id: str
    anchors: dict[int, np.ndarray]
    direction: str
    rules: StopRules | None
    bounds: dict[str, list[int]] | None = None  # a 3D box prompt (the ROI), {lo, hi} in (k, j, i)
    boxes: dict[int, list[float]] | None = None  # the box on the slice the user is on, seeding a 3D box
    cancel: CancelToken = field(default_factory=CancelToken)
    slices: "deque[tuple[int, np.ndarray, SliceOutcome]]" = field(default_factory=deque)
    progress: tuple[int, int, str] = (0, 0, "")
    result: PropagationResult | None = None
    interrupted: PropagationResult | None = None
    error: BaseException | None = None
    written: list[int] = field(default_factory=list)
    resumes: int = 0
    running: bool = False
    finished: bool = False  # set by poll_propagation() once the run ended and every slice is written


@dataclass
class BackgroundTask:
    """A server job (everything mode, SAMAug, uncertainty); ``finish(result)`` runs on the GUI thread
    in ``poll_task``."""

    name: str
    finish: Callable[[Any], Any]
    cancel: CancelToken = field(default_factory=CancelToken)
    progress: tuple[int, int, str] = (0, 0, "")
    result: Any = None
    output: Any = None
    error: BaseException | None = None
    ended: bool = False
    finished: bool = False


@dataclass
class _LaneItem:
    kind: str
    make: Callable[[], Flow]
    done: Callable[[Any], None] | None = None
    failed: Callable[[BaseException], None] | None = None
    retried: bool = False
    beside: bool = False  # started in order, then run beside the lane (an adaptation)


def spread_slices(indices: list[int], limit: int) -> list[int]:
    """At most ``limit`` of the sorted ``indices``, evenly spread and keeping both ends."""
    indices = sorted(indices)
    if len(indices) <= limit:
        return indices
    picks = np.unique(np.round(np.linspace(0, len(indices) - 1, max(1, limit))).astype(int))
    return [indices[i] for i in picks]


class SAMSegmentCore:
    """One volume, one segmentation, one target segment, one session on a SAMSegment server."""

    def __init__(self, scene=None, app_logic=None, segment_editor: Callable[[], Any] | None = None,
                 link: Any = None) -> None:
        """``segment_editor``: returns the Segment Editor module's editor widget if it exists (its
        undo state is saved before our writes into the segmentation it edits); ``link``: the
        server to use (``server_link.RemoteServer`` / ``LocalServerLink``; ``use_link`` later)."""
        import slicer

        self.scene = scene if scene is not None else slicer.mrmlScene
        self.app_logic = app_logic
        self.segment_editor = segment_editor
        self.link: Any = link
        self.session: RemoteSession | None = None
        self.model_id: str | None = None
        self.box_margin_enabled = True
        self.volume_node = None
        self.segmentation_node = None
        self.segment_id: str | None = None
        self.window: IntensityWindow | None = None
        self.prompts = MarkupsPrompts(self.scene)
        self.preview: PreviewOverlay | None = None
        self.writer: SegmentWriter | None = None
        self._window_request: Any = WINDOW_FROM_DISPLAY
        self.current = None  # latest prediction shown in the preview
        self.current_view: ViewSlice | None = None
        self.current_prompts: Prompts | None = None
        self.write_mode = "replace"
        self.last_timing: dict[str, float] = {}
        self._last_index: dict[int, int] = {}
        self._scroll: int = 0
        self.on_error: Callable[[BaseException], None] | None = None
        self.last_error: BaseException | None = None
        self.status = "not connected"
        # the server connection and the request lane
        self._connected = False
        self._connect_op: Operation | None = None
        self._target: tuple[str | None, str | None] = (None, None)
        self._volume_sent = False
        self._lane: deque[_LaneItem] = deque()
        self._active: tuple[_LaneItem, Operation] | None = None
        self._side: list[tuple[Operation, Callable[[Any], None], Callable[[BaseException], None]]] = []
        self._request_generation = 0
        self._shown_generation = 0
        self._result: tuple[int, ViewSlice, Any, Prompts | None] | None = None
        self._jobs: list[PropagationJob] = []
        # adaptation to accepted slices (see the module docstring)
        self.adaptation_settings: AdaptSettings | None = None  # None: the engine's defaults
        self.adaptation_report: AdaptationReport | None = None  # of the last finished adaptation
        self.adapter_segment: str | None = None  # the segment the adapter in use belongs to; None: stock
        self.adapter_origin = ""  # what the adapter in use is ("adapted to slices 4, 8, 12", "loaded from ...")
        self._adapter_file: bytes | None = None  # its signed file (Save writes it; a reopened session gets it back)
        self.adaptation_status = "The stock model is in use."
        self.on_status: Callable[[str], None] | None = None  # status lines the GUI did not ask for
        self._adaptation: BackgroundTask | None = None  # queued or running
        self._after: tuple[Operation, Any, Any] | None = None  # the side entry of a running adaptation

    # ---------------------------------------------------------------- server
    def use_link(self, link: Any) -> None:
        """Use ``link`` (a ``server_link`` object) from now on; the volume is sent again."""
        if link is self.link:
            return
        self._disconnect()
        self.link = link

    def use_server(self, url: str, token: str | None) -> None:
        """A remote (or already running) server at ``url`` with API key ``token``."""
        self.use_link(RemoteServer(url, token))

    def load_model(self, model_id: str | None = None) -> None:
        """Use the server's ``model_id`` (None: its default); the session is reopened with it."""
        if model_id == self.model_id and self.session is not None:
            return
        self.model_id = model_id
        self._disconnect()

    def _disconnect(self) -> None:
        self._cancel_adaptation()
        if self.adapter_segment is not None:
            self._forget_adapter("The server or model changed: the stock model is in use again (an adapter belongs to "
                                 "the model and the server session it was made in).")
        self.cancel_requests()
        for item in list(self._lane):
            if item.failed is not None:
                item.failed(SAMSegmentError("The server connection changed", "try again"))
        self._lane.clear()
        if self._active is not None:
            self._active[1].cancel()
            self._active = None
        if self.session is not None and self.session.session_id is not None and self._connected:
            self._side.append((self.session.close_op(), lambda _: None, lambda _: None))
        self.session, self._connected, self._connect_op, self._volume_sent = None, False, None, False
        self._target = (None, None)

    def _ensure_connection(self) -> bool:
        """Advance the connection (start/restart the local server, check the server's API); True
        once requests can be made. Never blocks."""
        if self.link is None:
            raise SAMSegmentError("No SAMSegment server is configured",
                                  "start the local server or give a server URL in the module's Server section")
        state, url, token = self.link.poll()
        if state == "failed":
            self.status = "failed"
            raise SAMSegmentError(self.link.error or "The SAMSegment server could not be started",
                                  f"see the server log ({getattr(self.link, 'log_file', 'the server')})")
        if state != "ready":
            self.status = "starting the server"
            self._connected = False
            return False
        if self.session is None:
            self.session = RemoteSession(url, token, model=self.model_id, connect=False)
        if (url, token) != self._target:
            self._target, self._connected, self._connect_op = (url, token), False, None
            self.session.retarget(url, token)
        self.session.box_margin = None if self.box_margin_enabled else 0.0
        if self._connected:
            return True
        if self._connect_op is None:
            self._connect_op = self.session.connect_op()
        if not self._connect_op.poll():
            return False
        op, self._connect_op = self._connect_op, None
        op.result()  # raises why the server cannot be used (auth, version, model)
        self._connected = True
        self.status = f"connected to the {self.link.describe()} ({self.session.info.get('device', '?')})"
        return True

    def _server_lost(self, exc: BaseException) -> bool:
        """``exc`` says the server is gone: True when the link restarts it (a local server), after
        which the connection is checked again."""
        if isinstance(exc, ServerUnreachable) or (isinstance(exc, PropagationInterrupted)
                                                  and isinstance(exc.__cause__, ServerUnreachable)):
            self._connected, self._target = False, (None, None)
            return bool(getattr(self.link, "restartable", False))
        return False

    @property
    def connected(self) -> bool:
        return self._connected

    # ---------------------------------------------------------------- the request lane
    def _enqueue(self, kind: str, make: Callable[[], Flow], done: Callable[[Any], None] | None = None,
                 failed: Callable[[BaseException], None] | None = None, replace: bool = False,
                 beside: bool = False) -> None:
        if replace:  # a newer prompt supersedes one still waiting
            self._lane = deque(item for item in self._lane if item.kind != kind)
        self._lane.append(_LaneItem(kind, make, done, failed, beside=beside))
        self._pump()

    def _next_item(self) -> _LaneItem | None:
        """The next lane request that may start: the first, unless an adaptation runs beside the lane;
        then requests that must see its outcome wait in order and the others pass them."""
        for position, item in enumerate(self._lane):
            if self._after is not None and (item.kind == "volume" or item.kind in AFTER_ADAPTATION):
                if item.kind == "volume":
                    return None  # nothing may reach the server session before the volume
                continue
            del self._lane[position]
            return item
        return None

    def _start_beside(self, item: _LaneItem, op: Operation) -> None:
        """Run ``item``'s operation beside the lane; ``AFTER_ADAPTATION`` requests wait until it ends."""
        def done(value: Any) -> None:
            self._after = None
            if item.done is not None:
                item.done(value)

        def failed(exc: BaseException) -> None:
            self._after = None
            if item.failed is not None:
                item.failed(exc)
            else:
                self._report(exc)

        self._after = (op, done, failed)
        self._side.append(self._after)

    def _pump(self) -> None:
        """Advance the connection, the lane and the side operations (never blocks for long)."""
        if self.link is None and not self._lane:
            return  # nothing asked for yet (the module's timer runs before Start)
        if not self._ensure_connection():
            return
        if self.volume_node is not None and not self._volume_sent and not any(
                item.kind == "volume" for item in self._lane) and (self._active is None
                                                                   or self._active[0].kind != "volume"):
            self._queue_volume()
        while True:
            if self._active is None:
                item = self._next_item()
                if item is None:
                    break
                op = self.session.operation(item.make())
                if item.beside:
                    self._start_beside(item, op)
                    continue
                self._active = (item, op)
            item, op = self._active
            if not op.poll():
                break
            self._active = None
            try:
                value = op.result()
            except BaseException as exc:  # noqa: BLE001 - handed to the item's owner
                if self._server_lost(exc) and not item.retried:
                    item.retried = True
                    self._volume_sent = False
                    self._lane.appendleft(item)
                    return
                if item.failed is not None:
                    item.failed(exc)
                else:
                    self._report(exc)
                continue
            if item.done is not None:
                item.done(value)
        for entry in list(self._side):
            op, done, failed = entry
            if not op.poll():
                continue
            self._side.remove(entry)
            try:
                value = op.result()
            except BaseException as exc:  # noqa: BLE001
                failed(exc)
                continue
            done(value)

    def _report(self, exc: BaseException) -> None:
        self.last_error = exc
        if self.on_error is not None:
            self.on_error(exc)

    @property
    def busy(self) -> bool:
        """Requests or jobs in flight (``poll()`` has more to do)."""
        return bool(self._active or self._lane or self._side or self._connect_op
                    or any(job.running for job in self._jobs))

    def wait_idle(self, timeout: float = 300.0) -> None:
        """Block until every request and job has ended (the console, tests)."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if not self.busy and (self._connected or self.link is None):
                return
            if time.monotonic() > deadline:
                raise SAMSegmentError("The SAMSegment server did not finish in time",
                                      "check that it is running (module's Server section) and its log")
            wait = self._active[1] if self._active is not None else (self._side[0][0] if self._side else None)
            if wait is not None:
                wait.poll(wait=0.02)
            else:
                time.sleep(0.01)

    # ---------------------------------------------------------------- inputs
    def set_inputs(self, volume_node, segmentation_node, segment_id: str | None = None,
                   window: IntensityWindow | str | tuple[float, float] | None = WINDOW_FROM_DISPLAY,
                   sink: EditSink | None = None) -> str:
        """Bind the source volume, the segmentation and the target segment (created when missing).

        ``sink``: where writes go (the SAM effect passes itself); None = the module's own Segment
        Editor logic, which follows the Segment Editor's masking/overlap settings. The volume is
        sent to the server in the background. Returns the target segment's id."""
        if volume_node is None:
            raise SAMSegmentError("No source volume selected", "select the volume to segment")
        if volume_node.GetImageData() is None:
            raise SAMSegmentError(f"Volume '{volume_node.GetName()}' has no image data", "load the image first")
        if segmentation_node is None:
            segmentation_node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                             f"{volume_node.GetName()} segmentation")
            segmentation_node.CreateDefaultDisplayNodes()
        changed_volume = volume_node is not self.volume_node or window != self._window_request
        structure = (self.segmentation_node, self.segment_id)
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
        if changed_volume:
            self.cancel_requests()
            self.current, self.current_view, self.current_prompts = None, None, None
            self._volume_sent = False
            self._cancel_adaptation("the volume changed")
            if self.adapter_segment is not None:
                # the volume's new server session decodes with the stock model
                self._forget_adapter("A new volume (or window): the stock model is in use again (an adapter belongs "
                                     "to the scan and structure it was made for).")
            if self.link is not None:
                self._queue_volume()
        elif (self.segmentation_node, self.segment_id) != structure:
            self._structure_changed()
        return self.segment_id

    def _queue_volume(self) -> None:
        import slicer

        self._lane = deque(item for item in self._lane if item.kind != "volume")
        window = self._window_request
        if window == WINDOW_FROM_DISPLAY:
            window = window_from_display(self.volume_node)  # None -> automatic window
        array = slicer.util.arrayFromVolume(self.volume_node)  # a view: copied in steps while uploading
        self._volume_sent = True

        def send() -> Flow:
            # the same volume sent again (new settings, a restarted server): the adapter in use goes back in
            held = self._adapter_file if self.adapter_in_use else None
            win = yield from self.session.set_volume_flow(array, window)
            refused = None
            if held is not None:
                try:
                    yield from self.session.load_adapter_file_bytes_flow(held, source="The adapter in use")
                except (ServerUnreachable, ServerTimeout):
                    raise  # sent again once the server is back
                except SAMSegmentError as exc:
                    refused = exc
            return win, refused

        def sent(result: tuple[IntensityWindow, BaseException | None]) -> None:
            self.window, refused = result
            if self.adapter_in_use and not self.session.adapter_in_use:
                why = f" ({refused})" if refused is not None else ""
                self._forget_adapter(f"The server session was opened again{why}: the stock model is in use. Load the "
                                     "saved adapter, or adapt again.")

        def failed(exc: BaseException) -> None:
            self._volume_sent = False
            self._report(exc)

        self._lane.appendleft(_LaneItem("volume", send, sent, failed))

    def set_segment(self, segment_id: str) -> None:
        if self.segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise SAMSegmentError(f"Segment '{segment_id}' does not exist", "pick a segment of the segmentation")
        changed = segment_id != self.segment_id
        self.segment_id = segment_id
        if self.preview is not None:
            self.preview.set_color(tuple(self.segmentation_node.GetSegmentation().GetSegment(segment_id).GetColor()))
        if changed:
            self._structure_changed()

    def _require(self) -> None:
        if self.volume_node is None or self.writer is None:
            raise SAMSegmentError("No source volume/segmentation selected", "call set_inputs(volume, segmentation)")
        if self.link is None:
            raise SAMSegmentError("No SAMSegment server is configured",
                                  "start the local server or give a server URL in the module's Server section")

    def _shape(self) -> tuple[int, int, int]:
        """The volume's (K, J, I) shape, from the node (no server needed)."""
        i, j, k = self.volume_node.GetImageData().GetDimensions()
        return (k, j, i)

    # ---------------------------------------------------------------- views
    def view_slice(self, slice_node) -> ViewSlice:
        """The volume slice shown in ``slice_node`` (axis from the view's plane, not its name)."""
        self._require()
        return _view_slice(self.volume_node, vtk_to_numpy_matrix(slice_node.GetSliceToRAS()), self._shape())

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
    def warm(self, view: ViewSlice) -> None:
        """Ask the server to encode ``view``'s slice now (a mouse press: the box is still being
        dragged) and its neighbours after it; returns at once."""
        self._require()
        self._enqueue("warm", lambda: self.session.prefetch_flow(view.ref, radius=2, direction=self._scroll,
                                                                 include_self=True), replace=True)

    def request(self, view: ViewSlice, prompts: Prompts, refine: bool = False) -> int:
        """Ask for the mask of ``prompts`` on ``view``'s slice; ``poll()`` shows it when it arrives.
        A newer request replaces one not yet sent, and an older answer is never shown over a newer
        one. Returns the request's number."""
        self._require()
        self._request_generation += 1
        generation = self._request_generation
        if prompts.is_empty:
            self._enqueue("predict", lambda: self.session.reset_flow(view.ref),
                          lambda _: self._deliver(generation, view, None, prompts), self._failed_request(generation),
                          replace=True)
            return generation
        self._enqueue("predict", lambda: self.session.predict_flow(view.ref, prompts, refine=refine),
                      lambda prediction: self._deliver(generation, view, prediction, prompts),
                      self._failed_request(generation), replace=True)
        return generation

    def _deliver(self, generation: int, view: ViewSlice, prediction: Any, prompts: Prompts | None) -> None:
        if generation == self._request_generation:
            self._result = (generation, view, prediction, prompts)

    def _failed_request(self, generation: int) -> Callable[[BaseException], None]:
        def failed(exc: BaseException) -> None:
            if generation == self._request_generation:
                self._result = (generation, None, exc, None)  # type: ignore[arg-type]

        return failed

    def cancel_requests(self) -> None:
        """Forget prompt requests not answered yet (their answers are dropped)."""
        self._request_generation += 1
        self._lane = deque(item for item in self._lane if item.kind not in ("predict", "warm"))
        self._result = None

    def poll(self) -> Any:
        """On the GUI thread: advance every request; show the newest finished prompt result (and
        return it); raise its error if it failed."""
        self._pump()
        self._poll_jobs()
        if self._result is None:
            return None
        generation, view, prediction, prompts = self._result
        self._result = None
        if generation != self._request_generation:
            return None
        if view is None:
            self.current = None
            if self.preview is not None:
                self.preview.clear()
            self.last_error = prediction
            raise prediction
        self._present(view, prediction, prompts)
        self._shown_generation = generation
        return prediction

    def segment(self, view: ViewSlice, prompts: Prompts, refine: bool = True) -> Any:
        """Decode ``prompts`` on ``view``'s slice and show the result as the preview (blocking)."""
        t0 = time.perf_counter()
        generation = self.request(view, prompts, refine=refine)
        prediction = self.wait_for_requests()
        self.last_timing = {"engine_s": time.perf_counter() - t0}
        return prediction if self._shown_generation == generation else None

    def _present(self, view: ViewSlice, prediction: Any, prompts: Prompts | None = None) -> None:
        """Show ``prediction`` as the preview (None clears it) and have the server encode the
        neighbours ahead of the user."""
        self.current, self.current_view, self.current_prompts = prediction, view, prompts
        if prediction is None:
            if self.preview is not None:
                self.preview.clear()
            return
        self.preview.show(view.axis, view.index, prediction.mask)
        direction = self._note_view(view)
        self._enqueue("warm", lambda: self.session.prefetch_flow(view.ref, radius=2, direction=direction),
                      replace=True)

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

    def wait_for_requests(self, timeout: float = 120.0) -> Any:
        """Block until the latest prompt request is shown (scripts and tests); its error is raised."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            pending = self._active is not None and self._active[0].kind in ("predict", "volume")
            if not pending and not any(item.kind in ("predict", "volume") for item in self._lane) \
                    and self._result is None and self._connected:
                return self.current
            if time.monotonic() > deadline:
                raise SAMSegmentError("Segmentation request did not finish in time",
                                      "check that the SAMSegment server is running and its log")
            if self._active is not None:
                self._active[1].poll(wait=0.02)
            else:
                time.sleep(0.005)

    def undo_prompt(self) -> None:
        """Back to the previous proposal on the current slice (the preview only; segments untouched);
        ``poll()`` shows it."""
        if self.current_view is None:
            return
        view = self.current_view
        self._request_generation += 1
        generation = self._request_generation
        self._enqueue("undo", lambda: self.session.undo_flow(view.ref),
                      lambda previous: self._deliver(generation, view, previous, None),
                      self._failed_request(generation))

    def reset_prompts(self, ref: SliceRef) -> None:
        """Forget the server's prompt history on ``ref`` (the next prompt starts afresh)."""
        if self.session is not None or self.link is not None:
            self._enqueue("reset", lambda: self.session.reset_flow(ref))

    def clear(self) -> None:
        """Drop the proposal and the prompts; the segment keeps what was applied."""
        self.cancel_requests()
        if self.current_view is not None and self.link is not None:
            self.reset_prompts(self.current_view.ref)
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
                          policy: Any = None, within_roi: bool = False) -> PropagationJob:
        """Propagate the target segment from its non-empty slices on the server.

        ``within_roi``: the box ROI is a 3D box prompt: no slice outside its range is written and no
        voxel outside it; with an empty segment, the slice shown (else the box's middle slice) is
        prompted with the box first.
        One undo state is saved before the first slice is written, so the whole run (even a
        cancelled or interrupted one) is undone in one step. Call ``poll_propagation`` from the
        GUI thread; slices are written as they arrive."""
        self._require()
        if policy is not None:
            raise SAMSegmentError("A custom prompt policy cannot be sent to a server",
                                  "use the server's propagation (StopRules); policies run in SAMSegmentLib only")
        if axis is None:
            axis = self.current_view.axis if self.current_view is not None else 0
        anchors = self.anchors(axis)
        bounds = None
        if within_roi:
            bounds = self.prompts.box3d(self.volume_node, self._shape())
            if bounds is None:
                raise SAMSegmentError("The box ROI is not placed, or does not meet the volume",
                                      "place the box (ROI) around the structure in any view, then propagate")
        if not anchors and bounds is None:
            raise SAMSegmentError("The target segment is empty along this view's axis",
                                  "segment and apply at least one slice (or use the box as a 3D box), then propagate")
        boxes = None
        view = self.current_view
        if bounds is not None and not anchors and view is not None and view.axis == axis \
                and bounds["lo"][axis] <= view.index <= bounds["hi"][axis]:
            # seed the slice the user is on (where the box was drawn), not the box's middle: the
            # middle of a curved organ's box can miss it (bench/accuracy.py, "middle seed")
            box = self.prompts.prompts_for(self.volume_node, axis, view.index).box
            boxes = None if box is None else {view.index: [float(v) for v in box]}
        self.writer.save_state_for_undo()
        job = PropagationJob(axis=axis, segment_id=self.segment_id, anchors=anchors, direction=direction, rules=rules,
                             bounds=bounds, boxes=boxes)
        self._jobs.append(job)
        self._launch(job)
        return job

    def resume_propagation(self, job: PropagationJob) -> PropagationJob:
        """Continue ``job`` after its server went away: the same request is sent again and only the
        slices not written yet are written (same undo step)."""
        if job.interrupted is None:
            raise SAMSegmentError("This propagation was not interrupted", "start a new propagation")
        job.error, job.finished, job.resumes = None, False, job.resumes + 1
        if job not in self._jobs:
            self._jobs.append(job)
        self._launch(job)
        return job

    def _launch(self, job: PropagationJob) -> None:
        """Start ``job``'s server job in the lane, then follow it beside the lane."""
        job.running = True

        def on_slice(ref: SliceRef, mask: np.ndarray, outcome: SliceOutcome) -> None:
            job.slices.append((ref.index, mask, outcome))

        def progress(done: int, total: int, message: str) -> None:
            job.progress = (done, total, message)

        collector = PropagationCollector(job.axis, on_slice, job.interrupted)
        params = RemoteSession.propagation_params(job.axis, job.anchors, job.direction, job.rules, job.boxes,
                                                  job.bounds)

        def ended(result: PropagationResult) -> None:
            job.result, job.interrupted, job.running = result, None, False

        def failed(exc: BaseException) -> None:
            if isinstance(exc, ServerError):
                exc = collector.interrupted(exc)
            if isinstance(exc, PropagationInterrupted):
                job.interrupted = exc.partial
                # a local server that died is restarted; a server that is up but lost the job
                # (restarted, another replica) takes it again; an unreachable remote one waits for the user
                resumable = self._server_lost(exc) or not isinstance(exc.__cause__, ServerUnreachable)
                if resumable and job.resumes < MAX_RESUMES and not job.cancel.cancelled:
                    log.warning("SAMSegment server lost during propagation; resuming (%d slices kept)",
                                len(exc.partial.masks))
                    job.resumes += 1
                    self._volume_sent = False
                    self._launch(job)
                    return
            job.error, job.running = exc, False

        def started(job_id: str) -> None:
            self._side.append((self.session.operation(self.session.follow_job_flow(job_id, progress, job.cancel,
                                                                                     collector.add)),
                               lambda done: ended(collector.finish(done)), failed))

        self._enqueue("job", lambda: self.session.start_job_flow("propagate", **params), started, failed)

    def _poll_jobs(self) -> None:
        self._jobs = [job for job in self._jobs if job.running or job.slices]

    def poll_propagation(self, job: PropagationJob) -> list[int]:
        """Write every slice decided so far (GUI thread); mark the job finished when it is done."""
        self._pump()
        written = []
        while job.slices:
            index, mask, _ = job.slices.popleft()
            self.writer.write_slice(job.segment_id, job.axis, index, mask, "replace", save_undo=False)
            job.written.append(index)
            written.append(index)
        if not job.running and not job.slices and not job.finished:
            job.finished = True
            if job.error is not None:
                error, job.error = job.error, None
                raise error
        return written

    def propagate(self, direction: str = "both", axis: int | None = None, rules: StopRules | None = None,
                  policy: Any = None, cancel_after: int | None = None,
                  progress: Callable[[int, int, str], None] | None = None, timeout: float = 600.0,
                  within_roi: bool = False) -> PropagationJob:
        """Blocking propagation for the console and tests; ``cancel_after`` cancels after N written slices."""
        job = self.start_propagation(direction, axis, rules, policy, within_roi)
        deadline = time.monotonic() + timeout
        while not job.finished:
            self.poll_propagation(job)
            if progress is not None:
                progress(*job.progress)
            if cancel_after is not None and len(job.written) >= cancel_after:
                job.cancel.cancel()
            if time.monotonic() > deadline:
                job.cancel.cancel()
                raise SAMSegmentError("The propagation did not finish in time", "check the server and its log")
            time.sleep(0.01)
        return job

    # ---------------------------------------------------------------- long server jobs
    def start_task(self, name: str, make: Callable[[Callable[[int, int, str], None], CancelToken], Flow],
                   finish: Callable[[Any], Any]) -> BackgroundTask:
        """Run the flow ``make(progress, cancel)`` (a server job, e.g. ``session.everything_flow``)
        in the lane; ``finish(result)`` (the MRML work) runs in ``poll_task`` on the GUI thread."""
        self._require()
        task = BackgroundTask(name, finish)

        def progress(done: int, total: int, message: str) -> None:
            task.progress = (done, total, message)

        def done(value: Any) -> None:
            task.result, task.ended = value, True

        def failed(exc: BaseException) -> None:
            task.error, task.ended = exc, True

        self._enqueue("task", lambda: make(progress, task.cancel), done, failed)
        return task

    def poll_task(self, task: BackgroundTask) -> bool:
        """On the GUI thread: True once the task ended (its ``finish`` ran, or its error is raised)."""
        if task.finished:
            return True
        self._pump()
        if not task.ended:
            return False
        task.finished = True
        if task.error is not None:
            raise task.error
        task.output = task.finish(task.result)
        return True

    def run_task(self, name: str, make: Callable[..., Flow], finish: Callable[[Any], Any],
                 timeout: float = 600.0) -> Any:
        """Blocking variant for the console and tests."""
        return self.wait_task(self.start_task(name, make, finish), timeout)

    def wait_task(self, task: BackgroundTask, timeout: float = 600.0) -> Any:
        """Poll ``task`` to its end (blocking); its ``finish``'s output, or its error raised."""
        deadline = time.monotonic() + timeout
        while not self.poll_task(task):
            if time.monotonic() > deadline:
                task.cancel.cancel()
                raise SAMSegmentError(f"{task.name} did not finish in time", "check the server and its log")
            time.sleep(0.01)
        return task.output

    # ---------------------------------------------------------------- adaptation to accepted slices
    @property
    def adapter_in_use(self) -> bool:
        """An adapted decoder (made here or loaded) decodes this segment's prompts and jobs."""
        return self.adapter_segment is not None

    @property
    def adapting(self) -> bool:
        """An adaptation is queued or running."""
        return self._adaptation is not None and not self._adaptation.ended

    def _note(self, text: str) -> None:
        """A status line of the adaptation section; also handed to ``on_status`` (the panel's status)."""
        self.adaptation_status = text
        if self.on_status is not None:
            self.on_status(text)

    def start_adaptation(self, axis: int | None = None, settings: AdaptSettings | None = None,
                         max_slices: int = MAX_ADAPT_SLICES) -> BackgroundTask:
        """Adapt the model's mask decoder to the accepted slices of the target segment, on the server.

        The slices are the segment's non-empty slices along ``axis`` (None: the axis of the view
        prompted last), at most ``max_slices`` of them spread over the structure. The server keeps
        the adapted decoder only when it does better on a held-back slice; from then on every decode
        of this session (prompts, propagation, everything mode, uncertainty) goes through it, until
        another segment, volume or window is selected or ``use_stock_model`` is called. An adapter is
        for one structure. ``settings``: the training settings (None: ``adaptation_settings``, else
        the engine's defaults). Poll the returned task (``poll_task``); its ``progress`` follows the
        training and ``cancel`` stops it (the model in use stays). ``adaptation_report`` and
        ``adaptation_status`` hold the outcome.
        """
        self._require()
        if self.adapting:
            raise SAMSegmentError("An adaptation is already running", "wait for it to finish, or cancel it")
        if any(job.running for job in self._jobs):
            raise SAMSegmentError("A propagation is running; its slices would change what the model adapts to",
                                  "wait for the propagation to finish (or cancel it), then adapt")
        settings = settings if settings is not None else self.adaptation_settings
        if settings is not None:
            settings.check()
        if axis is None:
            axis = self.current_view.axis if self.current_view is not None else 0
        structure, segment_id = self.segment_name(), self.segment_id
        anchors = self.anchors(axis)
        if not anchors:
            raise SAMSegmentError(f"Segment '{structure}' has no accepted slice along this view's axis",
                                  "accept the mask on 2-3 slices spread over the structure, then adapt")
        chosen = spread_slices(list(anchors), max_slices)
        accepted = {index: anchors[index] for index in chosen}
        previous = self.adapter_origin if self.adapter_in_use else ""

        def finish(report: AdaptationReport) -> AdaptationReport:
            return report

        task = BackgroundTask("adaptation", finish)
        self._adaptation = task

        def progress(done: int, total: int, message: str) -> None:
            task.progress = (done, total, message)

        def make() -> Flow:
            if task.cancel.cancelled:  # cancelled while waiting in the lane: the server never hears of it
                raise CancelledError("The adaptation was cancelled")
            session = self.session
            report = yield from session.adapt_flow(axis, accepted, structure=structure, settings=settings,
                                                   progress=progress, cancel=task.cancel)
            return report, session.held_adapter_bytes if report.kept else None  # adapt_flow fetched it

        def done(outcome: tuple[AdaptationReport, bytes | None]) -> None:
            report, data = outcome
            task.result, task.ended = report, True
            if task.cancel.cancelled:  # finished just as it was cancelled or superseded: the user's word stands
                task.error = CancelledError("The adaptation was cancelled")
                if report.kept:
                    self._enqueue("model", lambda: self.session.use_stock_model_flow())
                    if self.adapter_in_use:
                        self._forget_adapter("Adaptation cancelled: the stock model is in use.")
                return
            self.adaptation_report = report
            line = report.summary()
            if report.kept:
                self.adapter_segment, self._adapter_file = segment_id, data
                self.adapter_origin = f"adapted to slices {', '.join(str(i) for i in report.slices)}"
                self._note(f"Adaptation {line}. '{structure}' is now segmented with the adapted model (prompts, "
                           f"propagation, everything mode); it is for this structure only.")
            elif previous:
                self._note(f"Adaptation {line.replace('(the stock model stays)', '(the adapter in use stays)')}.")
            else:
                self._note(f"Adaptation {line}.")

        def failed(exc: BaseException) -> None:
            task.error, task.ended = exc, True
            if isinstance(exc, CancelledError) or task.cancel.cancelled:
                self._note(f"Adaptation cancelled: {'the adapter in use' if self.adapter_in_use else 'the stock model'}"
                           " stays.")
                return
            if self._server_lost(exc):
                self._note("The server was lost during the adaptation; adapt again once it is back.")
                return
            self._note(f"Adaptation failed: {exc}")

        note = f"{len(chosen)} of {len(anchors)} slices" if len(chosen) < len(anchors) else f"{len(chosen)} slices"
        self._note(f"Adapting the model to '{structure}' ({note}: {', '.join(str(i) for i in chosen)})...")
        self._enqueue("adapt", make, done, failed, beside=True)
        return task

    def adapt(self, axis: int | None = None, settings: AdaptSettings | None = None,
              timeout: float = 600.0) -> AdaptationReport:
        """``start_adaptation`` run to its end (the console, tests); the report."""
        return self.wait_task(self.start_adaptation(axis, settings), timeout)

    def _cancel_adaptation(self, why: str = "") -> None:
        """Cancel a queued or running adaptation (its outcome is not used)."""
        if self.adapting:
            self._adaptation.cancel.cancel()
            if why:
                self._note(f"Adaptation cancelled: {why}.")

    def _forget_adapter(self, message: str) -> None:
        """The adapter is no longer in use (the server session changed); say so."""
        self.adapter_segment, self.adapter_origin, self._adapter_file = None, "", None
        self.adaptation_report = None
        self._note(message)

    def _structure_changed(self) -> None:
        """Another segment (structure) was selected: an adapter of the previous one is not used for it."""
        self._cancel_adaptation("another segment was selected")
        if self.adapter_segment is not None and self.adapter_segment != self.segment_id:
            self.use_stock_model(f"Segment '{self.segment_name()}' selected: back to the stock model (an adapter is "
                                 "made for one structure; save it before switching to reuse it later).")

    def use_stock_model(self, message: str | None = None) -> None:
        """Decode with the stock model again (in order with the other requests; ``poll()`` sends it).
        A queued or running adaptation is cancelled."""
        self._cancel_adaptation()
        in_use = self.adapter_in_use or (self.session is not None and self.session.adapter_in_use)
        self.adapter_segment, self.adapter_origin, self._adapter_file = None, "", None
        if in_use and self.link is not None:
            self._enqueue("model", lambda: self.session.use_stock_model_flow())
        self._note(message or "The stock model is in use.")

    def start_save_adapter(self, path: str | Path, overwrite: bool = False) -> BackgroundTask:
        """Write the adapter in use to ``path`` as a signed adapter file (``ADAPTER_SUFFIX``), atomically.

        An existing file is replaced only with ``overwrite`` (the module asks the user first). Poll the
        task; its ``output`` is the path written."""
        self._require()
        if self.adapting:
            raise SAMSegmentError("An adaptation is running", "wait for it to finish, then save its adapter")
        if not self.adapter_in_use:
            raise SAMSegmentError("No adapter is in use (the stock model is)",
                                  "adapt to accepted slices, or load an adapter, first")
        target = Path(path).expanduser()
        self._check_target(target, overwrite)

        def write(data: bytes | None) -> Path:
            from SAMSegmentLib.files import atomic_write_bytes

            if not data:
                raise SAMSegmentError("The server has no adapter in use (it restarted, or the model was reset)",
                                      "adapt again, or load a saved adapter")
            self._check_target(target, overwrite)
            atomic_write_bytes(target, bytes(data), "the adapter")
            self._note(f"Adapter saved to {target} ({len(data) / 1e6:.1f} MB, signed; it loads on this machine or "
                       "where the same adapter key is used).")
            return target

        def fetch(progress: Any, cancel: Any) -> Flow:
            if self._adapter_file is not None:  # the signed file as the server sent it
                return self._adapter_file
            return (yield from self.session.adapter_file_bytes_flow())

        return self.start_task("saving the adapter", fetch, write)

    @staticmethod
    def _check_target(target: Path, overwrite: bool) -> None:
        if target.is_dir():
            raise SAMSegmentError(f"{target} is a folder", f"give a file name, e.g. liver{ADAPTER_SUFFIX}")
        if target.exists() and not overwrite:
            raise SAMSegmentError(f"{target} exists; it is not replaced without asking",
                                  "choose another name, or confirm that it is to be replaced")

    def save_adapter(self, path: str | Path, overwrite: bool = False, timeout: float = 120.0) -> Path:
        """``start_save_adapter`` run to its end (the console, tests)."""
        return self.wait_task(self.start_save_adapter(path, overwrite), timeout)

    def start_load_adapter(self, path: str | Path) -> BackgroundTask:
        """Use the adapter saved in ``path`` for the target segment (the server checks its signature
        and that it belongs to the model in use). Poll the task; its ``output`` is the server's
        ``{"structure", "report"}`` of the adapter."""
        self._require()
        if self.adapting:
            raise SAMSegmentError("An adaptation is running", "wait for it to finish (or cancel it), then load")
        source = Path(path).expanduser()
        data = read_adapter_file(source)  # exists, readable, an adapter file; the server verifies the rest
        segment_id, inputs = self.segment_id, (self.volume_node, self.segmentation_node)

        def loaded(info: dict[str, Any]) -> dict[str, Any]:
            return info

        task = BackgroundTask("loading the adapter", loaded)

        def done(info: dict[str, Any]) -> None:
            task.result, task.ended = info, True
            if segment_id != self.segment_id or inputs != (self.volume_node, self.segmentation_node):
                self._enqueue("model", lambda: self.session.use_stock_model_flow())  # selected meanwhile: not for it
                task.error = SAMSegmentError("Another segment or volume was selected while the adapter loaded; the "
                                             "stock model stays", "load it again for the structure it was made for")
                return
            made_for = (info or {}).get("structure")
            report = (info or {}).get("report") or {}
            self.adapter_segment, self.adapter_origin = segment_id, f"loaded from {source.name}"
            self._adapter_file = data
            try:
                self.adaptation_report = AdaptationReport.from_json(report) if report else None
            except (TypeError, ValueError):
                self.adaptation_report = None
            name = self.segment_name()
            other = f" (made for '{made_for}')" if made_for and made_for != name else ""
            self._note(f"Adapter {source.name}{other} in use for '{name}'"
                       + (f"; when made: {report['summary']}" if isinstance(report.get("summary"), str) else "") + ".")

        def failed(exc: BaseException) -> None:
            task.error, task.ended = exc, True
            self._note(f"The adapter was not loaded: {exc}")

        self._enqueue("task", lambda: self.session.load_adapter_file_bytes_flow(data, source=str(source)), done, failed)
        return task

    def load_adapter(self, path: str | Path, timeout: float = 120.0) -> dict[str, Any]:
        """``start_load_adapter`` run to its end (the console, tests)."""
        return self.wait_task(self.start_load_adapter(path), timeout)

    def describe_adapter(self) -> str:
        """One line for the panel: which model decodes the target segment."""
        if not self.adapter_in_use:
            return "Stock model in use."
        report = self.adaptation_report
        summary = f": {report.summary()}" if report is not None and report.kept else ""
        return f"Adapted model in use for this segment ({self.adapter_origin}){summary}."

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Cancel running work, close the server session (in the background when it cannot wait)
        and remove the preview."""
        for job in self._jobs:
            job.cancel.cancel()
        self._cancel_adaptation()
        self.cancel_requests()
        if self.session is not None and self._connected and self.session.session_id is not None:
            try:
                self.session.close_op().wait(timeout=2.0)
            except SAMSegmentError:
                pass
        self.prompts.unobserve()
        if self.preview is not None:
            self.preview.remove()
        if self.writer is not None:
            self.writer.close()

    def release_scene(self, *running: PropagationJob | BackgroundTask | None) -> None:
        """The scene is about to close: cancel ``running`` work and forget every node.

        Nothing is written afterwards: a cancelled propagation's remaining slices and a task's
        ``finish`` are dropped instead of landing in the next scene. The server connection stays.
        """
        for work in (*running, self._adaptation):
            if work is not None:
                work.cancel.cancel()
                work.finished = True
        self._adaptation = None
        self.adapter_segment, self.adapter_origin, self.adaptation_report = None, "", None
        self._adapter_file = None
        self.adaptation_status = "The stock model is in use."
        for job in self._jobs:
            job.cancel.cancel()
            job.slices.clear()
        self._jobs.clear()
        self.cancel_requests()
        self._lane = deque(item for item in self._lane if item.kind == "reset")
        self.prompts.unobserve()
        self.prompts = MarkupsPrompts(self.scene)
        self.current, self.current_view, self.current_prompts = None, None, None
        self.writer = self.preview = None
        self.volume_node = self.segmentation_node = None
        self.segment_id = None
        self._volume_sent = False

    # ---------------------------------------------------------------- module panel support
    @staticmethod
    def model_ids() -> list[str]:
        """The models of the registry, for the model selector (the server's list once connected)."""
        from SAMSegmentLib.model_registry import load_registry

        return list(load_registry())

    @staticmethod
    def default_model() -> str:
        """The registry's default model (LiteMedSAM: packaged, works offline)."""
        from SAMSegmentLib.model_registry import default_model_id

        return default_model_id()

    def set_box_margin(self, enabled: bool) -> None:
        """Widen the user's boxes by the model's margin (models.json), or take them as drawn; the
        server session is reopened with the setting (its prompt history starts afresh)."""
        if enabled != self.box_margin_enabled:
            self.box_margin_enabled = enabled
            if self.session is not None:
                self.session.box_margin = None if enabled else 0.0
                self._volume_sent = False  # the next pump reopens the session (the volume stays on the server)

    def configure_from_parameters(self, params: Any, segment_id: str | None = None) -> None:
        """Model, volume, segmentation and markups named by the module's parameter node."""
        self.load_model(params.model or None)
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
        """One line for the status bar: how many slices, why each direction stopped, and where a 3D box's run
        started (with the model's score there)."""
        if job.result is None:
            if job.interrupted is not None:
                return (f"Propagation interrupted: {len(job.written)} slices written and kept. Press Propagate "
                        "to resume once the server is back (one Undo removes them all).")
            return f"Propagation wrote {len(job.written)} slices."
        stops = "; ".join(f"{'up' if s.direction > 0 else 'down'} from {s.anchor}: {s.reason.value}"
                          for s in job.result.stops)
        head = "Propagation cancelled" if job.result.cancelled else "Propagation done"
        resumed = f" (resumed {job.resumes}x after the server restarted)" if job.resumes else ""
        started = ""
        for seed in job.result.seeds():  # a 3D box with an empty segment: the slice shown, else its middle
            if job.boxes is not None and seed.index in job.boxes:
                started += f" Started from the slice shown, {seed.index} (model score {seed.score:.2f})."
            else:
                started += (f" Started from the box's middle slice, {seed.index} (model score {seed.score:.2f}); if the "
                            "structure lies off-centre in the box, Undo, show its largest slice and propagate again.")
        return f"{head}{resumed}: {len(job.written)} slices written ({stops}).{started} One Undo removes them all."

    def server_status(self) -> str:
        """One line for the panel: where the engine runs and what it is doing."""
        if self.link is None:
            return "No server configured"
        return f"{self.status}; {'working' if self.busy else 'idle'}" if self._connected else self.status
