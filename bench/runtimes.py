"""Eager PyTorch vs ONNX Runtime for LiteMedSAM, measured side by side in one run on the bundled
sample CT. Prints JSON:

- encoder seconds per slice (median of N, the two runtimes interleaved);
- prompt encoder + mask decoder ms p50/p95 (box and box+point prompts, interleaved);
- cached prompt -> mask latency through SegmentationSession (the session's default backend, i.e.
  the default runtime, against a session given an eager backend);
- agreement: max |logit| difference and mask Dice between the two runtimes, each running its own
  encoder and decoder in fp32, over reference-box prompts on up to 20 slices (several organs each),
  plus each runtime's Dice against the reference labels;
- one-time costs: exporting both graphs into an empty cache folder, and loading them from it.

Usage: python bench/runtimes.py [--encoder-runs 7] [--decoder-runs 60] [--session-prompts 40]
       [--slices 20] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings

import numpy as np

from SAMSegmentLib.metrics import dice

warnings.filterwarnings("ignore", category=FutureWarning)


def pct(values: list[float], q: float, scale: float = 1.0, digits: int = 1) -> float:
    return round(float(np.percentile(np.asarray(values), q)) * scale, digits)


def reference_prompts(lab: np.ndarray, names: dict[str, int], n_slices: int, per_slice: int = 3,
                      min_area: int = 60) -> list[tuple[int, str, np.ndarray]]:
    """(axial slice, organ, box) for the largest organs on ``n_slices`` evenly spread labelled slices."""
    by_value = {v: k for k, v in names.items()}
    candidates = []
    for k in range(lab.shape[0]):
        values, counts = np.unique(lab[k][lab[k] > 0], return_counts=True)
        organs = [(int(c), int(v)) for v, c in zip(values, counts) if c >= min_area and int(v) in by_value]
        if organs:
            candidates.append((k, sorted(organs, reverse=True)[:per_slice]))
    pick = np.unique(np.linspace(0, len(candidates) - 1, min(n_slices, len(candidates))).round().astype(int))
    prompts = []
    for i in pick:
        k, organs = candidates[i]
        for _, value in organs:
            ys, xs = np.nonzero(lab[k] == value)
            h, w = lab[k].shape
            box = np.array([max(xs.min() - 2.0, 0), max(ys.min() - 2.0, 0), min(xs.max() + 2.0, w - 1),
                            min(ys.max() + 2.0, h - 1)])
            prompts.append((int(k), by_value[value], box))
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder-runs", type=int, default=7)
    parser.add_argument("--decoder-runs", type=int, default=60)
    parser.add_argument("--session-prompts", type=int, default=40)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import SimpleITK as sitk
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from SAMSegmentLib import sample_data
    from SAMSegmentLib.backends import SamBackend
    from SAMSegmentLib.preprocessing import IntensityWindow
    from SAMSegmentLib.prompts import Prompts
    from SAMSegmentLib.session import SegmentationSession
    from SAMSegmentLib.volume import SliceRef

    import onnxruntime

    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.path(sample_data.IMAGE))))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.path(sample_data.LABELS))))
    names = sample_data.label_values()
    window = IntensityWindow.from_level_width(40, 400)
    windowed = window.apply(vol)
    report: dict = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "python": platform.python_version(), "torch": torch.__version__,
                                "onnxruntime": onnxruntime.__version__},
                    "model": "litemedsam", "volume": list(vol.shape)}

    # ------------------------------------------------------------------ one-time costs
    eager = SamBackend.from_model_id("litemedsam", device="cpu", runtime="eager")
    with tempfile.TemporaryDirectory() as empty:
        fresh = SamBackend.from_model_id("litemedsam", device="cpu", runtime="onnx", onnx_cache_dir=empty)
        t0 = time.perf_counter()
        fresh.prepare_runtime()
        export_s = time.perf_counter() - t0
        again = SamBackend.from_model_id("litemedsam", device="cpu", runtime="onnx", onnx_cache_dir=empty)
        t0 = time.perf_counter()
        info = again.prepare_runtime()
        load_s = time.perf_counter() - t0
    onnx = again  # sessions stay loaded after the folder is gone
    report["one_time"] = {"export_both_graphs_s": round(export_s, 2), "load_cached_graphs_s": round(load_s, 3),
                          "runtime": {k: info[k] for k in ("encoder", "decoder")}}

    # ------------------------------------------------------------------ encoder
    prompts = reference_prompts(lab, names, args.slices)
    k0 = max(set(p[0] for p in prompts), key=lambda k: int((lab[k] > 0).sum()))
    image = windowed[k0]
    for b in (eager, onnx):
        b.encode(image)  # warm-up
    enc = {"eager": [], "onnx": []}
    for _ in range(args.encoder_runs):
        for name, b in (("eager", eager), ("onnx", onnx)):
            t0 = time.perf_counter()
            b.encode(image)
            enc[name].append(time.perf_counter() - t0)
    report["encoder_s"] = {name: {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "n": len(v)}
                           for name, v in enc.items()}
    report["encoder_s"]["speedup_median"] = round(statistics.median(enc["eager"]) / statistics.median(enc["onnx"]), 2)

    # ------------------------------------------------------------------ decoder
    emb = eager.encode(image)
    geom = eager.geometry(*image.shape)
    boxes = [p[2] for p in prompts if p[0] == k0]
    rng = np.random.default_rng(0)
    dec = {"eager": [], "onnx": []}
    for i in range(args.decoder_runs + 5):
        box = boxes[i % len(boxes)]
        kwargs = {"box": box}
        if i % 2:
            cx, cy = (box[0] + box[2]) / 2 + rng.uniform(-2, 2), (box[1] + box[3]) / 2 + rng.uniform(-2, 2)
            kwargs.update(points=np.array([[cx, cy]]), labels=np.array([1]))
        for name, b in (("eager", eager), ("onnx", onnx)):
            t0 = time.perf_counter()
            out = b.decode(emb, geom, **kwargs)
            _ = out.logits > 0
            if i >= 5:
                dec[name].append(time.perf_counter() - t0)
    report["decoder_ms"] = {name: {"p50": pct(v, 50, 1000), "p95": pct(v, 95, 1000), "n": len(v)}
                            for name, v in dec.items()}
    report["decoder_ms"]["speedup_p50"] = round(statistics.median(dec["eager"]) / statistics.median(dec["onnx"]), 2)

    # ------------------------------------------------------------------ session, cached slice
    ref = SliceRef(0, k0)
    sess_ms = {}
    with SegmentationSession() as default_session, SegmentationSession(model=eager) as eager_session:
        default_info = default_session.backend.prepare_runtime()  # default cache dir: exported at most once
        for s in (default_session, eager_session):
            s.set_volume(vol, window=window)
            s.predict(ref, Prompts(box=boxes[0]), refine=False)  # encode + warm-up
        lat = {"default": [], "eager": []}
        for i in range(args.session_prompts):
            box = boxes[i % len(boxes)]
            p = Prompts(box=box)
            if i % 2:
                p = p.with_point((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, 1)
            for name, s in (("default", default_session), ("eager", eager_session)):
                t0 = time.perf_counter()
                s.predict(ref, p, refine=bool(i % 2))
                lat[name].append(time.perf_counter() - t0)
        sess_ms = {name: {"p50": pct(v, 50, 1000), "p95": pct(v, 95, 1000), "n": len(v)} for name, v in lat.items()}
        sess_ms["default_runtime"] = {"requested": default_info["requested"], "encoder": default_info["encoder"],
                                      "decoder": default_info["decoder"]}
        sess_ms["speedup_p50"] = round(statistics.median(lat["eager"]) / statistics.median(lat["default"]), 2)
    report["session_prompt_to_mask_ms"] = sess_ms

    # ------------------------------------------------------------------ agreement
    max_diff = 0.0
    dices, truth_dice = [], {"eager": [], "onnx": []}
    embeddings: dict[int, tuple] = {}
    for k, organ, box in prompts:
        if k not in embeddings:
            embeddings[k] = (eager.encode(windowed[k]), onnx.encode(windowed[k]))
        g = eager.geometry(*windowed[k].shape)
        a = eager.decode(embeddings[k][0], g, box=box)
        b = onnx.decode(embeddings[k][1], g, box=box)
        max_diff = max(max_diff, float(np.abs(a.logits - b.logits).max()))
        dices.append(dice(a.logits > 0, b.logits > 0))
        truth = lab[k] == names[organ]
        truth_dice["eager"].append(dice(a.logits > 0, truth))
        truth_dice["onnx"].append(dice(b.logits > 0, truth))
    report["agreement"] = {
        "slices": len(embeddings), "prompts": len(prompts), "max_abs_logit_diff": float(f"{max_diff:.3g}"),
        "dice_onnx_vs_eager": {"min": round(min(dices), 5), "mean": round(float(np.mean(dices)), 5)},
        "dice_vs_reference_mean": {k: round(float(np.mean(v)), 4) for k, v in truth_dice.items()},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
