"""Propagate a mask from accepted (anchor) slices to their neighbours, slice by slice.

Each next slice is prompted only from the previous slice's result. LiteMedSAM is very
sensitive to how loose the box is, and no fixed padding is best for every organ, so the default
policy (``PromptPolicy``) tests on the anchor whether a tight box is stable and, while one leads,
decodes a looser one beside it to catch a shrinking spiral (a decoder call is cheap next to an
encode).

Slices the user accepted are anchors: never predicted, never overwritten. Between two anchors
the gap is filled from both ends at once, so each slice is predicted from its nearer anchor.
Boxes drawn on slices (``boxes``) are anchors too, once decoded; a slice between two of them is
prompted with the box interpolated between them averaged with its neighbour's mask box. A 3D box
(``bounds``, a ``Box3D``) is a prompt of its own: its in-plane box seeds its middle slice (the
seed mask decoded once more from its own box, ``PromptPolicy.seed_refits``), nothing is written
outside it, and on its last slices the structure's tip is decoded from the previous mask's own box
(``PromptPolicy.box_end_tip``).

A mask that leaks into a neighbour of other intensity (the MR liver on thick slices) is cut back
to the anchor's intensity range (``PromptPolicy.trim_below``), and a slice once both its
neighbours are decided is decoded again from what they share and takes that mask when it is smaller
and agrees better with both (``PromptPolicy.neighbour_check``; the chain goes on from the first
masks); a front's last slice on the volume's edge, which has one neighbour, is decoded again from
tighter boxes around that neighbour's mask (``PromptPolicy.edge_paddings``).

``propagate_iter`` is a generator over the decided slices, as SAM2's ``propagate_in_video``: the
caller sets the pace and stops the run by no longer iterating. ``propagate`` collects it into a
``PropagationResult`` and offers callbacks for the GUI and the CLI.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import Future, wait
from contextlib import closing
from dataclasses import dataclass, field
from enum import Enum
from itertools import pairwise
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .box3d import Box3D
from .errors import PromptError, SAMSegmentError, VolumeError
from .metrics import dice, iou
from .preprocessing import clip_box, mask_bbox
from .prompts import Prompts, check_prompts
from .session_protocol import SessionProtocol
from .volume import SliceRef, slice_shape
from .worker import PRIORITY_PROPAGATION, CancelToken, ProgressCallback, WorkerClosedError

if TYPE_CHECKING:
    from .session import Prediction

log = logging.getLogger(__name__)


class StopReason(str, Enum):
    """Why a propagation front stopped (the value reads as a sentence's end)."""

    EMPTY = "empty mask"
    TOO_SMALL = "mask smaller than the minimum area"
    LOW_IOU = "overlap with the previous slice below the threshold"
    LOW_SCORE = "predicted quality below the threshold"
    RANGE_LIMIT = "range limit reached"
    VOLUME_EDGE = "edge of the volume"
    ANCHOR = "reached an accepted slice"
    MET = "met the propagation coming from the other end"
    INTENSITY = "mask intensities no longer match the accepted slice"
    CONSTANT_SLICE = "slice has no contrast in the window"
    BOX_END = "end of the 3D box reached"
    CANCELLED = "cancelled"


SEED_CANDIDATE = "box"  # SliceOutcome.candidate of a slice decoded from a drawn box or a 3D box's cross-section

DIRECTIONS = {"both": (1, -1), "up": (1,), "down": (-1,), "+": (1,), "-": (-1,)}

Decode = Callable[..., "Prediction"]  # (prompts, mask_input=None) -> Prediction on one slice


@dataclass
class PromptPolicy:
    """How the next slice is prompted from the previous mask, and which candidate is kept.

    Default (``paddings`` None): a tight box (previous mask's box + ``tight_padding`` px) keeps
    neighbouring structures out of the mask, but on some structures it starts a spiral (tight box
    -> smaller mask -> tighter box). So the tight box leads only where the anchor shows it stable
    (``calibrate``), and while it leads a loose box (+ ``safe_padding`` px) is decoded beside it;
    when the tight mask falls below ``switch_area_ratio`` of the loose one, the front goes on with
    the loose track. ``paddings`` given: one candidate per padding (``max(pad_px, pad_fraction *
    box side)``), optionally with the previous logits as mask input; the closest to the previous
    mask (Dice) is kept. Masks are ``logits > mask_threshold``: at 0 a loose box leaves a rim of
    about a pixel that the next box carries forward, while high thresholds start the spiral.
    The thresholds were tuned with ``bench/accuracy.py`` (figures in the README and in
    ``bench/thick_slices.md``). ``trim_below``: a mask whose pixels lie less than 80 % in the
    anchor mask's 5th-95th percentile intensities keeps only those pixels (and, from 70 %, those
    inside the previous mask), so a leak into tissue of other intensity does not feed the next box.
    """

    paddings: tuple[tuple[float, float], ...] | None = None  # None: tight where safe, else loose
    use_mask_input: bool = False
    mask_threshold: float = 0.5
    tight_padding: float = 2.0
    safe_padding: float = 3.0
    calibration_rounds: int = 3
    min_stable_area_ratio: float = 0.95
    switch_area_ratio: float = 0.7
    # Between two drawn boxes: the box decoded is guide_weight x the box interpolated between them
    # + (1 - guide_weight) x the box from the previous mask.
    guide_weight: float = 0.5
    # A mask of which less than trim_below of the pixels lie in the anchor's intensity range (a leak
    # into a neighbour of other intensity) keeps only its pixels in that range (an opening against
    # single-pixel bridges, holes filled, the components touching the previous mask); from an
    # agreement of trim_keep_previous on, its pixels inside the previous mask are kept too (a
    # small or mixed structure's rim: aorta, stomach). trim_below 0 disables.
    trim_below: float = 0.8
    trim_opening: bool = True
    trim_keep_previous: float = 0.7
    # End of a structure from its area trend and the intensity model together: a front whose area
    # was already falling (the previous slice kept less than end_shrinking_below of the one before)
    # stops where the mask had to be trimmed to the anchor's intensities and kept less than
    # end_trimmed_below of the previous area: past a tapering end the box catches the neighbours,
    # and what is left of their pixels in range is a rim of partial volume, not the structure.
    # Neither sign alone: a tube (the aorta) is trimmed at an even area, and a tapering end that
    # stays in range is the structure. end_trimmed_below 0 disables.
    end_trimmed_below: float = 0.5
    end_shrinking_below: float = 0.8
    # A mask that keeps less than rescue_below of the previous mask's area is decoded again from
    # looser boxes (the previous mask's box + each of rescue_paddings, as ``paddings``): on thick
    # slices a structure moves or widens by more than the pixel or two of slack in the tight and
    # loose boxes, and the model then cuts it at the box edge (the CT right kidney). The looser
    # mask closest to the previous one (Dice) replaces it when it is closer than the cut mask,
    # keeps at most rescue_max_growth of the previous area (not a neighbour taken in), agrees with
    # the anchor's intensities within rescue_agreement_slack of the cut mask, and the pixels it adds
    # lie at least rescue_added_agreement in the anchor's range: the tissue goes on past the cut,
    # whereas at a structure's true end the shrinking mask's surroundings are partial volume or
    # another tissue, and the small mask is kept. rescue_below 0 disables.
    rescue_below: float = 0.6
    rescue_paddings: tuple[tuple[float, float], ...] = ((4.0, 0.0), (5.0, 0.0))
    rescue_max_growth: float = 1.15
    rescue_agreement_slack: float = 0.05
    rescue_added_agreement: float = 0.85
    # A slice both of whose neighbours are decided gets a second look: its box is taken from what the
    # two neighbours' masks share (+ neighbour_padding px), and the mask decoded from it replaces the
    # slice's when it is smaller and agrees better with both neighbours (mean Dice). A mask that took
    # in tissue neither neighbour has (the MR spleen's and liver's on thick slices) is cut back,
    # while the propagation itself goes on from the first mask, so the check never feeds the chain.
    # The slice is handed out one step later (when its next neighbour is decided).
    neighbour_check: bool = True
    neighbour_padding: float = 3.0
    # 3D box. The box's in-plane extent is the union of the structure's boxes on all its slices, so on
    # the seed slice it is looser than the structure: a seed decoded from that cross-section (not from
    # a box the user drew inside the 3D box) is decoded again from its own mask's box (widened by the
    # box margin, as a drawn box) seed_refits times, and the refit is kept unless the
    # model's own quality estimate falls by more than seed_refit_score_drop or the mask loses more
    # than 1 - seed_refit_min_area of its area (LiteMedSAM loses the MR kidneys from boxes that
    # tight). And a mask shrinking on the box's last box_end_no_rescue slices is the structure
    # tapering to the end the box gives, not a cut to rescue with a looser box.
    seed_refits: int = 1
    seed_refit_score_drop: float = 0.02
    seed_refit_min_area: float = 0.85
    box_end_no_rescue: int = 1
    # The structure's tip at the 3D box's end. The box says where the structure ends; there it tapers,
    # and its last cross-section lies within the one before it, whereas the tracks' padded boxes take
    # in what surrounds a tapering end (fat, the hilum's vessels). So the box's last slice is decoded
    # from the previous mask's box + tip_padding px:
    # - box_end_tip: where that slice is inside the volume (a box face on the volume's edge says
    #   nothing about the structure's end: the scan cuts the structure there);
    # - box_end_tip_below: where the stop rules would end a front one slice short of the box's last
    #   slice (volume edge or not), that slice still gets this mask when it keeps less than
    #   box_end_tip_below of the previous area: the box says the structure reaches that slice, whose
    #   tip, mostly partial volume, fails the intensity rules; a mask as large as the previous one
    #   there is no tip (0 disables).
    tip_padding: float = 0.0
    box_end_tip: bool = True
    box_end_tip_below: float = 0.6
    # The anchor's intensity range (trim, stop and rescue rules) is its mask's 5th-95th percentiles. On
    # a large structure it is narrowed to those of the mask's interior (range_core_erosion px in from
    # its edge) when that interior keeps at least range_core_min_area of the mask: the edge holds
    # partial volume and, on an anchor that took in some neighbouring tissue (the MR liver's), that
    # tissue's intensities, which would then pass the trim slice after slice. A small structure's
    # interior is not its tissue (a kidney's medulla without its cortex): its range stays whole.
    range_core_erosion: int = 4
    range_core_min_area: float = 0.5
    # The volume's edge. A front's last slice on the volume's first or last slice has one neighbour, so
    # no second look; there the scan cuts the structure, and the loose box carries the previous slice's
    # slack past the cut (the CT right kidney's hilum on the scan's first slice). Such a slice, larger
    # than its neighbour's mask, is decoded again from the neighbour's mask box + each of edge_paddings
    # px and takes the smaller mask that agrees best with the neighbour (Dice), where it agrees better
    # than its own. () disables.
    edge_paddings: tuple[float, ...] = (0.0, 1.0)

    def calibrate(self, decode: Callable[[Prompts], Prediction], anchor_mask: np.ndarray) -> float:
        """How much of the anchor's area the tight-box loop keeps on the anchor's own slice.

        Args:
            decode: decodes a prompt on the anchor's slice.
            anchor_mask: the accepted mask.

        Returns:
            Area after ``calibration_rounds`` of mask -> box + ``tight_padding`` -> mask, as a
            fraction of the anchor's area (the tight box may lead from ``min_stable_area_ratio``).
        """
        tight = self.fixed(self.tight_padding)
        mask = np.asarray(anchor_mask, dtype=bool)
        for _ in range(self.calibration_rounds):
            if not mask.any():
                break
            _, prompts, _ = tight.candidates(mask, None)[0]
            mask = self.threshold(decode(prompts)).mask
        return float(np.count_nonzero(mask) / max(1, np.count_nonzero(anchor_mask)))

    @property
    def two_tracks(self) -> bool:
        """Whether this is the default policy (tight and loose box tracks)."""
        return self.paddings is None

    def fixed(self, pad_px: float) -> PromptPolicy:
        """This policy with one fixed padding of ``pad_px``."""
        return dataclasses.replace(self, paddings=((float(pad_px), 0.0),))

    def candidates(self, prev_mask: np.ndarray, prev_low_res: Any) -> list[tuple[str, Prompts, Any]]:
        """The prompts to decode on the next slice.

        Args:
            prev_mask: the previous slice's mask (not empty).
            prev_low_res: its low-res logits (mask input when ``use_mask_input``), or None.

        Returns:
            (name, box prompt, mask input or None) per candidate; the default policy gives its
            loose box only (``propagate`` builds the tight track itself).
        """
        h, w = prev_mask.shape
        x0, y0, x1, y1 = mask_bbox(prev_mask)
        out = []
        for pad_px, pad_frac in self.paddings if self.paddings is not None else ((self.safe_padding, 0.0),):
            px = max(pad_px, pad_frac * (x1 - x0 + 1))
            py = max(pad_px, pad_frac * (y1 - y0 + 1))
            box = clip_box(np.array([x0 - px, y0 - py, x1 + px, y1 + py]), h, w)
            name = f"box+{pad_px:g}px/{pad_frac:.0%}"
            out.append((name, Prompts(box=box), None))
            if self.use_mask_input and prev_low_res is not None:
                out.append((name + "+mask", Prompts(box=box), prev_low_res))
        return out

    def choose(self, prev_mask: np.ndarray, predictions: list[tuple[str, Prediction]]) -> tuple[str, Prediction]:
        """The candidate to keep.

        Args:
            prev_mask: the previous slice's mask.
            predictions: (name, prediction) per candidate, in ``candidates`` order.

        Returns:
            (name, re-thresholded prediction) of the first candidate with the best Dice against
            ``prev_mask``.
        """
        predictions = [(name, self.threshold(pred)) for name, pred in predictions]
        best, best_score = predictions[0], -1.0
        for name, pred in predictions:
            d = dice(prev_mask, pred.mask)
            if d > best_score:
                best, best_score = (name, pred), d
        return best

    def threshold(self, pred: Prediction) -> Prediction:
        """``pred`` with its mask re-thresholded at ``mask_threshold`` (from its full-res ``logits``)."""
        if self.mask_threshold == 0.0 or pred.logits is None:
            return pred
        return dataclasses.replace(pred, mask=np.asarray(pred.logits) > self.mask_threshold)


@dataclass
class StopRules:
    """When a direction stops. Areas are in pixels of the slice."""

    min_area_px: int = 4
    min_area_fraction: float = 0.0  # of the previous slice's area; 0 disables
    min_iou: float = 0.2
    min_score: float = 0.0
    # Fraction of the new mask's pixels whose (windowed) intensity lies inside the anchor mask's
    # 5th-95th percentile range. A box prompt always yields *some* mask, so past the end of an
    # organ the model happily outlines a blob of neighbouring fat or bowel with high overlap and
    # score; its intensities give it away. 0 disables.
    min_intensity_agreement: float = 0.5
    max_slices: int | None = None  # per direction, from its anchor
    index_range: tuple[int, int] | None = None  # inclusive bounds along the axis; every anchor lies inside

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse rules that cannot mean anything (run again by ``propagate``, as fields may be set later).

        Raises:
            SAMSegmentError: a NaN or infinite threshold (a NaN comparison is always false, so it
                would switch its rule off silently), a fraction outside 0..1, a negative area or
                slice count, or a range whose first slice is after its last.
        """
        def number(name: str, value: Any, low: float | None = None, high: float | None = None, unit: str = "") -> None:
            bad = isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
            if bad or not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
                span = f" between {low:g} and {high:g}" if high is not None else (f" >= {low:g}" if low is not None else "")
                raise SAMSegmentError(f"Stop rule {name} = {value!r} must be a finite number{span}",
                                      f"give {name} a number{span}{unit}")

        number("min_area_px", self.min_area_px, 0, unit=" (pixels; 0 disables the rule)")
        number("min_area_fraction", self.min_area_fraction, 0, 1, " (0 disables the rule)")
        number("min_iou", self.min_iou, 0, 1, " (0 disables the rule)")
        number("min_score", self.min_score)
        number("min_intensity_agreement", self.min_intensity_agreement, 0, 1, " (0 disables the rule)")
        if self.max_slices is not None:
            if isinstance(self.max_slices, bool) or not isinstance(self.max_slices, (int, np.integer)) \
                    or self.max_slices < 0:
                raise SAMSegmentError(f"Stop rule max_slices = {self.max_slices!r} is not a slice count >= 0",
                                      "give how many slices each direction may write at most, or None for no limit")
        if self.index_range is not None:
            bounds = tuple(self.index_range)
            if len(bounds) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in bounds):
                raise SAMSegmentError(f"Index range {self.index_range!r} is not two slice indices (first, last)",
                                      "give the first and the last slice to propagate into, e.g. (10, 40)")
            if bounds[0] > bounds[1]:
                raise SAMSegmentError(f"Index range {bounds[0]}..{bounds[1]} is empty: the first slice is after the last",
                                      f"give the lower index first ({bounds[1]} {bounds[0]})")


@dataclass
class SliceOutcome:
    """How one slice was decided: from which neighbour, with which candidate, and its measures."""

    index: int
    from_index: int
    direction: int
    score: float
    area: int
    iou_previous: float
    candidate: str


@dataclass
class RunStop:
    """Where and why one propagation front stopped."""

    anchor: int
    direction: int
    last_index: int  # last slice written by this front (== anchor when none)
    reason: StopReason
    at_index: int | None = None  # the slice whose result triggered the stop, if any


@dataclass
class PropagationResult:
    """What one propagation run decided: the new slices, and why each front stopped."""

    axis: int
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # new slices only (anchors excluded)
    outcomes: dict[int, SliceOutcome] = field(default_factory=dict)
    stops: list[RunStop] = field(default_factory=list)
    cancelled: bool = False
    # anchor -> area kept by the tight-box loop on it (PromptPolicy.calibrate), default policy only
    anchor_stability: dict[int, float] = field(default_factory=dict)

    def to_volume(self, shape: tuple[int, int, int], anchors: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
        """The propagated slices as a bool volume.

        Args:
            shape: the volume's shape.
            anchors: slice index -> accepted mask, written too (under the propagated slices).

        Returns:
            A bool array of ``shape``, False outside the propagated (and anchor) slices.
        """
        vol = np.zeros(shape, dtype=bool)
        for source in (anchors or {}, self.masks):
            for index, mask in source.items():
                idx: list[Any] = [slice(None)] * 3
                idx[self.axis] = index
                vol[tuple(idx)] = mask
        return vol

    def seeds(self) -> list[SliceOutcome]:
        """The slices this run decoded from a box (a drawn box, or a 3D box's cross-section) before it
        propagated from them, in slice order: where it started, and how sure the model was there."""
        return [o for _, o in sorted(self.outcomes.items()) if o.direction == 0 and o.candidate == SEED_CANDIDATE]


class PropagatedSlice(NamedTuple):
    """One slice decided by propagation, as ``propagate_iter`` yields it."""

    index: int
    mask: np.ndarray  # bool (H, W)
    outcome: SliceOutcome


def intensity_agreement(image: np.ndarray, mask: np.ndarray, value_range: tuple[float, float]) -> float:
    """How well a mask's intensities match the anchor's.

    Args:
        image: the slice's windowed image.
        mask: the mask on that slice.
        value_range: (low, high) intensities, e.g. the anchor mask's 5th-95th percentiles.

    Returns:
        The fraction of ``mask`` pixels of ``image`` within ``value_range`` (inclusive, +-1 grey
        level); 0 for an empty mask.
    """
    values = image[mask]
    if values.size == 0:
        return 0.0
    lo, hi = value_range
    inside = (values >= lo - 1.0) & (values <= hi + 1.0)
    return float(np.count_nonzero(inside)) / values.size


def anchor_intensity_range(image: np.ndarray, mask: np.ndarray, policy: PromptPolicy) -> tuple[float, float]:
    """The intensities a propagated mask is checked against (see ``PromptPolicy.range_core_erosion``).

    Args:
        image: the anchor slice's windowed image.
        mask: the anchor's mask (not empty).
        policy: gives the erosion and the interior's least share of the mask.

    Returns:
        (low, high): the mask's 5th-95th percentile intensities, narrowed to its interior's when the
        interior is large enough.
    """
    lo, hi = (float(v) for v in np.percentile(image[mask], (5, 95)))
    if policy.range_core_erosion > 0:
        from scipy import ndimage

        core = ndimage.binary_erosion(mask, iterations=policy.range_core_erosion)
        if core.any() and np.count_nonzero(core) >= policy.range_core_min_area * np.count_nonzero(mask):
            core_lo, core_hi = (float(v) for v in np.percentile(image[core], (5, 95)))
            lo, hi = max(lo, core_lo), min(hi, core_hi)
    return lo, hi


def propagate_iter(session: SessionProtocol, axis: int, anchors: Mapping[int, np.ndarray] | None = None,
                   direction: str = "both", rules: StopRules | None = None, policy: PromptPolicy | None = None,
                   cancel: CancelToken | None = None, anchor_logits: Mapping[int, Any] | None = None,
                   lookahead: int = 1, boxes: Mapping[int, Any] | None = None,
                   bounds: Box3D | Mapping | None = None) -> Generator[PropagatedSlice, None, PropagationResult]:
    """Propagate from ``anchors`` along ``axis``, yielding each slice once it is settled.

    The inputs are checked at the call, before anything runs. The fronts (one per anchor and
    direction) take turns, one slice each. A front holds each slice back until it has decided the
    next one, so that the slice can take a second look from both its neighbours
    (``PromptPolicy.neighbour_check``); its last slice comes when it stops. Each slice is yielded
    once, in the order the fronts settle them. To stop, stop iterating and close the generator
    (``break`` in a ``with contextlib.closing(...)`` block, or ``close()``): queued look-ahead
    encodes are cancelled and the one already running is waited for, so no work of the run goes on
    after ``close()`` returns; slices held back are dropped (they are not in the result). ``cancel``
    does the same from another thread (where the generator may be busy and cannot be closed),
    before the next slice, but first yields the slices held back (at most one per front, as
    decided, without their second look). A run that ends by itself cancels its queued look-ahead
    but does not wait for an encode already running: that slice finishes into the session's cache.

    Args:
        session: the session holding the volume (``SessionProtocol``).
        axis: the axis along which to propagate (0, 1 or 2).
        anchors: slice index -> accepted 2D mask; never predicted, never overwritten.
        direction: "both", "up" (increasing index) or "down" (decreasing index), for the outer
            ends; gaps between anchors are always filled from both ends.
        rules: when a front stops (default ``StopRules()``).
        policy: how each next slice is prompted (default ``PromptPolicy()``).
        cancel: a token that ends the run at the next slice (the result says ``cancelled``).
        anchor_logits: slice index -> an anchor's low-res logits, mask input for its first
            neighbours when ``policy.use_mask_input``.
        lookahead: how many slices beyond the current one each front keeps queued for encoding
            on the session's worker, so the encoder works on slice n+1 while slice n is decoded
            and checked. 0 encodes, then decodes, one slice at a time. The masks are identical
            either way: every slice is decoded from its cached embedding.
        boxes: slice index -> a box (x0, y0, x1, y1) drawn on that slice, in its pixels, as the user
            drew it (widened by the session's box margin as ``predict`` widens it). Each is decoded
            first (yielded with the candidate "box") and becomes an anchor of the run; a slice
            between two drawn boxes is prompted with ``policy.guide_weight`` x the box
            interpolated between them + the rest x the box from its neighbour's mask.
        bounds: a 3D box (``Box3D``, or its ``to_json`` dict): no slice outside its range along
            ``axis`` is written (the fronts stop with ``BOX_END``), no mask pixel lies outside it,
            and every box decoded stays inside its in-plane box (widened by the box margin).
            Without ``anchors`` and ``boxes``, its in-plane box seeds its middle slice.

    Returns:
        A generator of ``PropagatedSlice`` (index, mask, outcome). Run to its end (or to a
        ``cancel``), its return value (``StopIteration.value``, or ``result = yield from ...``) is
        the whole ``PropagationResult``, with why each front stopped.

    Raises:
        SAMSegmentError: unknown ``direction``; ``PromptError``/``VolumeError`` for anchors that
        are missing, empty, of the wrong shape or outside the volume, boxes that cannot be
        decoded, or a 3D box outside the volume.
    """
    return _Propagation(session, axis, anchors, direction, rules, policy, anchor_logits, lookahead, boxes,
                        bounds).run(cancel)


def propagate(session: SessionProtocol, axis: int, anchors: Mapping[int, np.ndarray] | None = None,
              direction: str = "both", rules: StopRules | None = None, policy: PromptPolicy | None = None,
              on_slice: Callable[[SliceRef, np.ndarray, SliceOutcome], None] | None = None,
              progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
              anchor_logits: Mapping[int, Any] | None = None, lookahead: int = 1,
              boxes: Mapping[int, Any] | None = None, bounds: Box3D | Mapping | None = None) -> PropagationResult:
    """Propagate from ``anchors`` along ``axis`` to the end: ``propagate_iter``, collected.

    Args:
        session, axis, anchors, direction, rules, policy, anchor_logits, lookahead, boxes, bounds: as
            for ``propagate_iter``.
        on_slice: called with (slice, mask, outcome) for each slice as soon as it is settled, on
            the calling thread, so a GUI can show progress.
        progress: called with (slices done, most slices the fronts may write, message).
        cancel: a token polled before each slice; a cancelled run returns what was decided so
            far, all of it consistent.

    Returns:
        The new slices' masks and outcomes, why each front stopped, whether the run was
        cancelled, and the anchors' tight-box stability.
    """
    run = _Propagation(session, axis, anchors, direction, rules, policy, anchor_logits, lookahead, boxes, bounds)
    with closing(run.run(cancel)) as slices:  # an exception in a callback still ends the run's work
        for done, (index, mask, outcome) in enumerate(slices, 1):
            if on_slice is not None:
                on_slice(SliceRef(axis, index), mask, outcome)
            if progress is not None:
                progress(done, run.total, f"slice {index}")
    return run.result


class _Front:
    """One direction of propagation from one anchor: the previous slice's mask, the prompt
    track(s) it decodes, and the tests that stop it."""

    def __init__(self, anchor: int, step: int, limit: int, limit_reason: StopReason, mask: np.ndarray,
                 low_res: Any, intensity_range: tuple[float, float]) -> None:
        self.anchor, self.step = anchor, step
        self.limit, self.limit_reason = limit, limit_reason  # last index this front may write (inclusive)
        self.index, self.mask, self.low_res = anchor, mask, low_res  # the last slice decided
        self.intensity_range = intensity_range  # of the anchor mask's pixels (5th-95th percentile)
        self.calibrated = False
        self.tight_leads = False  # default policy: the tight track is the one written
        self.safe_mask: np.ndarray | None = None  # the loose track's previous mask while the tight one leads
        self.stopped: RunStop | None = None
        self.areas = [int(np.count_nonzero(mask))]  # of the slices decided so far, from the anchor
        # the last slice decided, handed out once its next neighbour is decided (PromptPolicy.neighbour_check)
        self.pending: PropagatedSlice | None = None

    @property
    def planned(self) -> int:
        """How many slices this front may write at most."""
        return max(0, (self.limit - self.anchor) * self.step)

    def beyond_limit(self, index: int) -> bool:
        return (index - self.limit) * self.step > 0

    def ahead(self, index: int, count: int, claimed: set[int]) -> list[int]:
        """Up to ``count`` slices after ``index`` in this front's direction that it may still write."""
        out = []
        for j in range(1, count + 1):
            i = index + j * self.step
            if self.beyond_limit(i) or i in claimed:
                break
            out.append(i)
        return out

    def set_tight_leads(self, tight_leads: bool) -> None:
        """Start the default policy's tracks: tight and loose from the anchor, or loose only."""
        self.calibrated = True
        self.tight_leads = tight_leads
        self.safe_mask = self.mask if tight_leads else None

    def predict(self, decode: Decode, policy: PromptPolicy) -> tuple[str, Prediction]:
        """Decode the next slice from this front's previous mask(s) (``decode`` prompts that slice).

        Returns:
            (candidate name, prediction) of the mask to write; the default policy also moves its
            tracks on (or drops the tight one when it shrinks away).
        """
        if not policy.two_tracks or not self.tight_leads or self.safe_mask is None:
            single = policy  # fixed paddings
            if policy.two_tracks:  # one track left: the loose one after a switch, else the tight one
                single = policy.fixed(policy.tight_padding if self.tight_leads else policy.safe_padding)
            return single.choose(self.mask, [(name, decode(prompts, mask_input))
                                             for name, prompts, mask_input in single.candidates(self.mask, self.low_res)])
        tight_name, tight_prompts, _ = policy.fixed(policy.tight_padding).candidates(self.mask, None)[0]
        safe_name, safe_prompts, _ = policy.fixed(policy.safe_padding).candidates(self.safe_mask, None)[0]
        tight = policy.threshold(decode(tight_prompts))
        safe = policy.threshold(decode(safe_prompts))
        if tight.area < policy.switch_area_ratio * safe.area:
            self.tight_leads, self.safe_mask = False, None  # the tight track shrinks away: go on with the loose one
            return safe_name + " (tight track shrank)", safe
        self.safe_mask = safe.mask if safe.area else None  # an empty loose track can no longer be followed
        return tight_name, tight

    def stop_reason(self, pred: Prediction, overlap: float, rules: StopRules,
                    image: Callable[[], np.ndarray]) -> StopReason | None:
        """Why ``pred`` (IoU ``overlap`` with the previous mask) ends this front, or None to write it;
        ``image`` gives the slice's windowed image (read only for the intensity test)."""
        area = pred.area
        if area == 0:
            return StopReason.EMPTY
        if area < rules.min_area_px or area < rules.min_area_fraction * np.count_nonzero(self.mask):
            return StopReason.TOO_SMALL
        if overlap < rules.min_iou:
            return StopReason.LOW_IOU
        if pred.score < rules.min_score:
            return StopReason.LOW_SCORE
        if rules.min_intensity_agreement > 0 and intensity_agreement(
                image(), pred.mask, self.intensity_range) < rules.min_intensity_agreement:
            return StopReason.INTENSITY
        return None

    def ending(self, trimmed_area: int, policy: PromptPolicy) -> bool:
        """Whether a mask trimmed to ``trimmed_area`` ends this front (see ``PromptPolicy.end_trimmed_below``)."""
        if policy.end_trimmed_below <= 0 or len(self.areas) < 2:
            return False
        before, previous = self.areas[-2:]
        return trimmed_area < policy.end_trimmed_below * previous and previous < policy.end_shrinking_below * before

    def advance(self, index: int, pred: Prediction) -> None:
        self.index, self.mask, self.low_res = index, pred.mask, pred.low_res_logits
        self.areas.append(int(np.count_nonzero(pred.mask)))


class _Encodes:
    """The encodes one run queued on the session's worker, by slice index (its look-ahead)."""

    def __init__(self, session: SessionProtocol, axis: int) -> None:
        self.session, self.axis = session, axis
        self._futures: dict[int, Future] = {}

    def start(self, index: int) -> None:
        if index not in self._futures:
            self._futures[index] = self.session.encode_async(SliceRef(self.axis, index), PRIORITY_PROPAGATION)

    def wait_for(self, index: int, ahead: list[int]) -> None:
        """Return once slice ``index`` is encoded, leaving the ``ahead`` slices queued behind it.

        The slice's own encode is queued before the look-ahead ones, and waited for through its
        own future (not a new worker call, which would queue behind every look-ahead submitted).
        """
        for i in (index, *ahead):
            self.start(i)
        self._futures.pop(index).result()

    def drop(self, indices: list[int]) -> None:
        """Cancel the queued encodes of ``indices``; one already running stays listed (``close``
        waits for it), and finishes into the cache."""
        for i in indices:
            future = self._futures.get(i)
            if future is not None and future.cancel():
                del self._futures[i]

    def close(self, wait_running: bool) -> None:
        """Cancel every queued encode; with ``wait_running``, also wait for the one running, if
        any, so that none is left."""
        futures = list(self._futures.values())
        self._futures.clear()
        for future in futures:
            future.cancel()
        if wait_running:
            wait(futures)


class _Propagation:
    """One propagation run: its fronts, the slices claimed so far, its encodes and its result
    (SAM2's explicit inference state). Building it checks the inputs; ``run`` steps it."""

    def __init__(self, session: SessionProtocol, axis: int, anchors: Mapping[int, np.ndarray] | None, direction: str,
                 rules: StopRules | None, policy: PromptPolicy | None, anchor_logits: Mapping[int, Any] | None,
                 lookahead: int, boxes: Mapping[int, Any] | None = None, bounds: Box3D | Mapping | None = None) -> None:
        self.session, self.axis = session, axis
        self.rules = rules or StopRules()
        self.policy = policy or PromptPolicy()
        self.lookahead = lookahead
        if direction not in DIRECTIONS:
            raise SAMSegmentError(f"Unknown propagation direction {direction!r}", "use both, up or down")
        self.rules.check()
        shape = session.shape
        self.bounds = _checked_bounds(shape, axis, bounds)
        self.index_range = self.rules.index_range
        if self.bounds is not None:  # the 3D box's slice range, within the rules' range if any
            first, last = self.bounds.slice_range(axis)
            if self.index_range is not None:
                first, last = max(first, self.index_range[0]), min(last, self.index_range[1])
                if first > last:
                    raise PromptError(f"The 3D box's slices {self.bounds.slice_range(axis)} and the range "
                                      f"{self.index_range} have none in common", "widen the range or move the 3D box")
            self.index_range = (first, last)
        boxes = dict(boxes or {})
        if self.bounds is not None and not anchors and not boxes:  # the 3D box alone: its box seeds its middle slice
            boxes = {self.bounds.middle(axis): self.bounds.plane_box(axis)}
        self.boxes = _checked_boxes(shape, axis, boxes, anchors or {})
        self.anchors = _checked_anchors(shape, axis, anchors or {}, allow_empty=bool(self.boxes))
        check_anchors_in_range({**self.anchors, **self.boxes}, self.index_range)
        self.anchor_logits = dict(anchor_logits or {})
        self.claimed = set(self.anchors) | set(self.boxes)
        self.steps = DIRECTIONS[direction]
        self.plan = self._plan(self.steps)
        self.fronts: list[_Front] = []
        self.total = len(self.boxes) + sum(max(0, (limit - a) * step) for a, step, limit, _ in self.plan)
        self.encodes = _Encodes(session, axis)
        self.result = PropagationResult(axis=axis)
        self._box_ends = sorted(self.boxes)  # slices whose drawn boxes guide the slices between them
        self.decided: dict[int, np.ndarray] = dict(self.anchors)  # every mask as first decided, anchors included
        self._ready: list[PropagatedSlice] = []  # settled slices, to hand out in this order

    def _plan(self, steps: tuple[int, ...]) -> list[tuple[int, int, int, StopReason]]:
        """(anchor, step, last index, why it stops there) of each front: the outer ends in ``steps``,
        then both ends of each gap between anchors (accepted masks and boxes alike)."""
        n = self.session.shape[self.axis]
        order = sorted(self.claimed)
        plan = []
        if 1 in steps:
            plan.append((order[-1], 1, n - 1))
        if -1 in steps:
            plan.append((order[0], -1, 0))
        for a, b in pairwise(order):
            if b - a > 1:
                plan += [(a, 1, b - 1), (b, -1, a + 1)]
        return [(anchor, step, *self._limit(anchor, step, natural)) for anchor, step, natural in plan]

    def _fronts(self) -> list[_Front]:
        """The fronts of ``plan``, from the accepted masks and the masks decoded from the boxes."""
        fronts = []
        for anchor, step, limit, reason in self.plan:
            image = self.session.slice_image(SliceRef(self.axis, anchor))
            fronts.append(_Front(anchor, step, limit, reason, self.anchors[anchor], self.anchor_logits.get(anchor),
                                 anchor_intensity_range(image, self.anchors[anchor], self.policy)))
        return fronts

    def _seed(self, index: int) -> PropagatedSlice:
        """Decode the box drawn on slice ``index`` (widened as ``predict`` widens a user's box, kept
        inside the 3D box) into an anchor of the run; the slice is written."""
        ref = SliceRef(self.axis, index)
        drawn = self._clip_to_bounds(self.boxes[index], widen=False)
        box = self._clip_to_bounds(self.session.user_box(ref, drawn), widen=True)
        pred = self._clip_prediction(self.session.decode(ref, Prompts(box=box), priority=PRIORITY_PROPAGATION))
        # the 3D box's own cross-section (not a box the user drew inside it): decoded again from the mask's box
        whole = self.bounds is not None and bool(np.all(np.abs(drawn - self.bounds.plane_box(self.axis)) <= 1.0))
        for _ in range(self.policy.seed_refits if whole else 0):
            if not pred.area:
                break
            refit = self._clip_to_bounds(self.session.user_box(ref, mask_bbox(pred.mask).astype(np.float64)), widen=True)
            again = self._clip_prediction(self.session.decode(ref, Prompts(box=refit), priority=PRIORITY_PROPAGATION))
            if again.area and again.score >= pred.score - self.policy.seed_refit_score_drop \
                    and again.area >= self.policy.seed_refit_min_area * pred.area:
                pred = again
        if not pred.area:
            raise PromptError(f"The box on slice {index} gives an empty mask", "draw the box around the structure")
        self.anchors[index] = self.decided[index] = pred.mask
        self.anchor_logits.setdefault(index, pred.low_res_logits)
        outcome = SliceOutcome(index, index, 0, pred.score, pred.area, 1.0, SEED_CANDIDATE)
        self.result.masks[index] = pred.mask
        self.result.outcomes[index] = outcome
        return PropagatedSlice(index, pred.mask, outcome)

    def _limit(self, anchor: int, step: int, natural: int) -> tuple[int, StopReason]:
        """The last index a front may write, and why it stops there."""
        n = self.session.shape[self.axis]
        lo, hi = 0, n - 1
        if self.index_range is not None:
            lo, hi = max(lo, self.index_range[0]), min(hi, self.index_range[1])
        bound, reason = natural, StopReason.VOLUME_EDGE
        ranged = hi if step > 0 else lo
        if (step > 0 and ranged < bound) or (step < 0 and ranged > bound):
            bound, reason = ranged, StopReason.RANGE_LIMIT
            if self.bounds is not None and ranged == self.bounds.slice_range(self.axis)[0 if step < 0 else 1]:
                reason = StopReason.BOX_END
        if self.rules.max_slices is not None:
            capped = anchor + step * self.rules.max_slices
            if (step > 0 and capped < bound) or (step < 0 and capped > bound):
                bound, reason = capped, StopReason.RANGE_LIMIT
        return bound, reason

    def run(self, cancel: CancelToken | None) -> Generator[PropagatedSlice, None, PropagationResult]:
        """The fronts take turns, one decision each, until all have stopped (see ``propagate_iter``)."""
        finished = False
        try:
            for index in sorted(self.boxes):
                if cancel is not None and cancel.cancelled:
                    self._cancel()
                    return self.result
                yield self._seed(index)
            self.fronts = self._fronts()
            while any(f.stopped is None for f in self.fronts):
                for front in self.fronts:
                    if front.stopped is not None:
                        continue
                    if cancel is not None and cancel.cancelled:
                        self._cancel()
                        yield from self._hand_out()
                        return self.result
                    try:
                        self._step(front)
                    except (WorkerClosedError, concurrent.futures.CancelledError):
                        # the session was closed under the run (from another thread): what was decided stands
                        log.info("propagation stopped: the session was closed")
                        self._cancel()
                        yield from self._hand_out()
                        return self.result
                    yield from self._hand_out()
            finished = True
            return self.result
        except GeneratorExit:  # the consumer stopped iterating: slices not handed out are not part of the result
            self._cancel(hand_out=False)
            raise
        finally:
            # Stopped early (closed, cancelled, an error): wait for the encode running, so that no work
            # of the run goes on. Finished: its last look-ahead may finish into the cache on its own
            # (as a front's does when it stops), without delaying the result by an encode.
            self.encodes.close(wait_running=not finished)

    def _hand_out(self) -> Generator[PropagatedSlice, None, None]:
        """Yield the slices settled since the last call, in the order they were settled."""
        ready, self._ready = self._ready, []
        yield from ready

    def _step(self, front: _Front) -> None:
        """Decide ``front``'s next slice, or stop the front; the slice it held back is settled (``_ready``)."""
        nxt = front.index + front.step
        if front.beyond_limit(nxt):
            return self._stop(front, front.limit_reason)
        if nxt in self.claimed:
            return self._stop(front, StopReason.ANCHOR if nxt in self.anchors else StopReason.MET)
        ref = SliceRef(self.axis, nxt)
        if self.session.is_constant(ref):
            return self._stop(front, StopReason.CONSTANT_SLICE, nxt)
        if not front.calibrated:
            self._calibrate(front, nxt)
        self.encodes.wait_for(nxt, front.ahead(nxt, self.lookahead, self.claimed))

        guide = self._guide(nxt)

        def decode(prompts: Prompts, mask_input: Any = None) -> Prediction:
            if prompts.box is not None:
                box = prompts.box
                if guide is not None:  # the box interpolated between the drawn boxes around this slice
                    w = self.policy.guide_weight
                    box = w * guide + (1.0 - w) * box
                prompts = Prompts(prompts.points, prompts.labels, self._clip_to_bounds(box, widen=True))
            pred = self.session.decode(ref, prompts, mask_input=mask_input, priority=PRIORITY_PROPAGATION)
            return self._clip_prediction(pred)

        to_box_end = None
        if self.bounds is not None and front.limit_reason == StopReason.BOX_END:
            to_box_end = (front.limit - nxt) * front.step
        tip = None  # the slice decoded from the previous mask's own box, once decoded
        if to_box_end == 0 and self.policy.box_end_tip:  # the structure ends here: its tip
            tip = self._decode_around(nxt, front.mask, self.policy.tip_padding)
            name, pred = tip[0] + " (the 3D box's end)", tip[1]
        else:
            name, pred = front.predict(decode, self.policy)
        if self.policy.rescue_below > 0 and (to_box_end is None or to_box_end >= self.policy.box_end_no_rescue):
            rescued = self._rescue(front, pred, decode, lambda: self.session.slice_image(ref))
            if rescued is not None:
                pred, name = rescued, name + " (cut short: rescued with a looser box)"
        overlap = iou(front.mask, pred.mask)
        reason = front.stop_reason(pred, overlap, self.rules, lambda: self.session.slice_image(ref))
        if reason is None and self.policy.trim_below > 0:
            trimmed = _trim(self.session.slice_image(ref), pred.mask, front.intensity_range, front.mask, self.policy)
            if trimmed is not None:
                if front.ending(int(trimmed.sum()), self.policy):
                    reason = StopReason.INTENSITY
                else:
                    pred, name = dataclasses.replace(pred, mask=trimmed), name + " (trimmed to the anchor's intensities)"
                    overlap = iou(front.mask, pred.mask)
        if reason is not None:
            short = self._tip_short_of_box_end(front, nxt, tip)
            if short is None:
                return self._stop(front, reason, nxt)
            name, pred = short
            overlap = iou(front.mask, pred.mask)
        outcome = SliceOutcome(nxt, front.index, front.step, pred.score, pred.area, overlap, name)
        self.claimed.add(nxt)
        self.decided[nxt] = pred.mask
        front.advance(nxt, pred)
        held, front.pending = front.pending, PropagatedSlice(nxt, pred.mask, outcome)
        if held is not None:
            self._settle(held, look=True)

    def _settle(self, decided: PropagatedSlice, look: bool) -> None:
        """Write ``decided`` into the result (after its second look, with ``look``) and queue it to hand
        out; when the second look fails (the session closing under the run), the slice as decided is."""
        try:
            if look and self.policy.neighbour_check:
                decided = self._second_look(decided)
            if look and self.policy.edge_paddings:
                decided = self._edge_look(decided)
        finally:
            self.result.masks[decided.index] = decided.mask
            self.result.outcomes[decided.index] = decided.outcome
            self._ready.append(decided)

    def _second_look(self, decided: PropagatedSlice) -> PropagatedSlice:
        """``decided``, or its slice decoded again from the box of what both its neighbours' masks share
        when that mask is smaller and agrees better with both (see ``PromptPolicy.neighbour_check``)."""
        index, own = decided.index, decided.mask
        below, above = self.decided.get(index - 1), self.decided.get(index + 1)
        if below is None or above is None:
            return decided
        shared = below & above
        if not shared.any():
            return decided
        _, pred = self._decode_around(index, shared, self.policy.neighbour_padding)
        if not 0 < pred.area < np.count_nonzero(own):
            return decided
        if dice(pred.mask, below) + dice(pred.mask, above) <= dice(own, below) + dice(own, above):
            return decided
        return self._looked_again(decided, pred, "second look: from what both neighbours share")

    def _looked_again(self, decided: PropagatedSlice, pred: Prediction, how: str) -> PropagatedSlice:
        """``decided``'s slice with the mask ``pred`` of a second decode: its outcome measured again against
        the slice it was decided from, and ``how`` it was decoded added to its candidate's name."""
        outcome = dataclasses.replace(decided.outcome, score=pred.score, area=pred.area,
                                      iou_previous=iou(self.decided[decided.outcome.from_index], pred.mask),
                                      candidate=f"{decided.outcome.candidate} ({how})")
        return PropagatedSlice(decided.index, pred.mask, outcome)

    def _edge_look(self, decided: PropagatedSlice) -> PropagatedSlice:
        """``decided``, or, on the volume's first or last slice where its mask is larger than its one
        neighbour's, that slice decoded again from tighter boxes around the neighbour's mask when that
        mask is smaller and agrees better with the neighbour (see ``PromptPolicy.edge_paddings``)."""
        index, own = decided.index, decided.mask
        last = self.session.shape[self.axis] - 1
        neighbour = self.decided.get(1 if index == 0 else last - 1) if index in (0, last) and last > 0 else None
        own_area = np.count_nonzero(own)
        if neighbour is None or own_area <= np.count_nonzero(neighbour):
            return decided
        best, best_agreement = None, dice(own, neighbour)
        for padding in self.policy.edge_paddings:
            name, pred = self._decode_around(index, neighbour, padding)
            agreement = dice(pred.mask, neighbour)
            if 0 < pred.area < own_area and agreement > best_agreement:
                best, best_agreement = (name, pred), agreement
        if best is None:
            return decided
        name, pred = best  # the neighbour is the slice it was decided from: the front ends here
        return self._looked_again(decided, pred, f"the volume's edge: {name} around its neighbour")

    def _rescue(self, front: _Front, pred: Prediction, decode: Decode,
                image: Callable[[], np.ndarray]) -> Prediction | None:
        """The mask of a looser box when ``pred`` shrank below ``policy.rescue_below`` of the previous
        area and the looser one continues the previous mask better (see ``PromptPolicy.rescue_below``),
        else None."""
        policy = self.policy
        previous = int(np.count_nonzero(front.mask))
        if pred.area == 0 or pred.area >= policy.rescue_below * previous:
            return None
        best, best_dice = None, dice(front.mask, pred.mask)
        for _, prompts, _ in dataclasses.replace(policy, paddings=policy.rescue_paddings).candidates(front.mask, None):
            candidate = policy.threshold(decode(prompts))
            if not candidate.area or candidate.area > policy.rescue_max_growth * previous:
                continue
            d = dice(front.mask, candidate.mask)
            if d > best_dice:
                best, best_dice = candidate, d
        if best is None:
            return None
        slice_image = image()
        if intensity_agreement(slice_image, best.mask, front.intensity_range) < \
                intensity_agreement(slice_image, pred.mask, front.intensity_range) - policy.rescue_agreement_slack:
            return None
        added = best.mask & ~pred.mask
        if intensity_agreement(slice_image, added, front.intensity_range) < policy.rescue_added_agreement:
            return None
        return best

    def _decode_around(self, index: int, mask: np.ndarray, padding: float) -> tuple[str, Prediction]:
        """(candidate name, prediction) of slice ``index`` decoded from the box of ``mask`` (a neighbour's
        mask, or what two neighbours share) + ``padding`` px, kept inside the 3D box, thresholded as the
        policy thresholds every candidate."""
        name, prompts, _ = self.policy.fixed(padding).candidates(mask, None)[0]
        pred = self.session.decode(SliceRef(self.axis, index), Prompts(box=self._clip_to_bounds(prompts.box, widen=True)),
                                   priority=PRIORITY_PROPAGATION)
        return name, self.policy.threshold(self._clip_prediction(pred))

    def _tip_short_of_box_end(self, front: _Front, index: int,
                              decoded: tuple[str, Prediction] | None = None) -> tuple[str, Prediction] | None:
        """(name, prediction) of the structure's tip on the 3D box's last slice ``index``, where the stop
        rules would end ``front`` one slice short of it, or None when ``index`` is not the box's last
        slice or the mask there does not taper (see ``PromptPolicy.box_end_tip_below``). ``decoded``:
        ``_decode_around``'s result for that slice when the caller has it already (not decoded again)."""
        if self.bounds is None or self.policy.box_end_tip_below <= 0:
            return None
        first, last = self.bounds.slice_range(self.axis)
        if index != (last if front.step > 0 else first):
            return None
        name, pred = decoded if decoded is not None else self._decode_around(index, front.mask, self.policy.tip_padding)
        if not 0 < pred.area < self.policy.box_end_tip_below * np.count_nonzero(front.mask):
            return None
        return name + " (the 3D box's end: the structure's tip)", pred

    def _guide(self, index: int) -> np.ndarray | None:
        """The box for slice ``index`` interpolated between the nearest drawn boxes below and above
        it (widened as the session widens a user's box), or None outside two drawn boxes."""
        ends = self._box_ends
        below = [i for i in ends if i < index]
        above = [i for i in ends if i > index]
        if not below or not above:
            return None
        a, b = below[-1], above[0]
        t = (index - a) / (b - a)
        box = (1.0 - t) * self._clip_to_bounds(self.boxes[a], widen=False) + t * self._clip_to_bounds(self.boxes[b],
                                                                                                      widen=False)
        return self.session.user_box(SliceRef(self.axis, index), box)

    def _clip_to_bounds(self, box: np.ndarray, widen: bool) -> np.ndarray:
        """``box`` inside the 3D box's in-plane box (``widen``: that box widened by the session's box
        margin, as the model sees a user's box), unchanged without a 3D box."""
        box = np.asarray(box, dtype=np.float64).reshape(4)
        if self.bounds is None:
            return box
        plane = self.bounds.plane_box(self.axis)
        if widen:
            plane = self.session.user_box(SliceRef(self.axis, self.bounds.middle(self.axis)), plane)
        lo = np.minimum(np.maximum(box[:2], plane[:2]), plane[2:])
        hi = np.maximum(np.minimum(box[2:], plane[2:]), lo)
        return np.concatenate([lo, hi])

    def _clip_prediction(self, pred: Prediction) -> Prediction:
        """``pred`` with nothing outside the 3D box (its mask, and its logits, which the policy re-thresholds)."""
        if self.bounds is None:
            return pred
        inside = self.bounds.plane_mask(self.session.shape, self.axis)
        logits = None if pred.logits is None else np.where(inside, pred.logits, np.float32(-20.0))
        return dataclasses.replace(pred, mask=pred.mask & inside, logits=logits)

    def _calibrate(self, front: _Front, nxt: int) -> None:
        """Decide on the front's first step whether its tight box may lead (fronts leaving one anchor share)."""
        if not self.policy.two_tracks:
            front.calibrated = True
            return
        anchor = front.anchor
        if anchor not in self.result.anchor_stability:
            if self.lookahead > 0:
                self.encodes.start(nxt)  # overlaps the calibration
            anchor_ref = SliceRef(self.axis, anchor)
            try:
                self.result.anchor_stability[anchor] = self.policy.calibrate(
                    lambda prompts: self.session.decode(anchor_ref, prompts, priority=PRIORITY_PROPAGATION),
                    self.anchors[anchor])
            except VolumeError:  # e.g. an anchor painted on a slice with no contrast: nothing to test on
                self.result.anchor_stability[anchor] = 0.0
        front.set_tight_leads(self.result.anchor_stability[anchor] >= self.policy.min_stable_area_ratio)

    def _stop(self, front: _Front, reason: StopReason, at: int | None = None, look: bool = True) -> None:
        """End ``front``: its held-back slice is settled (its second look only with ``look``)."""
        front.stopped = RunStop(front.anchor, front.step, front.index, reason, at)
        self.result.stops.append(front.stopped)
        held, front.pending = front.pending, None
        if held is not None:
            self._settle(held, look)
        # its queued look-ahead: nobody will need it
        self.encodes.drop(front.ahead(front.index, max(self.lookahead, 1) + 1, self.claimed))

    def _cancel(self, hand_out: bool = True) -> None:
        """Stop every front; their held-back slices are settled as decided (no second look: the session
        may be closing), or dropped without ``hand_out`` (nobody will take them)."""
        for front in self.fronts:
            if front.stopped is None:
                if not hand_out:
                    front.pending = None
                self._stop(front, StopReason.CANCELLED, look=False)
        self.result.cancelled = True


def _trim(image: np.ndarray, mask: np.ndarray, value_range: tuple[float, float], previous: np.ndarray,
          policy: PromptPolicy) -> np.ndarray | None:
    """``mask`` reduced to its pixels in ``value_range`` when fewer than ``policy.trim_below`` of them
    are (see ``PromptPolicy.trim_below``), or None to keep it as it is."""
    from scipy import ndimage

    agreement = intensity_agreement(image, mask, value_range)
    if agreement >= policy.trim_below:
        return None
    lo, hi = value_range
    inside = mask & (image >= lo - 1.0) & (image <= hi + 1.0)
    if policy.trim_opening:
        inside = ndimage.binary_opening(inside)
    if agreement >= policy.trim_keep_previous:
        inside |= mask & previous
    inside = ndimage.binary_fill_holes(inside)
    labels, count = ndimage.label(inside)
    if count > 1:  # the parts that continue the previous slice's mask
        keep = np.unique(labels[previous & inside])
        inside = np.isin(labels, keep[keep > 0]) if (keep > 0).any() else inside
    return inside if inside.any() else None


def check_anchors_in_range(anchors: Mapping[int, Any], index_range: tuple[int, int] | None) -> None:
    """Refuse anchors outside ``index_range``: only slices in the range may be written, and an
    accepted slice is always part of the result.

    Args:
        anchors: slice index -> accepted mask (only the indices are read).
        index_range: (first, last) inclusive, or None (no range: nothing to check).

    Raises:
        PromptError: an anchor lies outside the range.
    """
    if index_range is None:
        return
    first, last = index_range
    outside = sorted(i for i in anchors if not first <= i <= last)
    if outside:
        shown = ", ".join(map(str, outside[:8])) + (", ..." if len(outside) > 8 else "")
        lo, hi = min(first, *outside), max(last, *outside)
        raise PromptError(f"Accepted slice(s) {shown} lie outside the range {first}..{last}; only slices in the "
                          "range may be written", f"widen the range to include them (e.g. {lo} {hi}), or prompt a "
                          "slice inside the range")


def _checked_anchors(shape: tuple[int, int, int], axis: int, anchors: Mapping[int, np.ndarray],
                     allow_empty: bool = False) -> dict[int, np.ndarray]:
    """``anchors`` as bool masks, refused with the reason when one cannot be propagated from
    (none at all only without ``allow_empty``: boxes seed the run instead)."""
    n = shape[axis]
    plane = slice_shape(shape, axis)
    if not anchors and not allow_empty:
        raise PromptError("Propagation needs at least one accepted slice, a box or a 3D box",
                          "segment a slice and accept it first, or give a box to start from")
    clean: dict[int, np.ndarray] = {}
    for index, mask in anchors.items():
        mask = np.asarray(mask, dtype=bool)
        if not 0 <= index < n:
            raise VolumeError(f"Anchor slice {index} is outside the volume (0..{n - 1})", "accept a slice inside the volume")
        if mask.shape != plane:
            raise PromptError(f"Anchor mask on slice {index} has shape {mask.shape}, expected {plane}",
                              "give the mask of that slice")
        if not mask.any():
            raise PromptError(f"Anchor mask on slice {index} is empty", "segment the structure on that slice first")
        clean[int(index)] = mask
    return clean


def _checked_bounds(shape: tuple[int, int, int], axis: int, bounds: Box3D | Mapping | None) -> Box3D | None:
    """``bounds`` as a ``Box3D`` inside the volume (a dict as ``Box3D.to_json`` writes it is read)."""
    if bounds is None:
        return None
    if not isinstance(bounds, Box3D):
        if not isinstance(bounds, Mapping):
            raise PromptError(f"bounds must be a Box3D, got {type(bounds).__name__}",
                              'give Box3D(lo=(k0, j0, i0), hi=(k1, j1, i1)) or {"lo": [...], "hi": [...]}')
        bounds = Box3D.from_json(bounds)
    if axis not in (0, 1, 2):
        raise VolumeError(f"Axis {axis!r} is not 0, 1 or 2", "give the propagation axis")
    bounds.check(shape)
    return bounds


def _checked_boxes(shape: tuple[int, int, int], axis: int, boxes: Mapping[int, Any],
                   anchors: Mapping[int, Any]) -> dict[int, np.ndarray]:
    """``boxes`` (slice index -> (x0, y0, x1, y1) in slice pixels, as drawn) as float64 arrays,
    refused when one cannot be decoded or lies on an accepted slice."""
    n = shape[axis]
    height, width = slice_shape(shape, axis)
    clean: dict[int, np.ndarray] = {}
    for index, box in boxes.items():
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
            raise VolumeError(f"Box slice {index!r} is outside the volume (0..{n - 1})",
                              "draw the box on a slice inside the volume")
        if index in anchors:
            raise PromptError(f"Slice {index} has both an accepted mask and a box",
                              "give either the accepted mask or the box for that slice")
        arr = np.asarray(box, dtype=np.float64).reshape(-1)
        if arr.shape != (4,) or not np.isfinite(arr).all():
            raise PromptError(f"The box on slice {index} is not four finite numbers (x0, y0, x1, y1): {box!r}",
                              "give the box as x0 y0 x1 y1 in the slice's pixels")
        arr = np.array([min(arr[0], arr[2]), min(arr[1], arr[3]), max(arr[0], arr[2]), max(arr[1], arr[3])])
        clean[int(index)] = check_prompts(Prompts(box=arr), height, width).box
    return clean
