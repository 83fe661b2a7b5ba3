"""``samsegment demo``: the whole product on the bundled sample CT, with a Dice check.

The box a user would drag is simulated by the reference label's bounding box on the structure's
largest slice; everything after that (the anchor mask, propagation, stopping) uses only the
model and the image, so the Dice reported is what a user clicking that box would get.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ImageIOError, PromptError
from .preprocessing import mask_bbox

if TYPE_CHECKING:
    from .backends import SamBackend
    from .worker import CancelToken, ProgressCallback


def run_demo(out_dir: str | Path, structure: str = "spleen", model: str | SamBackend | None = None,
             checkpoint: str | None = None, device: str | None = None, overwrite: bool = False,
             window: Any = None, cache_bytes: int = 1 << 30, axis: int = 0,
             runtime: str | None = None, registry: str | Path | None = None, modality: str = "auto",
             progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> dict[str, Any]:
    """Segment ``structure`` of the bundled sample CT from one box and propagate it; print nothing.

    Args:
        out_dir: folder for ``<structure>_mask.nii.gz`` and ``<structure>_overlay.png``.
        structure: a label name of the sample (``sample_data.label_values()``).
        model: a model id of the registry (None: its default) or an already built ``SamBackend``;
            ``checkpoint``, ``device``, ``runtime`` and ``registry`` (a user registry file, see
            ``model_registry``) apply when the backend is built here.
        overwrite: replace the two outputs if they exist (otherwise they are refused before any work).
        window, modality: the intensity window, as for ``SegmentationSession.set_volume``.
        cache_bytes: the session's embedding budget.
        axis: the slice axis of the box and of propagation.
        progress, cancel: passed to ``propagate``.

    Returns:
        A JSON-ready summary: structure, model, device, anchor slice, box, Dice of the anchor slice
        and of the volume (4 decimals), slices written, stops, timings (s) and the two output paths.
    """
    from . import io as sio
    from . import sample_data
    from .backends import SamBackend
    from .metrics import dice
    from .propagation import propagate
    from .prompts import Prompts
    from .session import SegmentationSession
    from .volume import SliceRef

    out = Path(out_dir)
    labels_by_name = sample_data.label_values()
    if structure not in labels_by_name:
        raise PromptError(f"The sample has no structure {structure!r}",
                          f"choose one of: {', '.join(sorted(labels_by_name))}")
    if out.exists() and not out.is_dir():
        raise ImageIOError(f"{out} is a file; the demo writes its mask and overlay into a folder",
                           "give --out a folder (new or existing)")
    image_path = sample_data.path(sample_data.IMAGE)
    mask_path = out / f"{structure}_mask.nii.gz"
    png_path = out / f"{structure}_overlay.png"
    # both outputs refused (existing, or their folder not writable) before any work
    sio.check_output_path(mask_path, overwrite, [image_path])
    sio.check_png_path(png_path, overwrite, [image_path])
    volume, geometry = sio.read_volume(image_path)
    labels, _ = sio.read_volume(sample_data.path(sample_data.LABELS))
    reference = labels == labels_by_name[structure]
    areas = np.moveaxis(reference, axis, 0).reshape(reference.shape[axis], -1).sum(1)
    anchor = int(np.argmax(areas))
    ref = SliceRef(axis, anchor)
    box = mask_bbox(np.take(reference, anchor, axis)).astype(float).tolist()  # the tight box a user would drag

    t0 = time.perf_counter()
    if not isinstance(model, SamBackend):
        model = SamBackend.from_model_id(model, checkpoint, device, extra_registry=registry, runtime=runtime)
    with SegmentationSession(model=model, cache_bytes=cache_bytes) as session:
        session.set_volume(volume, window=window, modality=modality)
        t_load = time.perf_counter() - t0
        first = session.predict(ref, Prompts(box=box))
        t_first = time.perf_counter() - t0
        result = propagate(session, axis, {anchor: first.mask}, progress=progress, cancel=cancel)
        seg = result.to_volume(volume.shape, {anchor: first.mask})
        elapsed = time.perf_counter() - t0
        sio.write_mask(mask_path, seg.astype(np.uint8), geometry, overwrite=overwrite, source_paths=[image_path])
        indices = sorted({anchor} | set(result.masks))
        sio.write_png_montage(png_path, session.slice_image, seg, axis, indices, geometry, overwrite=overwrite,
                              source_paths=[image_path])
        return {
            "structure": structure, "model": session.model_id, "device": session.backend.device,
            "anchor_slice": anchor, "box_xyxy": box, "anchor_dice": round(dice(first.mask, np.take(reference, anchor, axis)), 4),
            "slices_written": len(indices), "stops": [(s.direction, s.last_index, s.reason.value) for s in result.stops],
            "dice": round(dice(seg, reference), 4), "seconds_total": round(elapsed, 2),
            "seconds_to_first_mask": round(t_first, 2), "seconds_model_load": round(t_load, 2),
            "mask": str(mask_path), "overlay": str(png_path),
        }
