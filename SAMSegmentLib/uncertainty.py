"""Prompt-robustness uncertainty: how much the mask depends on exactly where the prompt was put.

A user's box is never exactly the box the model was trained with. SAM-U (Deng et al., 2023)
decodes several randomly jittered boxes around the user's box and reads the disagreement as
uncertainty; Huang et al. (MedIA 2023) show that SAM's masks move a lot under box jitter on
medical images. Here: ``n`` jittered copies of the prompt (boxes: each corner coordinate moved by
Gaussian noise with sd ``jitter`` times the box width/height; points: sd ``jitter`` times the size
of the unjittered mask's bounding box), decoded together by ``SamBackend.decode_batch``, give

* the **mean probability** map: the average of the n sigmoid(logit) maps, and
* an **uncertainty** map: ``"entropy"`` (default, SAM-U's predictive entropy of the mean
  probability, in bits, 0..1) or ``"variance"`` (variance of the n binary masks, 0..0.25: the
  fraction of jittered prompts that disagree, p(1-p)).

Seeded (``seed``) so a result is reproducible.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import SAMSegmentError
from .preprocessing import mask_bbox
from .prompts import Prompts, check_prompts, require_box
from .session_protocol import SessionProtocol
from .volume import SliceRef, check_slice_ref, constant_slice_error
from .worker import PRIORITY_INTERACTIVE

MEASURES = ("entropy", "variance")
# Samples mapped to full resolution at a time (memory: this many slice-sized float maps).
SLICE_MAPS_PER_STEP = 16


def check_sampling(n: int, jitter: float, seed: int, measure: str = "entropy") -> None:
    """Refuse sampling settings that cannot give a meaningful map, before any model work.

    Args:
        n, jitter, seed: as for ``jitter_prompts``.
        measure: as for ``uncertainty_from_probabilities``.

    Raises:
        SAMSegmentError: ``n`` < 1, ``jitter`` negative, NaN or infinite (NaN would give NaN
            maps), a negative or non-integer ``seed``, or an unknown ``measure``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise SAMSegmentError(f"Need at least one jittered sample, got n={n}", "use e.g. n=16")
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float, np.integer, np.floating)) \
            or not math.isfinite(jitter):
        raise SAMSegmentError(f"Jitter {jitter!r} is not a finite number",
                              "give the jitter as a fraction of the box size, e.g. 0.1")
    if jitter < 0:
        raise SAMSegmentError(f"Jitter must be >= 0, got {jitter}", "use a fraction of the box size, e.g. 0.1")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise SAMSegmentError(f"Random seed {seed!r} is not an integer >= 0", "give e.g. seed 0")
    if measure not in MEASURES:
        raise SAMSegmentError(f"Unknown uncertainty measure {measure!r}", f"use one of {', '.join(MEASURES)}")


def jitter_prompts(prompts: Prompts, n: int, jitter: float, seed: int, height: int, width: int,
                   point_scale: tuple[float, float] | None = None) -> list[Prompts]:
    """Randomly moved copies of ``prompts``, kept inside the slice.

    Box coordinates move by N(0, (jitter * box side)^2), each corner independently (so the box can
    shift, grow and shrink); points by N(0, (jitter * scale)^2).

    Args:
        prompts: the prompt to jitter (slice pixels).
        n: how many copies.
        jitter: the noise's sd as a fraction of the box side (points: of ``point_scale``).
        seed: seeds the random generator, so a result is reproducible.
        height: slice rows.
        width: slice columns.
        point_scale: (sx, sy) for points; None: the box's size if there is a box, else a tenth of
            the slice.

    Returns:
        ``n`` prompts with the same labels; boxes stay at least 2 px wide and high.

    Raises:
        SAMSegmentError: as ``check_sampling``.
    """
    check_sampling(n, jitter, seed)
    rng = np.random.default_rng(seed)
    out: list[Prompts] = []
    box = None if prompts.box is None else np.asarray(prompts.box, dtype=np.float64)
    if point_scale is None:
        point_scale = ((box[2] - box[0] + 1, box[3] - box[1] + 1) if box is not None else (width / 10, height / 10))
    for _ in range(n):
        new_box = None
        if box is not None:
            bw, bh = box[2] - box[0] + 1, box[3] - box[1] + 1
            b = box + rng.normal(0.0, 1.0, 4) * jitter * np.array([bw, bh, bw, bh])
            x0, x1 = sorted((b[0], b[2]))
            y0, y1 = sorted((b[1], b[3]))
            x0, x1 = np.clip([x0, x1], 0.0, width - 1.0)
            y0, y1 = np.clip([y0, y1], 0.0, height - 1.0)
            if x1 - x0 < 2.0:  # keep a usable box (>= 2 px) inside the slice
                x0, x1 = max(0.0, min(x0, width - 3.0)), max(0.0, min(x0, width - 3.0)) + 2.0
            if y1 - y0 < 2.0:
                y0, y1 = max(0.0, min(y0, height - 3.0)), max(0.0, min(y0, height - 3.0)) + 2.0
            new_box = np.array([x0, y0, x1, y1])
        pts = prompts.points.copy()
        if len(pts):
            pts = pts + rng.normal(0.0, 1.0, pts.shape) * jitter * np.asarray(point_scale, dtype=np.float64)
            pts[:, 0] = np.clip(pts[:, 0], 0.0, width - 1.0)
            pts[:, 1] = np.clip(pts[:, 1], 0.0, height - 1.0)
        out.append(Prompts(pts, prompts.labels.copy(), new_box))
    return out


def uncertainty_from_probabilities(probs: np.ndarray, measure: str = "entropy") -> tuple[np.ndarray, np.ndarray]:
    """The two maps from stacked per-sample probabilities.

    Args:
        probs: (N, H, W) probabilities.
        measure: "entropy" (of the mean probability, in bits) or "variance" (of the N binary masks).

    Returns:
        (mean probability, uncertainty), float32 (H, W).

    Raises:
        SAMSegmentError: an unknown ``measure``.
    """
    if measure not in MEASURES:
        raise SAMSegmentError(f"Unknown uncertainty measure {measure!r}", f"use one of {', '.join(MEASURES)}")
    p = np.asarray(probs, dtype=np.float64)
    mean = p.mean(axis=0)
    if measure == "entropy":
        q = np.clip(mean, 1e-7, 1 - 1e-7)
        unc = -(q * np.log2(q) + (1 - q) * np.log2(1 - q))
        unc[(mean <= 1e-7) | (mean >= 1 - 1e-7)] = 0.0
    else:
        unc = (p > 0.5).astype(np.float64).var(axis=0)
    return mean.astype(np.float32), unc.astype(np.float32)


def prompt_uncertainty(session: SessionProtocol, ref: SliceRef, prompts: Prompts, n: int = 16, jitter: float = 0.1,
                       seed: int = 0, measure: str = "entropy") -> tuple[np.ndarray, np.ndarray]:
    """Mean probability and uncertainty maps over ``n`` jittered copies of a prompt.

    The jitter is around the box ``predict`` decodes (with the session's box margin). Runs on the
    session's worker thread.

    Args:
        session: the segmentation session holding the volume.
        ref: the slice.
        prompts: the user's prompt; box-only models (LiteMedSAM, MedSAM) need a box, as for ``predict``.
        n: jittered samples.
        jitter: see ``jitter_prompts``.
        seed: see ``jitter_prompts``.
        measure: see ``uncertainty_from_probabilities``.

    Returns:
        (mean probability, uncertainty), float32 (H, W).

    Raises:
        PromptError: as for ``SegmentationSession.predict``: no prompt, only exclude points, a
            prompt outside the slice, or points only for a box-only model.
        VolumeError: the slice is outside the volume, or constant after windowing.
        SAMSegmentError: invalid ``n``, ``jitter``, ``seed`` or ``measure`` (``check_sampling``).
    """
    check_sampling(n, jitter, seed, measure)
    check_slice_ref(session.shape, ref)
    image = session.slice_image(ref)
    h, w = image.shape
    checked = check_prompts(prompts, h, w)  # the session's own checks, as for ``predict``
    require_box(session.backend.spec, checked)
    if session.is_constant(ref):
        raise constant_slice_error(ref, image)
    # jitter around the box ``predict`` decodes (with the model's margin), not the one drawn
    box = None if checked.box is None else session.user_box(ref, checked.box)
    base = Prompts(checked.points, checked.labels, box)

    def run() -> tuple[np.ndarray, np.ndarray]:
        import torch

        from .backends import LOW_RES_SIZE

        backend = session.backend
        emb = session.embedding(ref)
        geom = session.geometry(ref)
        key = object()  # one embedding, many prompts: its decoder features are computed once
        point_scale = None
        if box is None:  # points only: jitter relative to the size of what the prompt selects
            low, _ = backend.decode_batch(emb, geom, base.points[None], base.labels[None], features_key=key,
                                          adapter=session.adapter)
            with torch.inference_mode():
                mask = (geom.low_res_to_slice(low.float().cpu(), LOW_RES_SIZE)[0, 0] > 0).numpy()
            bbox = mask_bbox(mask)
            if bbox is not None:
                point_scale = (float(bbox[2] - bbox[0] + 1), float(bbox[3] - bbox[1] + 1))
        samples = jitter_prompts(base, n, jitter, seed, h, w, point_scale)
        points = np.stack([s.points for s in samples]) if len(base.points) else None
        labels = np.stack([s.labels for s in samples]) if len(base.points) else None
        boxes = np.stack([s.box for s in samples]) if box is not None else None
        low, _ = backend.decode_batch(emb, geom, points, labels, boxes, features_key=key, adapter=session.adapter)
        low = low.float().cpu()
        probs = []
        with torch.inference_mode():
            for start in range(0, n, SLICE_MAPS_PER_STEP):  # bounded memory for the full-resolution maps
                probs.append(torch.sigmoid(geom.low_res_to_slice(low[start:start + SLICE_MAPS_PER_STEP],
                                                                 LOW_RES_SIZE)[:, 0]).numpy())
        return uncertainty_from_probabilities(np.concatenate(probs), measure)

    return session.worker.call(run, PRIORITY_INTERACTIVE)
