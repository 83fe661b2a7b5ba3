"""Adaptation to accepted slices (issue 16): propagation from accepted slices, stock vs adapted decoder,
on the real sample scans, printed as JSON.

Usage: python bench/adapt.py [--data ../shared/data] [--cache-dir DIR] [--anchors 3 1] [--samples ct mr]
       [--structures colon ...] [--main-only | --held-out-only]

For every structure of ``bench/accuracy.py`` (the 11 "main" ones) and its 21 held-out ones, the
reference masks on the accepted slices are the anchors (what the user accepted): with ``--anchors 3``
the largest slice and the slices at 1/4 and 3/4 of the structure's extent, with ``--anchors 1`` the
largest slice alone. ``stock``: volume Dice of ``propagate`` from those anchors with the stock model;
``adapted``: the same after ``session.adapt`` (when the held-back check did not keep the adapter,
the stock model stays, so ``adapted`` is the stock figure again). Each row has the report: kept,
held-back Dice stock -> adapted, steps, seconds and seconds per step. ``summary`` gives, per anchor
count and group, the mean stock and adapted Dice, the worst change, and the adaptation times; and
``timing`` the cost of one training step and of decoding with the adapted decoder (eager PyTorch)
against the stock one (ONNX Runtime where available) on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import DEFAULTS, held_out_structures, load_sample  # noqa: E402

from SAMSegmentLib.adaptation import AdaptSettings  # noqa: E402
from SAMSegmentLib.metrics import dice  # noqa: E402
from SAMSegmentLib.preprocessing import mask_bbox  # noqa: E402
from SAMSegmentLib.propagation import propagate  # noqa: E402
from SAMSegmentLib.prompts import Prompts  # noqa: E402
from SAMSegmentLib.session import SegmentationSession  # noqa: E402
from SAMSegmentLib.volume import SliceRef  # noqa: E402


def accepted_slices(ref3: np.ndarray, count: int) -> list[int]:
    """The largest slice, and with ``count`` 3 the slices at 1/4 and 3/4 of the structure's extent."""
    present = np.nonzero(ref3.any(axis=(1, 2)))[0]
    largest = int(ref3.sum(axis=(1, 2)).argmax())
    if count == 1:
        return [largest]
    n = len(present) - 1
    return sorted({largest, int(present[int(round(0.25 * n))]), int(present[int(round(0.75 * n))])})


def run_structure(session: SegmentationSession, labels: np.ndarray, value: int, count: int,
                  settings: AdaptSettings, structure: str) -> dict:
    ref3 = labels == value
    slices = accepted_slices(ref3, count)
    anchors = {k: ref3[k] for k in slices}
    session.use_stock_model()
    stock = dice(propagate(session, 0, anchors).to_volume(labels.shape, anchors), ref3)
    report = session.adapt(0, anchors, structure, settings)
    adapted = dice(propagate(session, 0, anchors).to_volume(labels.shape, anchors), ref3) if report.kept else stock
    session.use_stock_model()
    return {"structure": structure, "accepted": slices, "stock": round(stock, 4), "adapted": round(adapted, 4),
            "change": round(adapted - stock, 4), "kept": report.kept, "held_back": report.held_back,
            "held_back_dice": [report.held_back_dice_stock, report.held_back_dice_adapted], "steps": report.steps,
            "seconds": report.seconds, "seconds_per_step": report.seconds_per_step,
            "prompts_per_step": report.prompts_per_step}


def decode_timing(session: SegmentationSession, labels: np.ndarray, value: int, settings: AdaptSettings) -> dict:
    """Seconds per box decode on one slice: stock decoder (its runtime) vs the adapted one (eager)."""
    ref3 = labels == value
    k = int(ref3.sum(axis=(1, 2)).argmax())
    ref, box = SliceRef(0, k), Prompts(box=mask_bbox(ref3[k]))

    def per_decode(n: int = 20) -> float:
        session.decode(ref, box)
        t0 = time.perf_counter()
        for _ in range(n):
            session.decode(ref, box)
        return (time.perf_counter() - t0) / n

    session.use_stock_model()
    stock = per_decode()
    session.adapt(0, {k: ref3[k]}, "timing", AdaptSettings(check_steps=1, final_steps=0, min_gain=-1.0,
                                                           mirror_min_gain=-1.0))
    adapted = per_decode()
    session.use_stock_model()
    return {"decoder_runtime_stock": session.backend.runtime_info().get("decoder"), "decode_s_stock": round(stock, 4),
            "decode_s_adapted_eager": round(adapted, 4), "adapted_over_stock": round(adapted / stock, 2),
            "encoder_forward_backward_s": round(encoder_backward_seconds(session, ref), 3)}


def encoder_backward_seconds(session: SegmentationSession, ref: SliceRef, repeats: int = 3) -> float:
    """What training the image encoder would cost: one forward + backward pass of it on one slice
    (adaptation keeps it frozen and never pays this)."""
    import torch

    backend = session.backend
    image = backend.prepare_image(session.slice_image(ref)).to(backend.device)
    encoder = backend.net.image_encoder
    flags = [p.requires_grad for p in encoder.parameters()]
    times = []
    try:
        encoder.requires_grad_(True)
        with torch.enable_grad():
            for _ in range(repeats):
                t0 = time.perf_counter()
                encoder(image).float().mean().backward()
                times.append(time.perf_counter() - t0)
    finally:
        encoder.zero_grad(set_to_none=True)
        for p, flag in zip(encoder.parameters(), flags):
            p.requires_grad_(flag)
    return float(np.median(times))


def summarise(rows: list[dict]) -> dict:
    if not rows:
        return {}
    change = np.array([r["change"] for r in rows])
    seconds = np.array([r["seconds"] for r in rows])
    return {"structures": len(rows), "mean_stock": round(float(np.mean([r["stock"] for r in rows])), 4),
            "mean_adapted": round(float(np.mean([r["adapted"] for r in rows])), 4),
            "kept": int(sum(r["kept"] for r in rows)), "better": int((change > 0.005).sum()),
            "worse_by_more_than_0.005": int((change < -0.005).sum()), "worst_change": round(float(change.min()), 4),
            "seconds_mean": round(float(seconds.mean()), 2), "seconds_max": round(float(seconds.max()), 2),
            "seconds_per_step_mean": round(float(np.mean([r["seconds_per_step"] for r in rows])), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--cache-dir", default=None, help="disk tier of the embedding cache, one sub-folder per sample")
    parser.add_argument("--anchors", type=int, nargs="+", default=[3, 1], choices=[1, 3])
    parser.add_argument("--samples", nargs="+", default=None, help="sample folders (or their prefix: ct, mr)")
    parser.add_argument("--structures", nargs="+", default=None, help="only these structures")
    parser.add_argument("--check-steps", type=int, default=None, help="AdaptSettings.check_steps (default: the engine's)")
    parser.add_argument("--final-steps", type=int, default=None, help="AdaptSettings.final_steps (default: the engine's)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--main-only", action="store_true")
    group.add_argument("--held-out-only", action="store_true")
    args = parser.parse_args()
    overrides = {k: v for k, v in (("check_steps", args.check_steps), ("final_steps", args.final_steps)) if v is not None}
    settings = AdaptSettings(**overrides)
    report: dict = {"model": args.model, "settings": settings.__dict__, "rows": [], "summary": {}}
    timing_done = False
    for name, tuned in DEFAULTS.items():
        if args.samples and not any(name.startswith(p) for p in args.samples):
            continue
        sample = load_sample(args.data, name)
        if sample is None:
            continue
        volume, labels, values = sample
        groups = {"main": {s: values[s] for s in tuned}, "held_out": held_out_structures(labels, values, tuned)}
        if args.main_only:
            groups.pop("held_out")
        if args.held_out_only:
            groups.pop("main")
        cache_dir = None if args.cache_dir is None else Path(args.cache_dir) / name
        with SegmentationSession(model=args.model, cache_dir=cache_dir, cache_bytes=4 << 30) as session:
            session.set_volume(volume)
            session.encode_slices([SliceRef(0, k) for k in range(volume.shape[0])])  # adaptation timing without encodes
            if not timing_done:
                report["timing"] = decode_timing(session, labels, values[tuned[0]], settings)
                print(f"timing {report['timing']}", file=sys.stderr)
                timing_done = True
            for group, structures in groups.items():
                for structure, value in structures.items():
                    if args.structures and structure not in args.structures:
                        continue
                    for count in args.anchors:
                        row = {"sample": name, "group": group, "anchors": count,
                               **run_structure(session, labels, value, count, settings, structure)}
                        report["rows"].append(row)
                        print(json.dumps(row), file=sys.stderr)
    for count in args.anchors:
        for group in ("held_out", "main"):
            sel = [r for r in report["rows"] if r["anchors"] == count and r["group"] == group]
            if sel:
                report["summary"][f"{group}_{count}_accepted"] = summarise(sel)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
