"""What the "SAM" Segment Editor effect does with mouse events, without Qt.

The effect's Qt shell forwards (view, x, y, buttons, modifiers) here. A press-release without
movement is a point (left = include; Ctrl, Shift or right button = exclude); a left drag is a box.
Prompts accumulate on the slice under the mouse and are dropped when the user moves to another
slice or view orientation, because SAM's prompts belong to one image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from SAMSegmentLib.errors import SAMSegmentError
from SAMSegmentLib.prompts import EXCLUDE, INCLUDE, Prompts

from .geometry import ViewSlice, ijk_component, ijk_to_slice_xy, ras_to_ijk, xy_to_ras
from .segment_io import EditSink

# Mouse travel (display pixels) below which a press-release is a click, not a drag.
DRAG_THRESHOLD_PX = 5.0


@dataclass(frozen=True)
class Action:
    kind: str  # "include", "exclude" or "box"
    xy: tuple[float, float]
    xy_end: tuple[float, float] | None = None


class ClickInterpreter:
    """Turns press / move / release into include, exclude or box actions."""

    def __init__(self, threshold_px: float = DRAG_THRESHOLD_PX) -> None:
        self.threshold_px = threshold_px
        self._start: tuple[float, float] | None = None
        self._exclude = False
        self._dragging = False

    def press(self, xy: tuple[float, float], ctrl: bool = False, shift: bool = False, right: bool = False) -> None:
        self._start = (float(xy[0]), float(xy[1]))
        self._exclude = bool(ctrl or shift or right)
        self._dragging = False

    def move(self, xy: tuple[float, float]) -> tuple[tuple[float, float], tuple[float, float]] | None:
        """The rubber-band rectangle to draw while dragging a box, else None."""
        if self._start is None or self._exclude:
            return None
        if np.hypot(xy[0] - self._start[0], xy[1] - self._start[1]) >= self.threshold_px:
            self._dragging = True
        return (self._start, (float(xy[0]), float(xy[1]))) if self._dragging else None

    def release(self, xy: tuple[float, float]) -> Action | None:
        if self._start is None:
            return None
        start, self._start = self._start, None
        moved = np.hypot(xy[0] - start[0], xy[1] - start[1]) >= self.threshold_px
        if self._exclude:
            return Action("exclude", start)
        if moved or self._dragging:
            return Action("box", start, (float(xy[0]), float(xy[1])))
        return Action("include", start)

    @property
    def active(self) -> bool:
        return self._start is not None


@dataclass
class SlicePrompts:
    """The prompts placed on one slice of one orientation."""

    view: ViewSlice
    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None

    def as_prompts(self) -> Prompts:
        return Prompts(np.array(self.points, dtype=float).reshape(-1, 2), np.array(self.labels, dtype=np.int64),
                       None if self.box is None else np.array(self.box, dtype=float))


class EffectSink(EditSink):
    """Writes through the SAM effect itself (``qSlicerSegmentEditorAbstractEffect``), so the Segment
    Editor's own logic applies its masking, overlap and undo stack to every SAM edit.

    ``scripted_effect`` is the effect's ``scriptedEffect``; ``modes`` maps "add"/"remove" to its
    ``ModificationMode`` values. Edits always go into the segment selected in the Segment Editor
    (``modifySelectedSegmentByLabelmap``), so a write for another segment is refused.
    """

    def __init__(self, scripted_effect: Any, modes: dict[str, int]) -> None:
        self.scripted_effect = scripted_effect
        self.modes = modes

    def prepare(self, segment_id: str) -> None:
        selected = self.scripted_effect.parameterSetNode().GetSelectedSegmentID()
        if selected != segment_id:
            raise SAMSegmentError(f"The Segment Editor's selected segment changed ('{selected}', not '{segment_id}')",
                                  "press Apply again to write into the selected segment")

    def modifier_geometry(self) -> Any:
        # The editor's modifier labelmap on the segmentation's reference geometry (cleared); a
        # modifier on any other grid is dropped when "editable intensity range" is on.
        return self.scripted_effect.defaultModifierLabelmap()

    def save_state_for_undo(self) -> None:
        self.scripted_effect.saveStateForUndo()

    def modify(self, segment_id: str, labelmap: Any, mode: str) -> None:
        self.scripted_effect.modifySelectedSegmentByLabelmap(labelmap, self.modes[mode])


def editor_inputs(parameter_node: Any) -> tuple[Any, Any, str]:
    """(source volume, segmentation, selected segment id) the Segment Editor shows now; a clear error
    when one is missing."""
    volume = parameter_node.GetSourceVolumeNode()
    segmentation = parameter_node.GetSegmentationNode()
    if volume is None or segmentation is None:
        raise SAMSegmentError("The Segment Editor has no segmentation or source volume selected",
                              "select both at the top of the Segment Editor")
    segment_id = parameter_node.GetSelectedSegmentID() or ""
    if not segment_id or segmentation.GetSegmentation().GetSegment(segment_id) is None:
        raise SAMSegmentError("No segment is selected in the Segment Editor",
                              "add or select the segment that should receive the mask")
    return volume, segmentation, segment_id


class EffectController:
    """The effect's state: prompts on the current slice, the preview, apply and cancel.

    ``core`` is a SAMSegmentCore; writes go through its SegmentWriter. Inside the Segment Editor,
    ``parameter_node`` returns the editor's ``vtkMRMLSegmentEditorNode`` and ``sink`` is the
    effect's ``EffectSink``: then every press, decode and Apply first re-reads the source volume,
    segmentation and selected segment the editor shows (``bind``), so changing any of them while
    the effect is active takes effect at once.
    """

    def __init__(self, core: Any, parameter_node: Callable[[], Any] | None = None,
                 sink: EditSink | None = None) -> None:
        self.core = core
        self.parameter_node = parameter_node
        self.sink = sink
        self.interpreter = ClickInterpreter()
        self.state: SlicePrompts | None = None
        self._history: list[SlicePrompts] = []

    def bind(self) -> None:
        """Follow the Segment Editor's source volume, segmentation and selected segment.

        A new volume or segmentation drops the prompts of the old one; a new segment keeps them
        (the preview takes its colour)."""
        if self.parameter_node is None:
            return
        volume, segmentation, segment_id = editor_inputs(self.parameter_node())
        core = self.core
        if volume is not core.volume_node or segmentation is not core.segmentation_node:
            self.cancel()
            core.set_inputs(volume, segmentation, segment_id, sink=self.sink)
        elif segment_id != core.segment_id:
            core.set_segment(segment_id)

    def slice_pixel(self, slice_node, xy: tuple[float, float], view: ViewSlice) -> tuple[float, float]:
        """Display pixel -> pixel of the volume slice shown, ignoring sub-voxel offsets of the plane."""
        ras = xy_to_ras(slice_node, xy)
        ijk = ras_to_ijk(self.core.volume_node, [ras])[0]
        ijk[ijk_component(view.axis)] = view.index
        px = ijk_to_slice_xy([ijk], view.axis)[0]
        return float(px[0]), float(px[1])

    def press(self, slice_node, xy: tuple[float, float], ctrl: bool = False, shift: bool = False,
              right: bool = False) -> None:
        """Mouse down in ``slice_node``'s view: the click or drag starts, and so does the encode of
        the slice shown. Dragging a box takes about as long as one encode on a CPU (~0.8 s), so the
        mask can be ready almost when the button comes up instead of a second later."""
        self.interpreter.press(xy, ctrl=ctrl, shift=shift, right=right)
        try:
            self.bind()
            view = self.core.view_slice(slice_node)
        except SAMSegmentError:
            return  # the release reports what is wrong with this view
        if view.inside:
            self.core.warm(view)

    def handle(self, slice_node, action: Action) -> int:
        """Apply one action in ``slice_node``'s view and ask the server for the new mask; ``poll()``
        shows it when it arrives (the mouse handler never waits). Returns the request's number."""
        self.bind()
        view = self.core.view_slice(slice_node)
        if not view.inside:
            raise SAMSegmentError("The click is outside the source volume", "click on the image")
        if self.state is None or (self.state.view.axis, self.state.view.index) != (view.axis, view.index):
            self.state = SlicePrompts(view)
            self._history.clear()
        self._history.append(SlicePrompts(view, list(self.state.points), list(self.state.labels), self.state.box))
        if action.kind == "box":
            a = self.slice_pixel(slice_node, action.xy, view)
            b = self.slice_pixel(slice_node, action.xy_end, view)
            self.state.box = (min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1]))
        else:
            self.state.points.append(self.slice_pixel(slice_node, action.xy, view))
            self.state.labels.append(INCLUDE if action.kind == "include" else EXCLUDE)
        return self.core.request(view, self.state.as_prompts(), refine=True)

    def poll(self) -> Any:
        """From the effect's timer: the new preview when one arrived (else None). A prompt the
        server refused is dropped from this slice's prompts, and its error raised."""
        return self._keeping_accepted_prompts(self.core.poll)

    def wait(self) -> Any:
        """Block until the latest request is shown (scripts and tests); as ``poll`` for a refusal."""
        return self._keeping_accepted_prompts(self.core.wait_for_requests)

    def _keeping_accepted_prompts(self, receive: Callable[[], Any]) -> Any:
        try:
            return receive()
        except SAMSegmentError:
            if self._history and self.state is not None:
                self.state = self._history.pop()  # the refused prompt is not kept
            raise

    def undo(self) -> None:
        """Remove the last prompt on this slice and ask for the previous proposal again."""
        if not self._history or self.state is None:
            return
        self.state = self._history.pop()
        self.core.reset_prompts(self.state.view.ref)
        # no prompts left: the request clears the preview
        self.core.request(self.state.view, self.state.as_prompts(), refine=False)

    def apply(self) -> int:
        """Write the preview into the selected segment (one undo step); returns the voxels set."""
        self.bind()
        written = self.core.accept()
        self.cancel(keep_preview=True)
        return written

    def cancel(self, keep_preview: bool = False) -> None:
        self.core.cancel_requests()
        if self.state is not None and self.core.link is not None:
            self.core.reset_prompts(self.state.view.ref)
        self.state = None
        self._history.clear()
        if not keep_preview and self.core.preview is not None:
            self.core.current = None
            self.core.preview.clear()
