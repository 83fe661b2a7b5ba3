"""Automatic "everything" segmentation: a grid of prompts per slice, no user input.

This is SAM's automatic mask generator as evaluated on medical images by Huang et al. (Medical
Image Analysis 2023, "Segment anything model for medical images?"): prompt every point of a
regular grid, keep the masks whose predicted quality (the decoder's IoU head) and *stability*
(how little the mask changes when the logit threshold moves by +-offset) are high, and remove
duplicates with mask non-maximum suppression.

Two adaptations for this engine, both documented where they are made:

* **Box grids for box-only models.** LiteMedSAM and MedSAM were trained with boxes only; a single
  point gives them near-empty or random masks (measured: IoU 0 on every disk of a phantom). For
  models whose spec says ``needs_box`` the grid is a grid of square boxes (centres on the point
  grid, sides ``box_scales`` times the slice's longest side), and each kept mask is decoded once
  more with its own tight bounding box (``refine_boxes``), which pulls partial masks onto whole
  objects. SAM models get SAM's point grid with all three multimask outputs as candidates.
* **All filtering on the decoder's low-resolution logits.** Quality, stability, area and NMS are
  computed on the 256x256 decoder grid (cropped to the image part); only the masks that survive
  are resized to the slice.
* **Batched decoding where it pays.** ``decode_batch`` sends B prompts through the prompt encoder
  and mask decoder in one call (the decoder repeats the embedding per prompt); on a GPU that is
  what makes a 1,000-prompt grid fast. On the 2-core CPU it was measured slower per prompt than
  one-prompt calls, and ONNX Runtime's one-prompt decoder faster still, so ``decoder_plan`` picks
  the path per machine; ``bench/everything.py`` measures all of them side by side.

Also: a box-first-pass mask with the model's quality >= 0.5 only seeds the refinement; the
quality and stability thresholds apply to the refined masks. The first-pass NMS de-duplicates
the seeds so that similar grid boxes are refined once.

Label volumes (``everything_volume``): a pixel covered by several kept regions gets the label of
the smallest one (regions are painted largest first), so small structures inside large ones stay
visible. With ``link=True`` (default) a region takes the label of the region it overlaps best on
the previous slice (IoU >= ``link_iou``, one-to-one matching), so one label follows one structure
through the slices; with ``link=False`` every region of every slice gets its own label.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from .errors import SAMSegmentError
from .volume import SliceRef, check_slice_ref
from .worker import PRIORITY_PROPAGATION, CancelToken, ProgressCallback

log = logging.getLogger(__name__)

# box grids: first-pass masks need only this predicted IoU to seed the tight-box refinement pass
LOOSE_IOU_THRESH = 0.5


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
    batch_size: int = 0  # prompts per decoder call; 0 = auto (64 on a GPU, 1 on CPU: measured faster there)
    decoder: str = "auto"  # "batched" (eager, batch_size per call), "loop" (backend.decode per prompt), "auto"

    def __post_init__(self) -> None:
        if self.points_per_side < 1:
            raise SAMSegmentError(f"points_per_side must be >= 1, got {self.points_per_side}", "use e.g. 16")
        if self.prompt not in ("auto", "points", "boxes"):
            raise SAMSegmentError(f"Unknown grid prompt type {self.prompt!r}", "use auto, points or boxes")
        if self.batch_size < 0:
            raise SAMSegmentError(f"batch_size must be >= 0 (0 = auto), got {self.batch_size}", "use e.g. 16")
        if self.decoder not in ("auto", "batched", "loop"):
            raise SAMSegmentError(f"Unknown decoder path {self.decoder!r}", "use auto, batched or loop")

    def resolved(self, needs_box: bool) -> "EverythingParams":
        """A copy with the model-dependent defaults filled in."""
        boxes = self.prompt == "boxes" or (self.prompt == "auto" and needs_box)
        iou = self.pred_iou_thresh if self.pred_iou_thresh is not None else (0.70 if boxes else 0.88)
        stab = self.stability_thresh if self.stability_thresh is not None else (0.80 if boxes else 0.95)
        return replace(self, prompt="boxes" if boxes else "points", pred_iou_thresh=iou, stability_thresh=stab)


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

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) inclusive pixel bounds; (0, 0, -1, -1) for an empty mask."""
        ys, xs = np.nonzero(self.mask)
        if not len(xs):
            return 0, 0, -1, -1
        return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


# ------------------------------------------------------------------------------------------ grids
def grid_points(height: int, width: int, n: int) -> np.ndarray:
    """SAM's ``build_point_grid``: n x n points at cell centres, (x, y) in slice pixels, row-major."""
    frac = (np.arange(n, dtype=np.float64) + 0.5) / n
    xs, ys = np.meshgrid(frac * width - 0.5, frac * height - 0.5)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def grid_boxes(height: int, width: int, n: int, scales: Sequence[float]) -> np.ndarray:
    """Square boxes centred on ``grid_points``, one per scale, clipped to the slice: (M, 4)."""
    pts = grid_points(height, width, n)
    boxes = []
    for scale in scales:
        half = max(1.0, float(scale) * max(height, width) / 2.0)
        b = np.concatenate([pts - half, pts + half], axis=1)
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0.0, width - 1.0)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0.0, height - 1.0)
        boxes.append(b)
    return np.concatenate(boxes, axis=0)


# ------------------------------------------------------------------------------------------ decoder
def decode_batch(backend: Any, embedding: Any, geom: Any, points: np.ndarray | None = None,
                 labels: np.ndarray | None = None, boxes: np.ndarray | None = None,
                 multimask: bool = False) -> tuple[Any, Any]:
    """Decode B prompts on one embedding in a single prompt-encoder + mask-decoder call.

    ``points`` (B, P, 2) and ``labels`` (B, P) and/or ``boxes`` (B, 4) are in slice pixels.
    Returns (low-res logits (B, C, L, L), predicted IoU (B, C)) as CPU float tensors, C = 3 with
    ``multimask`` else 1. The backend's own ``decode`` handles one prompt set per call (and may run
    an ONNX graph with batch 1); here the eager modules are called directly, which is what makes
    one call per batch possible: the decoder repeats the image embedding per prompt internally.
    """
    import torch

    dev = backend.device
    point_arg = None
    n = None
    if points is not None:
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim == 2:
            pts = pts[:, None, :]
        n = len(pts)
        lab = (np.ones(pts.shape[:2], np.int64) if labels is None
               else np.asarray(labels, np.int64).reshape(pts.shape[:2]))
        coords = geom.points_to_model(pts.reshape(-1, 2)).reshape(pts.shape)
        point_arg = (torch.as_tensor(coords, dtype=torch.float32, device=dev), torch.as_tensor(lab, device=dev))
    box_arg = None
    if boxes is not None:
        bx = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if n is not None and len(bx) != n:
            raise SAMSegmentError(f"{n} point sets but {len(bx)} boxes in one batch", "give one box per point set")
        scaled = np.stack([geom.box_to_model(b, backend.spec.box_rounding) for b in bx])
        box_arg = torch.as_tensor(scaled, dtype=torch.float32, device=dev)
    if point_arg is None and box_arg is None:
        raise SAMSegmentError("decode_batch needs points or boxes", "pass at least one prompt")
    with torch.inference_mode():
        emb = embedding.to(dev, torch.float32)
        dense_pe = backend.prompt_encoder.get_dense_pe()
        sparse, dense = backend.prompt_encoder(points=point_arg, boxes=box_arg, masks=None)
        low_res, iou = backend.mask_decoder(image_embeddings=emb, image_pe=dense_pe, sparse_prompt_embeddings=sparse,
                                            dense_prompt_embeddings=dense, multimask_output=multimask)
    return low_res.float().cpu(), iou.float().cpu()


def decoder_plan(backend: Any, params: EverythingParams, multimask: bool) -> tuple[str, int]:
    """(path, batch size) for decoding a grid, from what was measured on each kind of machine.

    On this project's 2-core CPU (bench/everything.py) the backend's ONNX Runtime decoder, one
    prompt per call, beat eager PyTorch, and eager batches of 16 were slower per prompt than
    batches of 1 (the 32x256x256 upscaling tensors of a batch fall out of cache). On a GPU one
    call per batch is what pays. So "auto" = "loop" when the backend decodes with ONNX Runtime
    (single-mask prompts; the ONNX graph returns only the best of SAM's three masks), otherwise
    "batched" with 64 prompts per call on a GPU and 1 on CPU.
    """
    path = params.decoder
    if path == "auto":
        path = "loop" if (backend.decoder_runtime == "onnx" and not multimask) else "batched"
    size = params.batch_size or (1 if str(backend.device).startswith("cpu") else 64)
    return path, size


def decode_prompts(backend: Any, embedding: Any, geom: Any, prompts: np.ndarray, boxes: bool, multimask: bool,
                   path: str, features_key: Any = None) -> tuple[Any, Any]:
    """Decode a chunk of grid prompts (boxes (B, 4) or points (B, 2)) by ``path``: low-res logits
    (B, C, L, L) and predicted IoU (B, C), as ``decode_batch`` returns them. ``features_key``
    names ``embedding`` for the backend across chunks (``SamBackend.decode``)."""
    import torch

    if path == "batched":
        if boxes:
            return decode_batch(backend, embedding, geom, boxes=prompts)
        return decode_batch(backend, embedding, geom, points=prompts[:, None, :], multimask=multimask)
    lows, ious = [], []
    key = features_key if features_key is not None else object()
    for pr in prompts:
        if boxes:
            out = backend.decode(embedding, geom, box=pr, features_key=key)
        else:
            out = backend.decode(embedding, geom, np.asarray(pr, dtype=np.float64)[None], np.ones(1, np.int64),
                                 multimask=multimask, features_key=key)
        lows.append(out.low_res_logits.float().cpu())
        ious.append(torch.tensor([[out.score]]))
    return torch.cat(lows), torch.cat(ious)


def low_res_valid_size(geom: Any, low_res_size: int) -> tuple[int, int]:
    """Rows and columns of the decoder's low-res grid that show the image (the rest is padding)."""
    new_h, new_w = geom.scaled_size
    f = low_res_size / geom.image_size
    return max(1, int(np.ceil(new_h * f))), max(1, int(np.ceil(new_w * f)))


def stability_scores(logits: Any, offset: float = 1.0, threshold: float = 0.0) -> Any:
    """SAM's stability score: |logits > t + offset| / |logits > t - offset| per mask (last two dims)."""
    import torch

    high = (logits > threshold + offset).flatten(-2).sum(-1).float()
    low = (logits > threshold - offset).flatten(-2).sum(-1).float()
    return torch.where(low > 0, high / low.clamp(min=1.0), torch.zeros_like(high))


def mask_nms(masks: Any, scores: Any, iou_thresh: float) -> list[int]:
    """Greedy non-maximum suppression on masks (N, ...) by mask IoU; indices kept, best first.

    Mask IoU rather than SAM's box IoU: a small organ inside a larger one has a box that overlaps
    the larger box a lot while the masks barely overlap, and both should be kept.
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


def _tight_boxes(masks: Any, geom: Any, low_res_size: int, margin: float = 0.05) -> np.ndarray:
    """Slice-pixel boxes around low-res masks (N, L, L), enlarged by ``margin`` of their size."""
    f = geom.image_size / low_res_size
    sx, sy = geom.scale_xy
    out = []
    for m in masks.numpy():
        ys, xs = np.nonzero(m)
        x0, x1 = (xs.min() * f) / sx, ((xs.max() + 1) * f) / sx - 1
        y0, y1 = (ys.min() * f) / sy, ((ys.max() + 1) * f) / sy - 1
        dx, dy = margin * (x1 - x0 + 1), margin * (y1 - y0 + 1)
        out.append([max(0.0, x0 - dx), max(0.0, y0 - dy), min(geom.width - 1.0, x1 + dx),
                    min(geom.height - 1.0, y1 + dy)])
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)


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
def everything_slice(session: Any, ref: SliceRef, params: EverythingParams | None = None,
                     progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> list[Region]:
    """All regions the model finds on one slice, largest first (labels 1..N in that order).

    Runs on the session's inference thread (one thread for all model calls, see ``worker``).
    ``progress(done, total, message)`` counts decoded prompts; ``cancel`` is polled per batch.
    A slice that is constant after windowing has nothing to find and gives [].
    """
    check_slice_ref(session.shape, ref)
    if session.is_constant(ref):
        return []
    p = (params or EverythingParams()).resolved(bool(session.backend.spec.needs_box))
    return session.worker.call(lambda: _everything_now(session, ref, p, progress, cancel), PRIORITY_PROPAGATION)


def _everything_now(session: Any, ref: SliceRef, p: EverythingParams, progress: ProgressCallback | None,
                    cancel: CancelToken | None) -> list[Region]:
    import torch

    from .backends import LOW_RES_SIZE

    backend = session.backend
    emb = session.embedding(ref)  # inline: we are on the worker thread
    key = object()  # names emb for the backend: its decoder features are computed once for all prompts
    geom = session.geometry(ref)
    h, w = geom.height, geom.width
    valid = low_res_valid_size(geom, LOW_RES_SIZE)
    n_valid = valid[0] * valid[1]
    min_px, max_px = p.min_area_frac * n_valid, p.max_area_frac * n_valid
    boxes = p.prompt == "boxes"
    prompts = grid_boxes(h, w, p.points_per_side, p.box_scales) if boxes else grid_points(h, w, p.points_per_side)
    multimask = not boxes and backend.spec.multimask_output
    refine = boxes and p.refine_boxes
    path, size = decoder_plan(backend, p, multimask)
    size = max(size, 8) if path == "loop" else size  # loop: chunks only set how often cancel/progress run
    total = len(prompts)
    cands = _Candidates()
    for start in range(0, total, size):
        if cancel is not None:
            cancel.raise_if_cancelled()
        chunk = prompts[start:start + size]
        low_res, iou = decode_prompts(backend, emb, geom, chunk, boxes, multimask, path, key)
        _filter(low_res, iou, chunk, p, valid, min_px, max_px, cands, loose=refine)
        if progress is not None:
            progress(min(start + size, total), total, f"slice {ref.index}: {start + len(chunk)} prompts decoded")
    logits, scores, stab, used = cands.cat()
    keep = mask_nms(logits[:, :valid[0], :valid[1]] > 0, scores * stab, p.nms_iou)
    logits, scores, stab, used = logits[keep], scores[keep], stab[keep], used[keep]
    if refine and len(keep):
        # second pass: each distinct first-pass mask's own tight box (LiteMedSAM segments best from
        # a tight box); the strict quality and stability filters apply to the refined masks only
        tight = _tight_boxes(logits[:, :valid[0], :valid[1]] > 0, geom, LOW_RES_SIZE)
        refined = _Candidates()
        for start in range(0, len(tight), size):
            if cancel is not None:
                cancel.raise_if_cancelled()
            chunk = tight[start:start + size]
            low_res, iou = decode_prompts(backend, emb, geom, chunk, True, False, path, key)
            _filter(low_res, iou, chunk, p, valid, min_px, max_px, refined)
        logits, scores, stab, used = refined.cat()
        keep = mask_nms(logits[:, :valid[0], :valid[1]] > 0, scores * stab, p.nms_iou)
        logits, scores, stab, used = logits[keep], scores[keep], stab[keep], used[keep]
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
    log.debug("slice %s: %d prompts -> %d regions", ref, total, len(regions))
    return regions


def regions_to_labels(regions: Sequence[Region], shape: tuple[int, int]) -> np.ndarray:
    """Paint regions into an int32 label image, largest first, so a small region inside a large
    one keeps its pixels; each region's ``label`` is used (0 = background)."""
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
    """Label volume (int32, ``shape``) from per-slice regions, in increasing slice order.

    ``link=True``: a region takes the label of the previous slice's region it overlaps best
    (one-to-one, IoU >= ``link_iou``); only adjacent slices link, so a gap starts new labels.
    ``link=False``: every region of every slice gets its own label, numbered in slice order.
    Separate from the model work so a viewer can re-link with other settings without decoding again.
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


def everything_volume(session: Any, axis: int = 0, indices: Sequence[int] | None = None,
                      params: EverythingParams | None = None, link: bool = True, link_iou: float = 0.5,
                      progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> np.ndarray:
    """Everything mode on slices ``indices`` (default: all) along ``axis``: an int32 label volume.

    ``link=True`` (default): labels follow regions through adjacent slices (best one-to-one IoU
    match with the previous slice, >= ``link_iou``), so one label is one structure in 3D as far as
    2D overlap can tell; a slice gap (an index skipped) starts new labels. ``link=False``: each
    region of each slice gets a label of its own. ``progress(done, total, message)`` counts slices;
    ``cancel`` is polled between decoder batches.
    """
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
