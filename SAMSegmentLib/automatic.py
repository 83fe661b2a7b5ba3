"""Automatic "everything" segmentation: a grid of prompts per slice, no user input.

This is SAM's automatic mask generator as evaluated on medical images by Huang et al. (Medical
Image Analysis 2023, "Segment anything model for medical images?"): prompt every point of a
regular grid, keep the masks whose predicted quality (the decoder's IoU head) and *stability*
(how little the mask changes when the logit threshold moves by +-offset) are high, and remove
duplicates with mask non-maximum suppression.

Adaptations for this engine:

* **Box grids for box-only models.** LiteMedSAM and MedSAM were trained with boxes only; a single
  point gives them near-empty or random masks (on a phantom: IoU 0 on every disk). For models
  whose spec says ``needs_box`` the grid is a grid of square boxes (centres on the point grid,
  sides ``box_scales`` times the slice's longest side), and each kept mask is decoded once more
  with its own tight bounding box (``refine_boxes``), which pulls partial masks onto whole
  objects. A first-pass mask with the model's quality >= ``LOOSE_IOU_THRESH`` only seeds that
  refinement; the quality and stability thresholds apply to the refined masks, and the first-pass
  NMS de-duplicates the seeds so that similar grid boxes are refined once. SAM models get SAM's
  point grid with all three multimask outputs as candidates.
* **All filtering on the decoder's low-resolution logits.** Quality, stability, area and NMS are
  computed on the 256x256 decoder grid (cropped to the image part); only the masks that survive
  are resized to the slice.

Decoding goes through ``SamBackend.decode_batch``, as SAM's generator goes through
``predict_torch``: the backend decides between its ONNX Runtime decoder and eager batches
(``bench/everything.py`` times the paths side by side).

Label volumes (``everything_volume``): a pixel covered by several kept regions gets the label of
the smallest one (regions are painted largest first), so small structures inside large ones stay
visible. With ``link=True`` (default) a region takes the label of the region it overlaps best on
the previous slice (IoU >= ``link_iou``, one-to-one matching), so one label follows one structure
through the slices; with ``link=False`` every region of every slice gets its own label.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from .errors import SAMSegmentError
from .preprocessing import SliceGeometry, clip_box, mask_bbox
from .session_protocol import SessionProtocol
from .volume import SliceRef, check_slice_ref
from .worker import PRIORITY_PROPAGATION, CancelToken, ProgressCallback

log = logging.getLogger(__name__)

# box grids: first-pass masks need only this predicted IoU to seed the tight-box refinement pass
LOOSE_IOU_THRESH = 0.5
# a denser grid is no segmentation setting but a typo: 512 x 512 prompts already take hours per slice
MAX_POINTS_PER_SIDE = 512


@dataclass(frozen=True)
class EverythingParams:
    """Settings of the everything mode. ``None`` thresholds mean "the default for this model".

    SAM's defaults (IoU 0.88, stability 0.95) are calibrated for SAM's IoU head; LiteMedSAM's is
    poorly calibrated and its masks are softer, so box-only models default to lower thresholds
    (0.70, 0.80), chosen on phantoms where the true objects score 0.8-0.92 and 0.85-0.9.
    """

    points_per_side: int = 16
    prompt: str = "auto"  # "auto": boxes for box-only models (needs_box), points otherwise; or "points"/"boxes"
    box_scales: tuple[float, ...] = (0.12, 0.25)  # box side / longest slice side, per grid point
    pred_iou_thresh: float | None = None
    stability_thresh: float | None = None
    stability_offset: float = 1.0
    nms_iou: float = 0.7
    min_area_frac: float = 0.0005  # drop specks below this fraction of the slice
    max_area_frac: float = 0.9  # drop "the whole image" masks
    refine_boxes: bool = True  # box grids: re-decode each kept mask with its own tight box
    batch_size: int = 0  # prompts per eager decoder call and per backend call; 0 = the backend's choice
    # "auto": the backend's choice; "batched": eager batches; "loop": the ONNX Runtime decoder, one
    # prompt per run (eager batches where the backend has no decoder graph)
    decoder: str = "auto"

    def __post_init__(self) -> None:
        if self.points_per_side < 1:
            raise SAMSegmentError(f"points_per_side must be >= 1, got {self.points_per_side}", "use e.g. 16")
        if self.points_per_side > MAX_POINTS_PER_SIDE:
            raise SAMSegmentError(f"points_per_side {self.points_per_side} would decode {self.points_per_side ** 2} "
                                  f"prompts per slice; at most {MAX_POINTS_PER_SIDE} per side are accepted",
                                  "use e.g. 16 (SAM's own grids are 32 or 64 per side)")
        if self.prompt not in ("auto", "points", "boxes"):
            raise SAMSegmentError(f"Unknown grid prompt type {self.prompt!r}", "use auto, points or boxes")
        if self.batch_size < 0:
            raise SAMSegmentError(f"batch_size must be >= 0 (0 = auto), got {self.batch_size}", "use e.g. 16")
        if self.decoder not in ("auto", "batched", "loop"):
            raise SAMSegmentError(f"Unknown decoder path {self.decoder!r}", "use auto, batched or loop")
        scales = tuple(self.box_scales)
        if not scales or not all(_finite(v) and 0.0 < v <= 1.0 for v in scales):
            raise SAMSegmentError(f"Box scales {list(scales)} must be fractions of the slice's longest side, each "
                                  "above 0 and at most 1", "use e.g. 0.12 0.25")
        check_fraction("pred_iou_thresh (--min-quality)", self.pred_iou_thresh, high=None)
        check_fraction("stability_thresh (--min-stability)", self.stability_thresh)
        check_fraction("nms_iou (--nms-iou)", self.nms_iou)
        check_fraction("min_area_frac", self.min_area_frac)
        check_fraction("max_area_frac", self.max_area_frac)
        if not (_finite(self.stability_offset) and self.stability_offset > 0):
            raise SAMSegmentError(f"stability_offset must be a finite number > 0, got {self.stability_offset!r}",
                                  "use e.g. 1.0")
        if self.min_area_frac >= self.max_area_frac:
            raise SAMSegmentError(f"min_area_frac {self.min_area_frac} is not below max_area_frac {self.max_area_frac}",
                                  "give a smaller minimum or a larger maximum region size")

    def resolved(self, needs_box: bool) -> "EverythingParams":
        """A copy with the model-dependent defaults filled in.

        Args:
            needs_box: the model segments from boxes only (``ModelSpec.needs_box``).

        Returns:
            The parameters with ``prompt`` set to "boxes" or "points" and both thresholds set.
        """
        boxes = self.prompt == "boxes" or (self.prompt == "auto" and needs_box)
        iou = self.pred_iou_thresh if self.pred_iou_thresh is not None else (0.70 if boxes else 0.88)
        stab = self.stability_thresh if self.stability_thresh is not None else (0.80 if boxes else 0.95)
        return replace(self, prompt="boxes" if boxes else "points", pred_iou_thresh=iou, stability_thresh=stab)


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)


def check_fraction(name: str, value: Any, low: float = 0.0, high: float | None = 1.0) -> None:
    """Refuse a threshold that is not None or a finite number in [low, high] (NaN would switch its filter off)."""
    if value is None:
        return
    if not _finite(value) or value < low or (high is not None and value > high):
        span = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
        raise SAMSegmentError(f"{name} must be a finite number {span}, got {value!r}", f"give a number {span}")


@dataclass
class Region:
    """One automatically found region on one slice."""

    mask: np.ndarray  # bool (H, W)
    score: float  # decoder's predicted IoU
    stability: float  # stability score in [0, 1]
    prompt: np.ndarray  # the grid point (x, y) or box (x0, y0, x1, y1) that produced it, slice pixels
    label: int = 0  # 1..N by decreasing area on its slice (everything_slice); painted by regions_to_labels

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))


# ------------------------------------------------------------------------------------------ grids
def grid_points(height: int, width: int, n: int) -> np.ndarray:
    """SAM's ``build_point_grid`` in slice pixels.

    Args:
        height: slice rows.
        width: slice columns.
        n: points per side.

    Returns:
        (n * n, 2) points (x, y) at the cell centres, row-major.
    """
    frac = (np.arange(n, dtype=np.float64) + 0.5) / n
    xs, ys = np.meshgrid(frac * width - 0.5, frac * height - 0.5)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def grid_boxes(height: int, width: int, n: int, scales: Sequence[float]) -> np.ndarray:
    """Square boxes centred on ``grid_points``, one per scale, clipped to the slice.

    Args:
        height: slice rows.
        width: slice columns.
        n: grid points per side.
        scales: box sides as fractions of the slice's longest side.

    Returns:
        (n * n * len(scales), 4) boxes (x0, y0, x1, y1), those of the first scale first.
    """
    pts = grid_points(height, width, n)
    boxes = []
    for scale in scales:
        half = max(1.0, float(scale) * max(height, width) / 2.0)
        boxes.append(clip_box(np.concatenate([pts - half, pts + half], axis=1), height, width))
    return np.concatenate(boxes, axis=0)


# ------------------------------------------------------------------------------------------ decoder
# Prompts per backend call: how often ``cancel`` and ``progress`` are looked at (at least; a larger
# ``batch_size`` or the backend's eager batch on a GPU sets it).
PROMPTS_PER_CALL = 8
# EverythingParams.decoder -> SamBackend.decode_batch(path=...)
_DECODE_PATH = {"auto": "auto", "batched": "eager", "loop": "onnx"}


def _decode_grid(backend: Any, embedding: Any, geom: SliceGeometry, prompts: np.ndarray, boxes: bool,
                 multimask: bool, p: EverythingParams, features_key: Hashable, adapter: Any = None) -> tuple[Any, Any]:
    """Low-res logits (B, C, L, L) and predicted IoU (B, C), on the CPU, of grid prompts: boxes
    (B, 4) or points (B, 2), each decoded on its own (``SamBackend.decode_batch``; through the
    session's ``adapter`` when one is in use)."""
    kwargs = {"features_key": features_key, "path": _DECODE_PATH[p.decoder], "eager_batch": p.batch_size,
              "adapter": adapter}
    if boxes:
        low_res, iou = backend.decode_batch(embedding, geom, boxes=prompts, **kwargs)
    else:
        low_res, iou = backend.decode_batch(embedding, geom, points=prompts[:, None, :],
                                            labels=np.ones((len(prompts), 1), np.int64), multimask=multimask, **kwargs)
    return low_res.float().cpu(), iou.float().cpu()


def low_res_valid_size(geom: SliceGeometry, low_res_size: int) -> tuple[int, int]:
    """The part of the decoder's low-res grid that shows the image (the rest is padding).

    Args:
        geom: the slice's geometry.
        low_res_size: the decoder's output grid size (256).

    Returns:
        (rows, columns), each at least 1.
    """
    new_h, new_w = geom.scaled_size
    f = low_res_size / geom.image_size
    return max(1, int(np.ceil(new_h * f))), max(1, int(np.ceil(new_w * f)))


def stability_scores(logits: Any, offset: float = 1.0, threshold: float = 0.0) -> Any:
    """SAM's stability score: |logits > t + offset| / |logits > t - offset| per mask.

    Args:
        logits: (..., H, W) tensor of mask logits.
        offset: how far the threshold moves either way.
        threshold: the mask threshold t.

    Returns:
        (...) tensor in [0, 1]; 0 for a mask empty at the low threshold.
    """
    import torch

    high = (logits > threshold + offset).flatten(-2).sum(-1).float()
    low = (logits > threshold - offset).flatten(-2).sum(-1).float()
    return torch.where(low > 0, high / low.clamp(min=1.0), torch.zeros_like(high))


def mask_nms(masks: Any, scores: Any, iou_thresh: float) -> list[int]:
    """Greedy non-maximum suppression by mask IoU.

    Mask IoU rather than SAM's box IoU: a small organ inside a larger one has a box that overlaps
    the larger box a lot while the masks barely overlap, and both should be kept.

    Args:
        masks: (N, ...) bool tensor.
        scores: (N,) tensor; higher is better.
        iou_thresh: a mask overlapping a kept one by more than this is dropped.

    Returns:
        Indices of the kept masks, best first.
    """
    import torch

    if len(masks) == 0:
        return []
    flat = masks.reshape(len(masks), -1).float()
    inter = flat @ flat.T
    area = flat.sum(1)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1.0)
    order = torch.argsort(scores, descending=True).tolist()
    keep: list[int] = []
    suppressed = torch.zeros(len(masks), dtype=torch.bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_thresh
    return keep


def _tight_boxes(masks: Any, geom: SliceGeometry, low_res_size: int, margin: float = 0.05) -> np.ndarray:
    """Slice-pixel boxes around low-res masks (N, L, L), enlarged by ``margin`` of their size."""
    f = geom.image_size / low_res_size
    sx, sy = geom.scale_xy
    out = []
    for m in masks.numpy():
        bx0, by0, bx1, by1 = mask_bbox(m)
        x0, x1 = (bx0 * f) / sx, ((bx1 + 1) * f) / sx - 1
        y0, y1 = (by0 * f) / sy, ((by1 + 1) * f) / sy - 1
        dx, dy = margin * (x1 - x0 + 1), margin * (y1 - y0 + 1)
        out.append([x0 - dx, y0 - dy, x1 + dx, y1 + dy])
    return clip_box(np.asarray(out, dtype=np.float64).reshape(-1, 4), geom.height, geom.width)


class _Candidates:
    """Masks that passed the filters so far: low-res logits (full L x L frame) and their scores."""

    def __init__(self) -> None:
        self.logits: list[Any] = []
        self.scores: list[Any] = []
        self.stability: list[Any] = []
        self.prompts: list[np.ndarray] = []

    def add(self, logits: Any, scores: Any, stability: Any, prompts: np.ndarray) -> None:
        if len(logits):
            self.logits.append(logits)
            self.scores.append(scores)
            self.stability.append(stability)
            self.prompts.append(prompts)

    def cat(self) -> tuple[Any, Any, Any, np.ndarray]:
        import torch

        if not self.logits:
            return torch.zeros(0, 1, 1), torch.zeros(0), torch.zeros(0), np.zeros((0, 2))
        width = max(p.shape[1] for p in self.prompts)
        prompts = np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=np.nan)
                                  for p in self.prompts])
        return torch.cat(self.logits), torch.cat(self.scores), torch.cat(self.stability), prompts


def _filter(low_res: Any, iou: Any, prompts: np.ndarray, p: EverythingParams, valid: tuple[int, int],
            min_px: float, max_px: float, out: _Candidates, loose: bool = False) -> None:
    """Flatten (B, C) candidates, keep those passing quality, stability and area; append to ``out``.

    ``loose``: only the area limits and a lenient quality bar (seeds for the box refinement pass,
    whose tight boxes turn an off-centre partial mask into the whole object)."""
    b, c = iou.shape
    logits = low_res.reshape(b * c, *low_res.shape[-2:])
    scores = iou.reshape(-1)
    crop = logits[:, :valid[0], :valid[1]]
    stab = stability_scores(crop, p.stability_offset)
    area = (crop > 0).flatten(1).sum(1).float()
    ok = (area >= min_px) & (area <= max_px)
    if loose:
        ok &= scores >= min(p.pred_iou_thresh, LOOSE_IOU_THRESH)
    else:
        ok &= (scores >= p.pred_iou_thresh) & (stab >= p.stability_thresh)
    idx = ok.nonzero().flatten()
    if len(idx):
        out.add(logits[idx].clone(), scores[idx], stab[idx], np.repeat(prompts, c, axis=0)[idx.numpy()])


# ------------------------------------------------------------------------------------------ public API
def everything_slice(session: SessionProtocol, ref: SliceRef, params: EverythingParams | None = None,
                     progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> list[Region]:
    """All regions the model finds on one slice.

    Runs on the session's worker thread (``session.worker``).

    Args:
        session: the segmentation session holding the volume.
        ref: the slice.
        params: settings; None for the defaults (model-dependent thresholds filled in).
        progress: ``progress(done, total, message)``, called with the decoded prompt count.
        cancel: polled before each backend call.

    Returns:
        The regions, largest first, labelled 1..N in that order; [] for a slice that is
        constant after windowing.

    Raises:
        CancelledError: ``cancel`` was set.
    """
    check_slice_ref(session.shape, ref)
    if session.is_constant(ref):
        return []
    p = (params or EverythingParams()).resolved(bool(session.backend.spec.needs_box))
    return session.worker.call(lambda: _everything_now(session, ref, p, progress, cancel), PRIORITY_PROPAGATION)


@dataclass(frozen=True)
class _SliceGrid:
    """What every decode of one everything-mode slice shares."""

    backend: Any
    embedding: Any
    features_key: Hashable  # names ``embedding`` for the backend: its decoder features are computed once
    geom: SliceGeometry
    params: EverythingParams
    valid: tuple[int, int]  # rows and columns of the low-res grid that show the image
    prompts_per_call: int
    cancel: CancelToken | None
    adapter: Any = None  # the session's DecoderAdapter, or None

    def decode_filtered(self, prompts: np.ndarray, boxes: bool, multimask: bool, loose: bool,
                        progress: Callable[[int, int], None] | None = None) -> tuple[Any, Any, Any, np.ndarray]:
        """Decode ``prompts`` in chunks, keep the masks passing ``_filter``, remove duplicates by NMS:
        (low-res logits, scores, stability, prompts) of the kept masks, best first."""
        p = self.params
        n_valid = self.valid[0] * self.valid[1]
        min_px, max_px = p.min_area_frac * n_valid, p.max_area_frac * n_valid
        kept = _Candidates()
        total, size = len(prompts), self.prompts_per_call
        for start in range(0, total, size):
            if self.cancel is not None:
                self.cancel.raise_if_cancelled()
            chunk = prompts[start:start + size]
            low_res, iou = _decode_grid(self.backend, self.embedding, self.geom, chunk, boxes, multimask, p,
                                        self.features_key, self.adapter)
            _filter(low_res, iou, chunk, p, self.valid, min_px, max_px, kept, loose)
            if progress is not None:
                progress(start + len(chunk), total)
        logits, scores, stab, used = kept.cat()
        keep = mask_nms(logits[:, :self.valid[0], :self.valid[1]] > 0, scores * stab, p.nms_iou)
        return logits[keep], scores[keep], stab[keep], used[keep]


def _everything_now(session: SessionProtocol, ref: SliceRef, p: EverythingParams, progress: ProgressCallback | None,
                    cancel: CancelToken | None) -> list[Region]:
    import torch

    from .backends import LOW_RES_SIZE

    backend = session.backend
    geom = session.geometry(ref)
    h, w = geom.height, geom.width
    per_call = p.batch_size or max(PROMPTS_PER_CALL, backend.eager_batch_size)
    grid = _SliceGrid(backend, session.embedding(ref), object(), geom, p, low_res_valid_size(geom, LOW_RES_SIZE),
                      per_call, cancel, session.adapter)  # session.embedding inline: we are on the worker thread
    boxes = p.prompt == "boxes"
    prompts = grid_boxes(h, w, p.points_per_side, p.box_scales) if boxes else grid_points(h, w, p.points_per_side)
    multimask = not boxes and backend.spec.multimask_output
    refine = boxes and p.refine_boxes

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total, f"slice {ref.index}: {done} prompts decoded")

    logits, scores, stab, used = grid.decode_filtered(prompts, boxes, multimask, loose=refine, progress=report)
    if refine and len(logits):
        # second pass: each distinct first-pass mask's own tight box (LiteMedSAM segments best from
        # a tight box); the strict quality and stability filters apply to the refined masks only
        tight = _tight_boxes(logits[:, :grid.valid[0], :grid.valid[1]] > 0, geom, LOW_RES_SIZE)
        logits, scores, stab, used = grid.decode_filtered(tight, True, False, loose=False)
    regions: list[Region] = []
    if len(logits):
        with torch.inference_mode():
            full = geom.low_res_to_slice(logits[:, None], LOW_RES_SIZE)[:, 0] > 0
        min_full = p.min_area_frac * h * w
        for i in range(len(full)):
            mask = full[i].numpy()
            if np.count_nonzero(mask) < max(1.0, min_full):
                continue
            prompt = used[i][~np.isnan(used[i])]
            regions.append(Region(mask, float(scores[i]), float(stab[i]), prompt))
    regions.sort(key=lambda r: -r.area)
    for label, region in enumerate(regions, start=1):
        region.label = label
    log.debug("slice %s: %d prompts -> %d regions", ref, len(prompts), len(regions))
    return regions


def regions_to_labels(regions: Sequence[Region], shape: tuple[int, int]) -> np.ndarray:
    """Paint regions into a label image, largest first, so a small region inside a large one keeps its pixels.

    Args:
        regions: regions of one slice; each one's ``label`` is painted.
        shape: (H, W) of the slice.

    Returns:
        int32 (H, W) label image, 0 = background.
    """
    out = np.zeros(shape, dtype=np.int32)
    for region in sorted(regions, key=lambda r: -r.area):
        out[region.mask] = region.label
    return out


def _link(previous: np.ndarray, current: np.ndarray, next_label: int, min_iou: float) -> tuple[np.ndarray, int]:
    """Relabel ``current`` (per-slice labels 1..N) with the labels of ``previous`` it overlaps
    best (one-to-one, Hungarian on IoU, IoU >= ``min_iou``); unmatched regions get new labels."""
    from scipy.optimize import linear_sum_assignment

    cur_ids = [int(v) for v in np.unique(current) if v]
    prev_ids = [int(v) for v in np.unique(previous) if v]
    mapping: dict[int, int] = {}
    if cur_ids and prev_ids:
        iou = np.zeros((len(cur_ids), len(prev_ids)))
        for a, ca in enumerate(cur_ids):
            m = current == ca
            overlap = previous[m]
            for b, pb in enumerate(prev_ids):
                inter = int(np.count_nonzero(overlap == pb))
                if inter:
                    iou[a, b] = inter / (np.count_nonzero(m) + np.count_nonzero(previous == pb) - inter)
        rows, cols = linear_sum_assignment(-iou)
        for r, c in zip(rows, cols):
            if iou[r, c] >= min_iou:
                mapping[cur_ids[r]] = prev_ids[c]
    out = np.zeros_like(current)
    for cid in cur_ids:
        if cid not in mapping:
            mapping[cid] = next_label
            next_label += 1
        out[current == cid] = mapping[cid]
    return out, next_label


def label_volume_from_regions(regions_by_index: dict[int, Sequence[Region]], shape: tuple[int, int, int],
                              axis: int = 0, link: bool = True, link_iou: float = 0.5) -> np.ndarray:
    """Label volume from per-slice regions, in increasing slice order.

    Separate from the model work so a viewer can re-link with other settings without decoding again.

    Args:
        regions_by_index: regions per slice index along ``axis``.
        shape: (K, J, I) of the volume.
        axis: the slicing axis.
        link: a region takes the label of the previous slice's region it overlaps best (one-to-one,
            IoU >= ``link_iou``); only adjacent slices link, so a gap starts new labels. False:
            every region of every slice gets its own label, numbered in slice order.
        link_iou: the least IoU that links two regions.

    Returns:
        int32 label volume of ``shape``.
    """
    from .volume import set_slice, slice_shape

    labels = np.zeros(shape, dtype=np.int32)
    plane_shape = slice_shape(shape, axis)
    next_label = 1
    previous: np.ndarray | None = None
    prev_index: int | None = None
    for index in sorted(regions_by_index):
        plane = regions_to_labels(list(regions_by_index[index]), plane_shape)
        if link and previous is not None and prev_index is not None and index - prev_index == 1:
            plane, next_label = _link(previous, plane, next_label, link_iou)
        else:
            ids = [int(v) for v in np.unique(plane) if v]
            relabelled = np.zeros_like(plane)
            for offset, v in enumerate(ids):
                relabelled[plane == v] = next_label + offset
            plane, next_label = relabelled, next_label + len(ids)
        set_slice(labels, SliceRef(axis, index), plane)
        previous, prev_index = plane, index
    return labels


def everything_volume(session: SessionProtocol, axis: int = 0, indices: Sequence[int] | None = None,
                      params: EverythingParams | None = None, link: bool = True, link_iou: float = 0.5,
                      progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> np.ndarray:
    """Everything mode on many slices, as a label volume.

    Args:
        session: the segmentation session holding the volume.
        axis: the slicing axis.
        indices: slice indices along ``axis``; None for all.
        params: as for ``everything_slice``.
        link: labels follow regions through adjacent slices (best one-to-one IoU match with the
            previous slice, >= ``link_iou``), so one label is one structure in 3D as far as 2D
            overlap can tell; a slice gap (an index skipped) starts new labels. False: each region
            of each slice gets a label of its own.
        link_iou: the least IoU that links two regions.
        progress: ``progress(done, total, message)``, called with the finished slice count.
        cancel: polled between slices and before each backend call.

    Returns:
        int32 label volume of the session's shape.

    Raises:
        CancelledError: ``cancel`` was set.
    """
    check_fraction("link_iou", link_iou)
    shape = session.shape
    todo = list(range(shape[axis])) if indices is None else sorted({int(i) for i in indices})
    found: dict[int, list[Region]] = {}
    for done, index in enumerate(todo):
        if cancel is not None:
            cancel.raise_if_cancelled()
        found[index] = everything_slice(session, SliceRef(axis, index), params, cancel=cancel)
        if progress is not None:
            progress(done + 1, len(todo), f"slice {index}: {len(found[index])} region(s)")
    return label_volume_from_regions(found, shape, axis, link, link_iou)
