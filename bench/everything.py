"""Everything mode: seconds per slice, batched decoding vs the naive one-prompt-at-a-time path,
measured side by side in one run on the bundled sample CT. Prints JSON.

* ``batched``: ``everything_slice`` with eager decoder batches — the grid's prompts go through the
  prompt encoder + mask decoder ``--batch-size`` at a time, and quality/stability/NMS run on the
  256x256 low-res logits; only surviving masks are resized to the slice.
* ``naive``: the same algorithm through the public one-prompt API: ``session.decode`` per grid
  prompt (the backend's own decoder path, ONNX Runtime or eager), full-resolution logits per
  prompt, stability and NMS on full-resolution masks.
* ``batch_size_1``: the batched code with one prompt per decoder call (isolates batching itself).
* ``onnx_loop``: the engine's code, one prompt per call through the backend's ONNX Runtime decoder.
* ``engine_default``: what ``everything_slice`` does by default on this machine (the backend's
  choice: ONNX Runtime one prompt per run, or eager batches).

The slice's embedding is computed once before timing (it is the same for every variant); its
time is reported separately. The machine's load average is printed with the numbers, because
other jobs on a shared 2-core machine change them a lot.

Usage: python bench/everything.py [--grid 8] [--scales 0.12 0.25] [--slices 2] [--batch-size 16] [--no-naive]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore", category=FutureWarning)


def naive_everything(session, ref, params):
    """The everything algorithm with one ``session.decode`` call per prompt (full-resolution masks)."""
    import torch

    from SAMSegmentLib.automatic import LOOSE_IOU_THRESH, Region, grid_boxes, grid_points, mask_nms, stability_scores
    from SAMSegmentLib.prompts import Prompts

    p = params.resolved(bool(session.backend.spec.needs_box))
    h, w = session.slice_image(ref).shape
    boxes = p.prompt == "boxes"
    prompts = grid_boxes(h, w, p.points_per_side, p.box_scales) if boxes else grid_points(h, w, p.points_per_side)
    refine = boxes and p.refine_boxes
    min_px, max_px = p.min_area_frac * h * w, p.max_area_frac * h * w

    def run(prompt_list, loose):
        kept = []
        for pr in prompt_list:
            pred = session.decode(ref, Prompts(box=pr) if boxes else Prompts.from_lists([tuple(pr)]))
            logits = torch.from_numpy(pred.logits)
            stab = float(stability_scores(logits[None], p.stability_offset)[0])
            area = int(pred.mask.sum())
            ok = min_px <= area <= max_px and (pred.score >= min(p.pred_iou_thresh, LOOSE_IOU_THRESH) if loose else
                                               pred.score >= p.pred_iou_thresh and stab >= p.stability_thresh)
            if ok:
                kept.append(Region(pred.mask, pred.score, stab, np.asarray(pr)))
        if not kept:
            return []
        keep = mask_nms(torch.from_numpy(np.stack([r.mask for r in kept])),
                        torch.tensor([r.score * r.stability for r in kept]), p.nms_iou)
        return [kept[i] for i in keep]

    regions = run(prompts, loose=refine)
    if refine and regions:
        tight = []
        for r in regions:
            ys, xs = np.nonzero(r.mask)
            dx, dy = 0.05 * (xs.max() - xs.min() + 1), 0.05 * (ys.max() - ys.min() + 1)
            tight.append([max(0, xs.min() - dx), max(0, ys.min() - dy), min(w - 1, xs.max() + dx),
                          min(h - 1, ys.max() + dy)])
        regions = run(np.asarray(tight), loose=False)
    return sorted(regions, key=lambda r: -r.area)


def match(a, b) -> float:
    """Mean over regions of ``a`` of the best IoU with a region of ``b`` (1.0 = same regions)."""
    if not a:
        return 1.0 if not b else 0.0
    out = []
    for r in a:
        out.append(max([float((r.mask & s.mask).sum() / max(1, (r.mask | s.mask).sum())) for s in b] or [0.0]))
    return round(float(np.mean(out)), 3)


def best_structures(regions, labels2d, names):
    """For each region, the reference structure it overlaps best and the Dice (what was found)."""
    out = []
    for r in regions:
        best = (0.0, "")
        for v in np.unique(labels2d[r.mask]):
            if v == 0:
                continue
            ref = labels2d == v
            best = max(best, (2 * (r.mask & ref).sum() / (r.mask.sum() + ref.sum()), names.get(int(v), str(v))))
        out.append({"area_px": r.area, "score": round(r.score, 3), "stability": round(r.stability, 3),
                    "structure": best[1], "dice": round(float(best[0]), 3)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=8, help="prompts per side")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.12, 0.25], help="box sides (box-only models)")
    parser.add_argument("--slices", type=int, default=2, help="slices timed (around the spleen's largest)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtime", default=None, help="backend runtime for the naive path: auto, eager, onnx")
    parser.add_argument("--zoom", type=float, default=1.0,
                        help="resample the slices in-plane by this factor (e.g. 4: a 404x488 slice, like a 512 CT)")
    parser.add_argument("--variants", nargs="+", default=["engine_default", "batched", "batch_size_1", "onnx_loop",
                                                          "naive"], help="which paths to time")
    args = parser.parse_args()

    import SimpleITK as sitk
    import torch

    torch.set_num_threads(args.threads)
    from SAMSegmentLib import sample_data
    from SAMSegmentLib.automatic import EverythingParams, everything_slice
    from SAMSegmentLib.backends import SamBackend
    from SAMSegmentLib.session import SegmentationSession
    from SAMSegmentLib.volume import SliceRef

    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.path(sample_data.IMAGE))))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.path(sample_data.LABELS))))
    names = {v: k for k, v in sample_data.label_values().items()}
    centre = int((lab == sample_data.label_values()["spleen"]).sum(axis=(1, 2)).argmax())
    indices = [centre + d for d in range(-(args.slices // 2), args.slices - args.slices // 2)]
    if args.zoom != 1.0:  # in-plane resampling: per-prompt full-resolution work grows with the slice size
        from scipy import ndimage

        vol = ndimage.zoom(vol.astype(np.float32), (1, args.zoom, args.zoom), order=1).round().astype(np.int16)
        lab = ndimage.zoom(lab, (1, args.zoom, args.zoom), order=0)
    params = EverythingParams(points_per_side=args.grid, box_scales=tuple(args.scales))
    backend = SamBackend.from_model_id("litemedsam", device="cpu", runtime=args.runtime)
    load_before = os.getloadavg()
    result: dict = {"model": backend.model_id, "image": sample_data.IMAGE, "slice_shape": list(vol.shape[1:]),
                    "zoom": args.zoom,
                    "slices": indices, "grid": f"{args.grid}x{args.grid}", "box_scales": args.scales,
                    "prompts_first_pass": args.grid * args.grid * len(args.scales), "batch_size": args.batch_size,
                    "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count()}
    with SegmentationSession(model=backend) as s:
        s.set_volume(vol)
        t = time.perf_counter()
        for i in indices:
            s.embedding(SliceRef(0, i))
        result["encode_s_per_slice"] = round((time.perf_counter() - t) / len(indices), 3)
        everything_slice(s, SliceRef(0, indices[0]), EverythingParams(points_per_side=2))  # warm-up
        s.decode(SliceRef(0, indices[0]), __import__("SAMSegmentLib").Prompts(box=[10, 10, 40, 40]))
        result["naive_decoder_runtime"] = backend.decoder_runtime
        def with_(**kw):
            return EverythingParams(points_per_side=args.grid, box_scales=tuple(args.scales), **kw)

        variants = {"engine_default": lambda ref: everything_slice(s, ref, with_()),
                    "batched": lambda ref: everything_slice(s, ref, with_(decoder="batched",
                                                                          batch_size=args.batch_size)),
                    "batch_size_1": lambda ref: everything_slice(s, ref, with_(decoder="batched", batch_size=1))}
        if backend.decoder_runtime == "onnx":
            variants["onnx_loop"] = lambda ref: everything_slice(s, ref, with_(decoder="loop"))
        if not args.no_naive:
            variants["naive"] = lambda ref: naive_everything(s, ref, params)
        variants = {k: v for k, v in variants.items() if k in args.variants}
        found = {}
        for name, fn in variants.items():
            t = time.perf_counter()
            found[name] = [fn(SliceRef(0, i)) for i in indices]
            result[f"{name}_s_per_slice"] = round((time.perf_counter() - t) / len(indices), 2)
        for name in variants:
            result[f"{name}_regions_per_slice"] = [len(r) for r in found[name]]

        def ratio(slow: str, fast: str) -> None:
            if slow in found and fast in found:
                result[f"speedup_{fast}_vs_{slow}"] = round(result[f"{slow}_s_per_slice"]
                                                            / result[f"{fast}_s_per_slice"], 2)

        ratio("naive", "batched")
        ratio("batch_size_1", "batched")
        ratio("naive", "engine_default")
        if "naive" in found and "engine_default" in found:
            result["naive_regions_matched_by_engine_iou"] = [match(a, b) for a, b in
                                                             zip(found["naive"], found["engine_default"])]
        result["engine_default_path"] = ("onnx" if backend.decoder_runtime == "onnx"
                                         else f"eager/{backend.eager_batch_size}")
        shown = "engine_default" if "engine_default" in found else next(iter(found))
        result["found_on_middle_slice"] = best_structures(found[shown][len(indices) // 2],
                                                          lab[indices[len(indices) // 2]], names)
    result["loadavg_1min_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
