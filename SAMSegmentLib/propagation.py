"""Propagate a mask from accepted (anchor) slices to their neighbours, slice by slice.

Each next slice is prompted only from the previous slice's result. LiteMedSAM is very
sensitive to how loose the box is, and no fixed padding is best for every organ, so the default
policy (``PromptPolicy``) tests on the anchor whether a tight box is stable and, while one leads,
decodes a looser one beside it to catch a shrinking spiral (decoder calls are ~40 ms against ~1 s
for the encoder).

Slices the user accepted are anchors: never predicted, never overwritten. Between two anchors
the gap is filled from both ends at once, so each slice is predicted from its nearer anchor.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping

import numpy as np

from .errors import PromptError, SAMSegmentError, VolumeError
from .prompts import Prompts
from .volume import SliceRef, slice_shape
from .worker import PRIORITY_PROPAGATION, CancelToken, ProgressCallback

log = logging.getLogger(__name__)


class StopReason(str, Enum):
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
    CANCELLED = "cancelled"


DIRECTIONS = {"both": (1, -1), "up": (1,), "down": (-1,), "+": (1,), "-": (-1,)}


@dataclass
class PromptPolicy:
    """How the next slice is prompted from the previous mask, and how a candidate is chosen.

    Default (``paddings`` None): a tight box (the previous mask's box + ``tight_padding`` px)
    where it is safe, else a looser one (+ ``safe_padding`` px). The tight box keeps neighbours
    such as the renal hilum vessels or the liver's caudal neighbours out of the mask, but on some
    structures it sets off a spiral (tight box -> smaller mask -> tighter box). Two guards:

    1. ``calibrate``, on the anchor: the loop mask -> box + tight pad -> mask, run
       ``calibration_rounds`` times on the anchor slice (it settles within ~3), must keep
       ``>= min_stable_area_ratio`` of the anchor's area, else the front uses the loose box only.
    2. While the tight box leads, the loose box is decoded too, from its own previous mask
       (decoder calls are ~40 ms against ~1 s for the encoder); when the tight mask's area falls
       below ``switch_area_ratio`` of the loose one's, the front goes on with the loose track.

    Measured on the sample CT/MR (bench/accuracy.py, README "Measured figures"): the anchor test
    alone rejects the tight box on the CT spleen, right kidney and stomach from the default
    (widened-box) anchor, but not from an anchor decoded from a box drawn tight, where the spiral
    starts slices later; the running comparison alone catches those spirals (the tight area falls
    below 0.7 of the loose one's within 1-4 slices; it stays >= 0.7 on every front where the
    tight box does better) but lets the tight box cost the CT spleen 0.009. Together: CT spleen /
    liver / left kidney 0.9615 / 0.9432 / 0.9416 against 0.9615 / 0.9374 / 0.9383 with the loose
    box alone. The thresholds were chosen on those structures; on 21 other labelled structures of
    the two samples (``bench/accuracy.py --held-out``) the policy is neutral against the loose box
    alone (mean Dice 0.431 vs 0.434 and 0.408 vs 0.408 from the widened / as-drawn anchor).

    ``paddings`` given: candidates are the previous mask's box enlarged by each of them (a padding
    is ``max(pad_px, pad_fraction * box side)``), optionally with the previous low-res logits as
    mask input; the kept candidate maximises Dice with the previous mask.

    ``mask_threshold``: propagated masks are ``logits > mask_threshold`` instead of ``> 0``.
    A box prompt that is looser than the structure makes LiteMedSAM over-segment by a rim of
    ~1 px, and since the next box is taken from that mask the error feeds forward (liver +100 %
    area at its caudal end). 0.5 removes the rim without starting the shrinking spiral that
    thresholds >= 0.75 set off.
    """

    paddings: tuple[tuple[float, float], ...] | None = None  # None: tight where safe, else loose
    use_mask_input: bool = False
    mask_threshold: float = 0.5
    tight_padding: float = 2.0
    safe_padding: float = 3.0
    calibration_rounds: int = 3
    min_stable_area_ratio: float = 0.95
    switch_area_ratio: float = 0.7

    def calibrate(self, decode: Callable[[Prompts], Any], anchor_mask: np.ndarray) -> float:
        """Area of the anchor's mask after ``calibration_rounds`` of mask -> box + tight pad ->
        mask on the anchor's slice (``decode`` prompts it), as a fraction of the anchor's area."""
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
        return self.paddings is None

    def fixed(self, pad_px: float) -> "PromptPolicy":
        """This policy with one fixed padding of ``pad_px``."""
        return dataclasses.replace(self, paddings=((float(pad_px), 0.0),))

    def candidates(self, prev_mask: np.ndarray, prev_low_res: Any) -> list[tuple[str, Prompts, Any]]:
        ys, xs = np.nonzero(prev_mask)
        h, w = prev_mask.shape
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        out = []
        for pad_px, pad_frac in self.paddings if self.paddings is not None else ((self.safe_padding, 0.0),):
            px = max(pad_px, pad_frac * (x1 - x0 + 1))
            py = max(pad_px, pad_frac * (y1 - y0 + 1))
            box = np.array([max(x0 - px, 0.0), max(y0 - py, 0.0), min(x1 + px, w - 1.0), min(y1 + py, h - 1.0)])
            name = f"box+{pad_px:g}px/{pad_frac:.0%}"
            out.append((name, Prompts(box=box), None))
            if self.use_mask_input and prev_low_res is not None:
                out.append((name + "+mask", Prompts(box=box), prev_low_res))
        return out

    def choose(self, prev_mask: np.ndarray, predictions: list[tuple[str, Any]]) -> tuple[str, Any]:
        predictions = [(name, self.threshold(pred)) for name, pred in predictions]
        best, best_score = predictions[0], -1.0
        for name, pred in predictions:
            d = dice(prev_mask, pred.mask)
            if d > best_score:
                best, best_score = (name, pred), d
        return best

    def threshold(self, pred: Any) -> Any:
        """``pred`` with its mask re-thresholded at ``mask_threshold`` (needs full-res ``logits``)."""
        logits = getattr(pred, "logits", None)
        if self.mask_threshold == 0.0 or logits is None or not dataclasses.is_dataclass(pred):
            return pred
        return dataclasses.replace(pred, mask=np.asarray(logits) > self.mask_threshold)


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
    index_range: tuple[int, int] | None = None  # inclusive bounds along the axis


@dataclass
class SliceOutcome:
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
    axis: int
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # new slices only (anchors excluded)
    outcomes: dict[int, SliceOutcome] = field(default_factory=dict)
    stops: list[RunStop] = field(default_factory=list)
    cancelled: bool = False
    # anchor -> area kept by the tight-box loop on it (PromptPolicy.calibrate), default policy only
    anchor_stability: dict[int, float] = field(default_factory=dict)

    def to_volume(self, shape: tuple[int, int, int], anchors: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
        vol = np.zeros(shape, dtype=bool)
        for source in (anchors or {}, self.masks):
            for index, mask in source.items():
                idx: list[Any] = [slice(None)] * 3
                idx[self.axis] = index
                vol[tuple(idx)] = mask
        return vol


def dice(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    if sa + sb == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / (sa + sb)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


def intensity_agreement(image: np.ndarray, mask: np.ndarray, value_range: tuple[float, float]) -> float:
    """Fraction of ``mask`` pixels of ``image`` within ``value_range`` (inclusive, +-1 grey level)."""
    values = image[mask]
    if values.size == 0:
        return 0.0
    lo, hi = value_range
    inside = (values >= lo - 1.0) & (values <= hi + 1.0)
    return float(np.count_nonzero(inside)) / values.size


@dataclass
class _Front:
    anchor: int
    step: int
    limit: int  # last index this front may write (inclusive)
    limit_reason: StopReason
    index: int
    mask: np.ndarray
    low_res: Any
    intensity_range: tuple[float, float]
    calibrated: bool = False
    tight_leads: bool = False  # default policy: the tight track is the one written
    safe_mask: np.ndarray | None = None  # the loose track's previous mask while the tight one leads
    stopped: RunStop | None = None


def propagate(session: Any, axis: int, anchors: Mapping[int, np.ndarray], direction: str = "both",
              rules: StopRules | None = None, policy: PromptPolicy | None = None,
              on_slice: Callable[[SliceRef, np.ndarray, SliceOutcome], None] | None = None,
              progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
              anchor_logits: Mapping[int, Any] | None = None, lookahead: int = 1) -> PropagationResult:
    """Propagate from ``anchors`` (slice index -> accepted 2D mask) along ``axis``.

    ``direction`` is "both", "up" (increasing index) or "down" (decreasing index) for the
    outer ends; gaps between anchors are always filled from both ends. ``on_slice`` is called
    with each accepted slice as soon as it is decided (on the calling thread), so a GUI can
    show progress; a cancelled run returns what was decided so far, all of it consistent.

    ``lookahead``: how many slices beyond the current one each front keeps queued for encoding
    on the session's worker, so the encoder works on slice n+1 while slice n is decoded and
    checked (and written by ``on_slice``). 0 encodes, then decodes, one slice at a time. The
    masks are identical either way: every slice is encoded before it is decoded and decoded from
    the cached embedding; pipelining only changes when the encodes run. A front that stops
    leaves at most ``lookahead`` encodes behind (queued ones are cancelled, a running one finishes
    into the cache).
    """
    rules = rules or StopRules()
    policy = policy or PromptPolicy()
    if direction not in DIRECTIONS:
        raise SAMSegmentError(f"Unknown propagation direction {direction!r}", "use both, up or down")
    shape = session.shape
    n = shape[axis]
    plane = slice_shape(shape, axis)
    if not anchors:
        raise PromptError("Propagation needs at least one accepted slice", "segment a slice and accept it first")
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
    order = sorted(clean)
    lo, hi = 0, n - 1
    if rules.index_range is not None:
        lo, hi = max(lo, rules.index_range[0]), min(hi, rules.index_range[1])

    def limit_for(anchor: int, step: int, natural: int) -> tuple[int, StopReason]:
        bound, reason = natural, StopReason.VOLUME_EDGE
        ranged = hi if step > 0 else lo
        if (step > 0 and ranged < bound) or (step < 0 and ranged > bound):
            bound, reason = ranged, StopReason.RANGE_LIMIT
        if rules.max_slices is not None:
            capped = anchor + step * rules.max_slices
            if (step > 0 and capped < bound) or (step < 0 and capped > bound):
                bound, reason = capped, StopReason.RANGE_LIMIT
        return bound, reason

    logits = anchor_logits or {}
    fronts: list[_Front] = []

    def add_front(anchor: int, step: int, natural: int) -> None:
        limit, reason = limit_for(anchor, step, natural)
        image = session.slice_image(SliceRef(axis, anchor))
        lo_i, hi_i = np.percentile(image[clean[anchor]], (5, 95))
        fronts.append(_Front(anchor, step, limit, reason, anchor, clean[anchor], logits.get(anchor),
                             (float(lo_i), float(hi_i))))

    steps = DIRECTIONS[direction]
    if 1 in steps:
        add_front(order[-1], 1, n - 1)
    if -1 in steps:
        add_front(order[0], -1, 0)
    for a, b in zip(order, order[1:]):
        if b - a > 1:
            add_front(a, 1, b - 1)
            add_front(b, -1, a + 1)

    result = PropagationResult(axis=axis)
    claimed = set(order)
    total = sum(max(0, (f.limit - f.anchor) * f.step) for f in fronts)
    done = 0

    encodes: dict[int, Future] = {}  # slice index -> queued/running encode (pipelining)

    def calibrate(front: _Front, nxt: int) -> None:
        """Decide on the front's first step whether its tight box may lead (fronts leaving one anchor share)."""
        front.calibrated = True
        if not policy.two_tracks:
            return
        anchor = front.anchor
        if anchor not in result.anchor_stability:
            encode_async = getattr(session, "encode_async", None)
            if encode_async is not None and lookahead > 0 and nxt not in encodes:
                encodes[nxt] = encode_async(SliceRef(axis, nxt), PRIORITY_PROPAGATION)  # overlaps the calibration
            anchor_ref = SliceRef(axis, anchor)
            try:
                result.anchor_stability[anchor] = policy.calibrate(
                    lambda prompts: session.decode(anchor_ref, prompts, priority=PRIORITY_PROPAGATION), clean[anchor])
            except VolumeError:  # e.g. an anchor painted on a slice with no contrast: nothing to test on
                result.anchor_stability[anchor] = 0.0
        front.tight_leads = result.anchor_stability[anchor] >= policy.min_stable_area_ratio
        front.safe_mask = front.mask if front.tight_leads else None

    def stop(front: _Front, reason: StopReason, at: int | None = None) -> None:
        front.stopped = RunStop(front.anchor, front.step, front.index, reason, at)
        result.stops.append(front.stopped)
        for i in _ahead(front, front.index, max(lookahead, 1) + 1, claimed):
            future = encodes.pop(i, None)
            if future is not None:
                future.cancel()  # not started yet: nobody will need it

    while any(f.stopped is None for f in fronts):
        for front in fronts:
            if front.stopped is not None:
                continue
            if cancel is not None and cancel.cancelled:
                for f in fronts:
                    if f.stopped is None:
                        stop(f, StopReason.CANCELLED)
                result.cancelled = True
                for future in encodes.values():
                    future.cancel()
                return result
            nxt = front.index + front.step
            if (nxt - front.limit) * front.step > 0:
                stop(front, front.limit_reason)
                continue
            if nxt in claimed:
                stop(front, StopReason.ANCHOR if nxt in clean else StopReason.MET)
                continue
            ref = SliceRef(axis, nxt)
            if session.is_constant(ref):
                stop(front, StopReason.CONSTANT_SLICE, nxt)
                continue
            if not front.calibrated:
                calibrate(front, nxt)
            _encode_with_lookahead(session, axis, front, nxt, lookahead, claimed, encodes)
            name, pred = _predict_next(session, ref, front, policy)
            area = pred.area
            overlap = iou(front.mask, pred.mask)
            reason = None
            if area == 0:
                reason = StopReason.EMPTY
            elif area < rules.min_area_px or area < rules.min_area_fraction * np.count_nonzero(front.mask):
                reason = StopReason.TOO_SMALL
            elif overlap < rules.min_iou:
                reason = StopReason.LOW_IOU
            elif pred.score < rules.min_score:
                reason = StopReason.LOW_SCORE
            elif rules.min_intensity_agreement > 0 and intensity_agreement(
                    session.slice_image(ref), pred.mask, front.intensity_range) < rules.min_intensity_agreement:
                reason = StopReason.INTENSITY
            if reason is not None:
                stop(front, reason, nxt)
                continue
            outcome = SliceOutcome(nxt, front.index, front.step, pred.score, area, overlap, name)
            claimed.add(nxt)
            result.masks[nxt] = pred.mask
            result.outcomes[nxt] = outcome
            front.index, front.mask, front.low_res = nxt, pred.mask, pred.low_res_logits
            if on_slice is not None:
                on_slice(ref, pred.mask, outcome)
            done += 1
            if progress is not None:
                progress(done, total, f"slice {nxt}")
    for future in encodes.values():  # look-ahead of slices another front claimed meanwhile
        future.cancel()
    return result


def _ahead(front: _Front, index: int, count: int, claimed: set[int]) -> list[int]:
    """Up to ``count`` slices after ``index`` in ``front``'s direction that it may still write."""
    out = []
    for j in range(1, count + 1):
        i = index + j * front.step
        if (i - front.limit) * front.step > 0 or i in claimed:
            break
        out.append(i)
    return out


def _encode_with_lookahead(session: Any, axis: int, front: _Front, index: int, lookahead: int,
                           claimed: set[int], encodes: dict[int, Future]) -> None:
    """Return once slice ``index`` is encoded, leaving the next ``lookahead`` slices of ``front``
    queued on the worker, so they encode while this one is decoded.

    The slice's own encode is queued before the look-ahead ones, and waited for through its own
    future (not a new worker call, which would queue behind every look-ahead already submitted).
    Sessions without ``encode_async`` (duck-typed stand-ins) simply decode, which encodes on demand.
    """
    encode_async = getattr(session, "encode_async", None)
    if encode_async is None:
        return
    wanted = [index] + _ahead(front, index, lookahead, claimed)
    for i in wanted:
        if i not in encodes:
            encodes[i] = encode_async(SliceRef(axis, i), PRIORITY_PROPAGATION)
    encodes.pop(index).result()


def _predict_next(session: Any, ref: SliceRef, front: _Front, policy: PromptPolicy) -> tuple[str, Any]:
    def decode(prompts: Prompts, mask_input: Any = None) -> Any:
        return session.decode(ref, prompts, mask_input=mask_input, priority=PRIORITY_PROPAGATION)

    if not policy.two_tracks or not front.tight_leads or front.safe_mask is None:
        single = policy  # fixed paddings
        if policy.two_tracks:  # one track left: the loose one after a switch, else the tight one
            single = policy.fixed(policy.tight_padding if front.tight_leads else policy.safe_padding)
        return single.choose(front.mask, [(name, decode(prompts, mask_input))
                                          for name, prompts, mask_input in single.candidates(front.mask, front.low_res)])
    tight_name, tight_prompts, _ = policy.fixed(policy.tight_padding).candidates(front.mask, None)[0]
    safe_name, safe_prompts, _ = policy.fixed(policy.safe_padding).candidates(front.safe_mask, None)[0]
    tight = policy.threshold(decode(tight_prompts))
    safe = policy.threshold(decode(safe_prompts))
    if tight.area < policy.switch_area_ratio * safe.area:
        front.tight_leads, front.safe_mask = False, None  # the tight track shrinks away: go on with the loose one
        return safe_name + " (tight track shrank)", safe
    front.safe_mask = safe.mask if safe.area else None  # an empty loose track can no longer be followed
    return tight_name, tight
