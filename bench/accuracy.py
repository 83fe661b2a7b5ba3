"""Volume Dice on the real sample scans: one box + propagation vs the oracle (reference box on
every slice), printed as JSON.

Usage: python bench/accuracy.py [--data ../shared/data] [--cache-dir DIR] [--held-out] [--stride 1 2 3] [--quick]
       [--samples ct mr] [--structures liver spleen] [--boxes] [--padding-offsets -0.5 0.5] [--per-slice]
The box on the anchor slice is the reference mask's bounding box on the structure's largest
axial slice (what a user would drag); everything after that uses only the model's own output.
``dice`` is the default path (``predict`` adds the model's box margin to that tight box);
``dice_box_as_drawn`` decodes the tight box itself (margin 0), for comparison. The oracle takes
the reference box on every slice, with the margin (``oracle_dice``) and without.

``--stride N`` takes every Nth slice of the samples (from slice 0), to mimic 6 / 9 mm slices; several
strides run in one go. Every row also has ``box3d_dice``: the reference mask's 3D bounding box as the
one prompt, its in-plane box drawn on the one-box slice (``propagate(..., boxes={k: plane box},
bounds=Box3D)``: the ROI placed on the slice the user looks at, propagation kept inside the box);
``box3d_middle_seed_dice``: the same box seeding its middle slice (``propagate(..., bounds=Box3D)``
alone, the engine's default); the voxels either wrote outside the box (``box3d_voxels_outside``, must be 0);
``slices_outside_reference``: per end (below, above), the slices past the reference's first and
last slice that got a mask with one box. ``--boxes`` adds ``boxes3_dice``: the reference boxes on
the largest slice and on the slices at 20 % and 80 % of the structure's extent, as drawn boxes
(``propagate(..., boxes=...)``). ``--quick`` leaves out the fixed-policy, as-drawn and
oracle-as-drawn columns. ``summary`` lists one box / 3D box / oracle per stride and structure.

``--padding-offsets -0.5 0.5`` adds ``padding_offsets``: one box and 3D box again with the default policy's
tight and loose paddings both moved by each offset (px), and the oracle again with every reference box
grown by the offset on each side (before the margin; a box the shrink would close stays as drawn); in
``summary`` the range of each over the offsets and the default: how much of a difference between two
figures half a pixel of box already makes, the oracle's own included.

``--per-slice`` adds ``per_slice``: for every slice that the reference, one box, the 3D box or the oracle
covers, the reference's area and each one's area, Dice on that slice and (one box, 3D box) the prompt that
decided it: where on the structure a difference between two volume figures comes from.

``--held-out`` adds, at every stride given, every other labelled structure of the two samples that
spans >= 4 slices and >= 100 px on its largest one: the default prompt policy against its loose
(+3 px) and tight (+2 px) boxes alone, from the widened and from the as-drawn anchor; and the 3D box
(``anchor`` "box3d") with the default policy against the same without the rules for the structure's
tip at the box's end (``box_end_tip``, ``box_end_tip_below``). The policy's thresholds were chosen on
the structures above, so this is the check on structures it was not tuned on; ``held_out_summary``
has it per stride.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", category=FutureWarning)

from SAMSegmentLib import io as sio  # noqa: E402
from SAMSegmentLib.box3d import Box3D  # noqa: E402
from SAMSegmentLib.metrics import dice  # noqa: E402
from SAMSegmentLib.preprocessing import mask_bbox  # noqa: E402
from SAMSegmentLib.propagation import PromptPolicy, propagate  # noqa: E402
from SAMSegmentLib.prompts import Prompts  # noqa: E402
from SAMSegmentLib.session import SegmentationSession  # noqa: E402
from SAMSegmentLib.volume import SliceRef  # noqa: E402

DEFAULTS = {"ct-abdomen-3mm": ["spleen", "liver", "kidney_left", "kidney_right", "stomach", "aorta"],
            "mr-abdomen-3mm": ["liver", "spleen", "aorta", "kidney_left", "kidney_right"]}
TARGETS = {("ct-abdomen-3mm", "spleen"): 0.96, ("ct-abdomen-3mm", "liver"): 0.93,
           ("ct-abdomen-3mm", "kidney_left"): 0.94}
# Fixed prompt rules for comparison (the default PromptPolicy is what "dice" reports: a tight
# box where the anchor test and the running comparison allow it, else the loose box alone, which
# "dice_loose_box_only" reports).
LOOSE_ONLY = PromptPolicy(paddings=((PromptPolicy.safe_padding, 0.0),))
TIGHT_ONLY = PromptPolicy(paddings=((PromptPolicy.tight_padding, 0.0),))
FIXED = {"dice_loose_box_only": LOOSE_ONLY,
         "dice_fixed_3px": PromptPolicy(paddings=((3.0, 0.0),), mask_threshold=0.0),
         "dice_fixed_10pct": PromptPolicy(paddings=((0.0, 0.10),), mask_threshold=0.0)}


def outside_reference(written: list[int], ref3: np.ndarray) -> list[int]:
    """(below, above): how many of the ``written`` slices lie past the reference's first / last slice."""
    present = np.nonzero(ref3.any(axis=(1, 2)))[0]
    return [int(sum(i < present[0] for i in written)), int(sum(i > present[-1] for i in written))]


def shifted_policy(offset: float) -> PromptPolicy:
    """The default policy with its tight and loose paddings both moved by ``offset`` px."""
    policy = PromptPolicy()
    return dataclasses.replace(policy, tight_padding=policy.tight_padding + offset,
                               safe_padding=policy.safe_padding + offset)


def oracle_volume(session: SegmentationSession, ref3: np.ndarray, grow: float = 0.0, as_drawn: bool = False) -> np.ndarray:
    """The oracle: each slice of ``ref3`` (a reference mask, axis 0 first) decoded from its own reference
    box, grown by ``grow`` px on each side (negative: shrunk; a box the shrink would narrow to under one
    pixel is left as drawn), with the model's margin (``predict``), or as drawn (``as_drawn``: no margin)."""
    out = np.zeros_like(ref3)
    for i in np.nonzero(ref3.any(axis=(1, 2)))[0]:
        drawn = mask_bbox(ref3[i]).astype(float)
        grown = drawn + np.array([-grow, -grow, grow, grow])
        if grown[2] - grown[0] < 1 or grown[3] - grown[1] < 1:
            grown = drawn
        ref, box = SliceRef(0, int(i)), Prompts(box=grown)
        out[i] = (session.decode(ref, box) if as_drawn else session.predict(ref, box, refine=False)).mask
    return out


def per_slice(ref3: np.ndarray, volumes: dict[str, np.ndarray], decided_by: dict[str, dict[int, str]]) -> list[dict]:
    """One entry per slice that ``ref3`` or any of ``volumes`` covers: the slice, the reference's area and,
    per volume name, [area, Dice on that slice] and the prompt that decided the slice (``decided_by[name]``,
    slice -> candidate name) where it has one."""
    rows = []
    for i in range(ref3.shape[0]):
        if not (ref3[i].any() or any(v[i].any() for v in volumes.values())):
            continue
        row: dict = {"slice": i, "reference": int(np.count_nonzero(ref3[i]))}
        for name, volume in volumes.items():
            row[name] = [int(np.count_nonzero(volume[i])), round(dice(volume[i], ref3[i]), 3)]
            if i in decided_by.get(name, {}):
                row[name].append(decided_by[name][i])
        rows.append(row)
    return rows


def evaluate(session: SegmentationSession, labels: np.ndarray, value: int, quick: bool = False,
             boxes3: bool = False, padding_offsets: tuple[float, ...] = (), slices: bool = False) -> dict:
    ref3 = labels == value
    if not ref3.any():
        return {"absent": True}
    k = int(ref3.sum(axis=(1, 2)).argmax())
    t0 = time.perf_counter()
    calls_before = session.encode_count
    anchor = session.predict(SliceRef(0, k), Prompts(box=mask_bbox(ref3[k]))).mask
    result = propagate(session, 0, {k: anchor})
    seg = result.to_volume(labels.shape, {k: anchor})
    seconds = time.perf_counter() - t0
    fixed = {}
    if not quick:
        drawn = session.decode(SliceRef(0, k), Prompts(box=mask_bbox(ref3[k]))).mask  # no margin
        as_drawn = propagate(session, 0, {k: drawn}).to_volume(labels.shape, {k: drawn})
        fixed = {"dice_box_as_drawn": round(dice(as_drawn, ref3), 4),
                 "anchor_dice_box_as_drawn": round(dice(drawn, ref3[k]), 4)}
        for key, policy in FIXED.items():
            other = propagate(session, 0, {k: anchor}, policy=policy)
            fixed[key] = round(dice(other.to_volume(labels.shape, {k: anchor}), ref3), 4)
    bounds = Box3D.from_mask(ref3)
    box3d = propagate(session, 0, boxes={k: bounds.plane_box(0)}, bounds=bounds)  # drawn on the one-box slice
    seg3 = box3d.to_volume(labels.shape)
    middle = propagate(session, 0, bounds=bounds).to_volume(labels.shape)  # the engine's default seed
    outside = ~bounds.mask(labels.shape)
    extra: dict = {"box3d_dice": round(dice(seg3, ref3), 4), "box3d_middle_seed_dice": round(dice(middle, ref3), 4),
                   "box3d_voxels_outside": int(np.count_nonzero(seg3 & outside) + np.count_nonzero(middle & outside)),
                   "box3d_stops": [[s.direction, s.last_index, s.reason.name] for s in box3d.stops]}
    if boxes3:
        present = np.nonzero(ref3.any(axis=(1, 2)))[0]
        picks = sorted({k, int(present[int(0.2 * (len(present) - 1))]), int(present[int(round(0.8 * (len(present) - 1)))])})
        boxes = {i: mask_bbox(ref3[i]) for i in picks}
        extra["boxes3_dice"] = round(dice(propagate(session, 0, boxes=boxes).to_volume(labels.shape), ref3), 4)
        extra["boxes3_slices"] = picks
    if padding_offsets:
        shifted = extra["padding_offsets"] = {}
        for offset in padding_offsets:
            policy = shifted_policy(offset)
            one = propagate(session, 0, {k: anchor}, policy=policy).to_volume(labels.shape, {k: anchor})
            in_box = propagate(session, 0, boxes={k: bounds.plane_box(0)}, bounds=bounds, policy=policy)
            shifted[f"{offset:+g}px"] = {"dice": round(dice(one, ref3), 4),
                                         "box3d_dice": round(dice(in_box.to_volume(labels.shape), ref3), 4),
                                         "oracle_dice": round(dice(oracle_volume(session, ref3, offset), ref3), 4)}
    oracle = oracle_volume(session, ref3)
    if not quick:
        extra["oracle_dice_box_as_drawn"] = round(dice(oracle_volume(session, ref3, as_drawn=True), ref3), 4)
    if slices:
        decided_by = {"one_box": {k: "anchor", **{i: o.candidate for i, o in result.outcomes.items()}},
                      "box3d": {i: o.candidate for i, o in box3d.outcomes.items()}}
        extra["per_slice"] = per_slice(ref3, {"one_box": seg, "box3d": seg3, "oracle": oracle}, decided_by)
    switched = sorted(i for i, o in result.outcomes.items() if "shrank" in o.candidate)
    return {"dice": round(dice(seg, ref3), 4), "anchor_stability": round(result.anchor_stability[k], 4),
            "tight_box_leads": result.anchor_stability[k] >= PromptPolicy.min_stable_area_ratio,
            "switched_to_loose_at": switched, **fixed, **extra, "oracle_dice": round(dice(oracle, ref3), 4),
            "anchor_dice": round(dice(anchor, ref3[k]), 4),
            "anchor_slice": k, "slices_written": len(result.masks) + 1,
            "reference_slices": int(ref3.any(axis=(1, 2)).sum()),
            "slices_outside_reference": outside_reference(sorted(result.masks), ref3),
            "stops": [[s.direction, s.last_index, s.reason.name] for s in result.stops],
            "seconds": round(seconds, 2), "encodes": session.encode_count - calls_before}


HELD_OUT_POLICIES = {"default": PromptPolicy(), "loose_box_only": LOOSE_ONLY, "tight_box_only": TIGHT_ONLY}
HELD_OUT_BOX3D_POLICIES = {"default": PromptPolicy(), "without_box_end_tip": PromptPolicy(box_end_tip=False, box_end_tip_below=0.0)}


def padding_ranges(row: dict) -> dict:
    """``summary``'s ranges from an ``evaluate`` row with ``padding_offsets``: [min, max] of the one-box, the
    3D-box and the oracle's Dice over the default paddings and the moved ones (empty without offsets)."""
    shifted = row.get("padding_offsets")
    if not shifted:
        return {}
    ranges = {}
    for name, key in (("one_box", "dice"), ("box3d", "box3d_dice"), ("oracle", "oracle_dice")):
        values = [row[key]] + [v[key] for v in shifted.values()]
        ranges[f"{name}_padding_range"] = [min(values), max(values)]
    return ranges


def held_out_structures(labels: np.ndarray, names: dict[str, int], tuned: list[str]) -> dict[str, int]:
    """The labelled structures not in ``tuned`` that span >= 4 slices and >= 100 px on their largest one."""
    out = {}
    for structure, value in names.items():
        areas = (labels == value).sum(axis=(1, 2))
        if structure not in tuned and np.count_nonzero(areas) >= 4 and areas.max() >= 100:
            out[structure] = value
    return out


def held_out(session: SegmentationSession, labels: np.ndarray, names: dict[str, int], tuned: list[str]) -> list[dict]:
    rows = []
    for structure, value in held_out_structures(labels, names, tuned).items():
        ref3 = labels == value
        k = int(ref3.sum(axis=(1, 2)).argmax())
        box = Prompts(box=mask_bbox(ref3[k]))
        anchors = {"widened": session.predict(SliceRef(0, k), box).mask, "as_drawn": session.decode(SliceRef(0, k), box).mask}
        for anchor_kind, anchor in anchors.items():
            row: dict = {"structure": structure, "anchor": anchor_kind}
            for key, policy in HELD_OUT_POLICIES.items():
                result = propagate(session, 0, {k: anchor}, policy=policy)
                row[key] = round(dice(result.to_volume(labels.shape, {k: anchor}), ref3), 4)
            rows.append(row)
            print(f"held out: {row}", file=sys.stderr)
        bounds = Box3D.from_mask(ref3)
        row = {"structure": structure, "anchor": "box3d"}
        for key, policy in HELD_OUT_BOX3D_POLICIES.items():
            result = propagate(session, 0, boxes={k: bounds.plane_box(0)}, bounds=bounds, policy=policy)
            row[key] = round(dice(result.to_volume(labels.shape), ref3), 4)
        rows.append(row)
        print(f"held out: {row}", file=sys.stderr)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per anchor kind: the held-out structures' mean Dice per policy, and how many the default policy
    does better / worse (by > 0.002) than the one it is compared with (loose box alone; for the 3D box,
    without the box-end tip)."""
    out = {}
    for anchor_kind, policies, other in (("widened", HELD_OUT_POLICIES, "loose_box_only"),
                                         ("as_drawn", HELD_OUT_POLICIES, "loose_box_only"),
                                         ("box3d", HELD_OUT_BOX3D_POLICIES, "without_box_end_tip")):
        sel = [r for r in rows if r["anchor"] == anchor_kind]
        if not sel:
            continue
        diff = np.array([r["default"] - r[other] for r in sel])
        out[anchor_kind] = {"structures": len(sel),
                            "mean_dice": {k: round(float(np.mean([r[k] for r in sel])), 4) for k in policies},
                            f"default_vs_{other}": {"better": int((diff > 0.002).sum()), "worse": int((diff < -0.002).sum()),
                                                    "worst": round(float(diff.min()), 4), "best": round(float(diff.max()), 4)}}
    return out


def load_sample(data: str | Path, name: str) -> tuple[np.ndarray, np.ndarray, dict[str, int]] | None:
    """(volume, label map, label value by structure name) of the shared sample ``name``; None (said on
    stderr) when it is not there."""
    folder = Path(data) / name
    if not folder.exists():
        print(f"skipping {folder}: not found", file=sys.stderr)
        return None
    volume, _ = sio.read_volume(folder / "image.nii.gz")
    labels, _ = sio.read_volume(folder / "labels.nii.gz")
    return volume, labels, {v: int(k) for k, v in json.loads((folder / "labels.json").read_text()).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--cache-dir", default=None, help="disk tier of the embedding cache, reused across runs; "
                        "'{dataset}' in it is replaced by the sample's name, else one sub-folder per sample")
    parser.add_argument("--held-out", action="store_true", help="also every other labelled structure (see above; "
                        "at every stride given)")
    parser.add_argument("--stride", type=int, nargs="+", default=[1], help="take every Nth slice (default 1)")
    parser.add_argument("--quick", action="store_true", help="leave out the fixed-policy and as-drawn columns")
    parser.add_argument("--boxes", action="store_true", help="also three drawn boxes (boxes3_dice)")
    parser.add_argument("--samples", nargs="+", default=None, help="sample folders (or their prefix: ct, mr)")
    parser.add_argument("--structures", nargs="+", default=None, help="only these structures")
    parser.add_argument("--padding-offsets", type=float, nargs="+", default=(), help="also one box and 3D box with "
                        "the default policy's paddings moved by each of these px, and the oracle with every reference "
                        "box grown by them (padding_offsets)")
    parser.add_argument("--per-slice", action="store_true", help="also per_slice: every slice's area and Dice "
                        "(one box, 3D box, oracle) and the prompt that decided it")
    args = parser.parse_args()
    report: dict = {"model": args.model, "strides": args.stride, "datasets": {}, "summary": []}
    held_rows: dict[int, list[dict]] = {stride: [] for stride in args.stride}
    for name, structures in DEFAULTS.items():
        if args.samples and not any(name.startswith(p) for p in args.samples):
            continue
        structures = [s for s in structures if not args.structures or s in args.structures]
        sample = load_sample(args.data, name)
        if sample is None:
            continue
        full, full_labels, values = sample
        for stride in args.stride:
            cache_dir = None
            if args.cache_dir is not None:  # a disk cache holds one volume: one per sample and stride
                cache_dir = Path(args.cache_dir.format(dataset=name)) if "{dataset}" in args.cache_dir \
                    else Path(args.cache_dir) / name
                cache_dir = cache_dir if stride == 1 else cache_dir / f"stride{stride}"
            with SegmentationSession(model=args.model, cache_dir=cache_dir, cache_bytes=4 << 30) as session:
                vol, labels = np.ascontiguousarray(full[::stride]), np.ascontiguousarray(full_labels[::stride])
                session.set_volume(vol)
                key = name if stride == 1 else f"{name}@stride{stride}"
                rows = {}
                for structure in structures:
                    row = evaluate(session, labels, values[structure], quick=args.quick, boxes3=args.boxes,
                                   padding_offsets=tuple(args.padding_offsets), slices=args.per_slice)
                    target = TARGETS.get((name, structure))
                    if target is not None and stride == 1:
                        row["target"] = target
                        row["meets_target"] = row["dice"] >= target
                    rows[structure] = row
                    if not row.get("absent"):
                        report["summary"].append({"sample": name, "stride": stride, "structure": structure,
                                                  "one_box": row["dice"], "box3d": row["box3d_dice"],
                                                  "box3d_middle_seed": row["box3d_middle_seed_dice"],
                                                  "oracle": row["oracle_dice"],
                                                  **({"boxes3": row["boxes3_dice"]} if "boxes3_dice" in row else {}),
                                                  **padding_ranges(row),
                                                  "outside": row["slices_outside_reference"]})
                        print(f"SUMMARY {report['summary'][-1]}", file=sys.stderr)
                    print(f"{key} {structure}: {row}", file=sys.stderr)
                report["datasets"][key] = {"window": [session.window.low, session.window.high, session.window.source],
                                           "structures": rows}
                if args.held_out:
                    extra = held_out(session, labels, values, DEFAULTS[name])
                    report["datasets"][key]["held_out"] = extra
                    held_rows[stride] += [{**r, "sample": name} for r in extra]
    if args.held_out:
        report["held_out_summary"] = {f"stride{stride}": summarise(rows) for stride, rows in held_rows.items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
