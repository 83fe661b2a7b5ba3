"""``samsegment demo``: the whole product on the bundled sample CT, with a Dice check.

The box a user would drag is simulated by the reference label's bounding box on the structure's
largest slice; everything after that (the anchor mask, propagation, stopping) uses only the
model and the image, so the Dice printed is what a user clicking that box would get.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageIOError, PromptError


def reference_box(mask2d: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask2d)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def run_demo(out_dir: str | Path, structure: str = "spleen", model: str | None = None,
             checkpoint: str | None = None, device: str | None = None, overwrite: bool = False,
             window: Any = None, cache_bytes: int = 1 << 30, axis: int = 0,
             runtime: str | None = None) -> dict[str, Any]:
    from . import io as sio
    from . import sample_data
    from .cli import write_png_montage
    from .propagation import dice, propagate
    from .prompts import Prompts
    from .session import SegmentationSession
    from .volume import SliceRef

    out = Path(out_dir)
    mask_path = out / f"{structure}_mask.nii.gz"
    png_path = out / f"{structure}_overlay.png"
    for p in (mask_path, png_path):
        if p.exists() and not overwrite:
            raise ImageIOError(f"{p} already exists", "pass --overwrite or choose another --out folder")
    out.mkdir(parents=True, exist_ok=True)

    labels_by_name = sample_data.label_values()
    if structure not in labels_by_name:
        raise PromptError(f"The sample has no structure {structure!r}",
                          f"choose one of: {', '.join(sorted(labels_by_name))}")
    image_path = sample_data.path(sample_data.IMAGE)
    volume, geometry = sio.read_volume(image_path)
    labels, _ = sio.read_volume(sample_data.path(sample_data.LABELS))
    reference = labels == labels_by_name[structure]
    areas = np.moveaxis(reference, axis, 0).reshape(reference.shape[axis], -1).sum(1)
    anchor = int(np.argmax(areas))
    ref = SliceRef(axis, anchor)
    box = reference_box(np.take(reference, anchor, axis))

    t0 = time.perf_counter()
    with SegmentationSession(model=model, checkpoint=checkpoint, device=device, cache_bytes=cache_bytes,
                             runtime=runtime) as session:
        session.set_volume(volume, window=window)
        t_load = time.perf_counter() - t0
        first = session.predict(ref, Prompts(box=box))
        t_first = time.perf_counter() - t0
        result = propagate(session, axis, {anchor: first.mask})
        seg = result.to_volume(volume.shape, {anchor: first.mask})
        elapsed = time.perf_counter() - t0
        sio.write_mask(mask_path, seg.astype(np.uint8), geometry, overwrite=overwrite, source_paths=[image_path])
        indices = sorted({anchor} | set(result.masks))
        write_png_montage(png_path, session, seg, axis, indices, geometry, overwrite=overwrite)
        score = dice(seg, reference)
        summary = {
            "structure": structure, "model": session.model_id, "device": session.backend.device,
            "anchor_slice": anchor, "box_xyxy": box, "anchor_dice": round(dice(first.mask, np.take(reference, anchor, axis)), 4),
            "slices_written": len(indices), "stops": [(s.direction, s.last_index, s.reason.value) for s in result.stops],
            "dice": round(score, 4), "seconds_total": round(elapsed, 2), "seconds_to_first_mask": round(t_first, 2),
            "seconds_model_load": round(t_load, 2), "mask": str(mask_path), "overlay": str(png_path),
        }
    print(f"Structure: {structure}, model {summary['model']} on {summary['device']}")
    print(f"Box {[round(v) for v in box]} on slice {anchor}; propagated to {len(indices)} slices "
          f"in {elapsed:.1f} s")
    print(f"Mask: {mask_path}\nOverlay: {png_path}")
    print(f"Dice: {score:.4f}")
    return summary
