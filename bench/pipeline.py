"""The interactive pipeline end to end, each figure beside the naive path, measured in one run on
a realistic volume. Prints JSON.

Volume: the sample abdominal CT (../shared/data/ct-abdomen-3mm, 30 x 101 x 122, 3 mm) resampled
(trilinear; labels nearest) to 200 x 512 x 512, the size of a clinical abdominal CT series.

- prompt -> mask through SegmentationSession, p50/p95: cached slice and uncached slice (encode +
  decode), eager PyTorch vs ONNX Runtime, and the naive path that re-encodes on every prompt;
- time to first mask after loading the volume: ours (set_volume + encode only the clicked slice +
  decode) vs "encode every slice first" (as peers do), the latter extrapolated from the measured
  per-slice encoder cost x 200 (marked so in the JSON: nobody waits 3+ minutes in a benchmark);
- propagation seconds per slice over 50 slices of liver, starting from an empty embedding cache:
  pipelined (encode n+1 while n is decoded) vs not, eager vs ONNX; masks compared for identity; and
  ONNX pipelined without the second look from both neighbours (``PromptPolicy(neighbour_check=False)``),
  its cost per slice;
- embedding cache MiB after propagation;
- encoder variants on real slices: ONNX Runtime, bf16 autocast, torch.compile (fp32 and bf16):
  seconds per slice and mask Dice vs eager fp32 on reference-box prompts; the JSON says whether
  each qualifies for runtime "auto" (Dice drop <= 0.005 AND faster than the current default).

Usage: python bench/pipeline.py [--prop-slices 50] [--cached 30] [--uncached 5] [--dice-slices 6]
       [--no-compile] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from SAMSegmentLib.metrics import dice
from SAMSegmentLib.preprocessing import clip_box, mask_bbox

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

DATA = Path(os.environ.get("SAMSEGMENT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TARGETS = {"cached_p50_ms": 35, "uncached_p50_ms": 550, "first_mask_s": 1.0, "propagation_s_per_slice": 0.5,
           "auto_variant_max_dice_drop": 0.005}


def pct(values: list[float], q: float, scale: float = 1000.0, digits: int = 1) -> float:
    return round(float(np.percentile(np.asarray(values), q)) * scale, digits)


def box_of(mask: np.ndarray, pad: float = 2.0) -> np.ndarray:
    """The mask's bounding box widened by ``pad`` px on each side, clipped to the slice."""
    return clip_box(mask_bbox(mask) + np.array([-pad, -pad, pad, pad]), *mask.shape)


def realistic_volume(slices: int = 200, size: int = 512) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(int16 HU volume, labels, name -> label value): the sample CT resampled to slices x size x size."""
    import SimpleITK as sitk
    from scipy import ndimage

    folder = DATA / "ct-abdomen-3mm"
    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "image.nii.gz"))).astype(np.float32)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels.nii.gz")))
    names = {v: int(k) for k, v in json.loads((folder / "labels.json").read_text()).items()}
    zoom = (slices / vol.shape[0], size / vol.shape[1], size / vol.shape[2])
    big = ndimage.zoom(vol, zoom, order=1, prefilter=False).round().astype(np.int16)
    big_lab = ndimage.zoom(lab, zoom, order=0, prefilter=False)
    return big, big_lab, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cached", type=int, default=30, help="prompts timed on a cached slice, per runtime")
    parser.add_argument("--uncached", type=int, default=5, help="prompts on fresh slices, per runtime")
    parser.add_argument("--naive", type=int, default=3, help="prompts timed with a re-encode each, per runtime")
    parser.add_argument("--prop-slices", type=int, default=50)
    parser.add_argument("--dice-slices", type=int, default=6)
    parser.add_argument("--variant-runs", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its first compile is slow)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    from SAMSegmentLib.backends import SamBackend
    from SAMSegmentLib.preprocessing import IntensityWindow
    from SAMSegmentLib.propagation import PromptPolicy, StopRules, propagate
    from SAMSegmentLib.prompts import Prompts
    from SAMSegmentLib.runtimes import requested_runtime
    from SAMSegmentLib.session import SegmentationSession
    from SAMSegmentLib.volume import SliceRef

    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "load_average_at_start": os.getloadavg()[0]},
        "model": "litemedsam", "targets": TARGETS}
    t0 = time.perf_counter()
    vol, lab, names = realistic_volume(args.slices, args.size)
    liver = lab == names["liver"]
    report["volume"] = {"shape": list(vol.shape), "source": "ct-abdomen-3mm resampled (trilinear)",
                        "resample_s": round(time.perf_counter() - t0, 1)}
    window = IntensityWindow.from_level_width(40, 400)
    windowed = window.apply(vol)
    areas = liver.reshape(liver.shape[0], -1).sum(1)
    k0 = int(np.argmax(areas))

    # ------------------------------------------------------------------ backends (one-time costs)
    backends: dict[str, Any] = {}
    one_time: dict[str, Any] = {"default_runtime_requested": requested_runtime(None)}
    for name in ("eager", "onnx"):
        t0 = time.perf_counter()
        b = SamBackend.from_model_id("litemedsam", device="cpu", runtime=name)
        t1 = time.perf_counter()
        info = b.prepare_runtime()
        one_time[name] = {"load_model_s": round(t1 - t0, 2), "prepare_runtime_s": round(time.perf_counter() - t1, 2),
                          "encoder": info["encoder"], "decoder": info["decoder"],
                          "exported_now": bool(info.get("encoder_exported_now") or info.get("decoder_exported_now"))}
        backends[name] = b
    default_info = SamBackend.from_model_id("litemedsam", device="cpu").runtime_info()
    one_time["default_resolves_to"] = {"encoder": default_info["encoder"], "decoder": default_info["decoder"]}
    report["one_time"] = one_time

    rng = np.random.default_rng(0)
    base_box = box_of(liver[k0])

    def jittered(i: int) -> Prompts:
        box = base_box + rng.uniform(-4, 4, 4)
        p = Prompts(box=box)
        if i % 2:
            ys, xs = np.nonzero(liver[k0])
            j = rng.integers(len(xs))
            p = p.with_point(float(xs[j]), float(ys[j]), 1)
        return p

    # ------------------------------------------------------------------ prompt -> mask
    latency: dict[str, Any] = {}
    per_slice_encode: dict[str, float] = {}
    for name, b in backends.items():
        with SegmentationSession(model=b) as s:
            s.set_volume(vol, window=window)
            ref = SliceRef(0, k0)
            s.predict(ref, jittered(0), refine=False)
            for i in range(3):
                s.predict(ref, jittered(i), refine=False)  # warm-up
            cached = []
            for i in range(args.cached):
                p = jittered(i)
                t0 = time.perf_counter()
                s.predict(ref, p, refine=False)
                cached.append(time.perf_counter() - t0)
            uncached, encodes = [], []
            offsets = [d * sign for d in range(7, 7 * (args.uncached + 2), 7) for sign in (1, -1)]
            fresh = [k0 + d for d in offsets if 0 <= k0 + d < len(areas) and areas[k0 + d] > 0][:args.uncached]
            for k in fresh:
                p = Prompts(box=box_of(liver[k]))
                n_before = s.encode_count
                t0 = time.perf_counter()
                s.predict(SliceRef(0, k), p, refine=False)
                uncached.append(time.perf_counter() - t0)
                assert s.encode_count == n_before + 1
            naive = []
            image, geom = s.slice_image(ref), s.geometry(ref)
            for i in range(args.naive):
                p = jittered(i)
                t0 = time.perf_counter()
                t_enc = time.perf_counter()
                emb = b.encode(image)  # the naive path: encode again for every prompt
                encodes.append(time.perf_counter() - t_enc)
                out = b.decode(emb, geom, p.points if len(p.points) else None, p.labels, p.box)
                _ = out.logits > 0
                naive.append(time.perf_counter() - t0)
        per_slice_encode[name] = statistics.median(encodes)
        latency[name] = {"cached_ms": {"p50": pct(cached, 50), "p95": pct(cached, 95), "n": len(cached)},
                         "uncached_ms": {"p50": pct(uncached, 50), "p95": pct(uncached, 95), "n": len(uncached)},
                         "naive_reencode_every_prompt_ms": {"p50": pct(naive, 50), "p95": pct(naive, 95),
                                                            "n": len(naive)},
                         "encoder_s_median": round(per_slice_encode[name], 3),
                         "speedup_cached_vs_naive_p50": round(statistics.median(naive) / statistics.median(cached), 1)}
    report["prompt_to_mask"] = latency
    report["encoder_compute"] = encoder_compute(backends["eager"], per_slice_encode)

    # ------------------------------------------------------------------ time to first mask
    first: dict[str, Any] = {}
    for name, b in backends.items():
        with SegmentationSession(model=b) as s:
            t0 = time.perf_counter()
            s.set_volume(vol)  # as a user loads it: automatic window, signature hashed
            t1 = time.perf_counter()
            pred = s.predict(SliceRef(0, k0), Prompts(box=base_box))
            t2 = time.perf_counter()
        first[name] = {"ours_s": round(t2 - t0, 2), "set_volume_s": round(t1 - t0, 2),
                       "first_prompt_s": round(t2 - t1, 2), "dice_vs_reference": round(dice(pred.mask, liver[k0]), 4),
                       "encode_all_first_s_extrapolated": round(t1 - t0 + args.slices * per_slice_encode[name]
                                                                + latency[name]["cached_ms"]["p50"] / 1000, 1)}
    first["note"] = ("encode_all_first = set_volume + slices x measured median encoder seconds + one cached decode; "
                     "extrapolated, not run")
    report["time_to_first_mask"] = first

    # ------------------------------------------------------------------ propagation
    prop: dict[str, Any] = {}
    start = int(np.nonzero(areas > 0.25 * areas.max())[0][0])  # up through the liver from its lower part
    masks_by: dict[str, dict[int, np.ndarray]] = {}
    runs = [(name, b, lookahead, True) for name, b in backends.items() for lookahead in (0, 1)]
    runs.append(("onnx", backends["onnx"], 1, False))  # the default path without the second look
    for name, b, lookahead, second_look in runs:
        with SegmentationSession(model=b) as s:
            s.set_volume(vol, window=window)
            anchor = s.predict(SliceRef(0, start), Prompts(box=box_of(liver[start]))).mask
            n0 = s.encode_count
            t0 = time.perf_counter()
            result = propagate(s, 0, {start: anchor}, direction="up", policy=PromptPolicy(neighbour_check=second_look),
                               rules=StopRules(max_slices=args.prop_slices), lookahead=lookahead)
            elapsed = time.perf_counter() - t0
            n = len(result.masks)
            idx = sorted(result.masks)
            key = f"{name}_{'pipelined' if lookahead else 'sequential'}" + ("" if second_look else "_without_second_look")
            masks_by[key] = result.masks
            prop[key] = {"slices": n, "s_per_slice": round(elapsed / max(n, 1), 3), "total_s": round(elapsed, 1),
                         "encodes": s.encode_count - n0,
                         "stop": [x.reason.value for x in result.stops],
                         "dice_vs_reference": round(dice(np.stack([result.masks[i] for i in idx]),
                                                         liver[idx]), 4) if n else None,
                         "cache_mib": round(s.cache.bytes_used / 2**20, 1)}
    for name in backends:
        a, c = masks_by[f"{name}_sequential"], masks_by[f"{name}_pipelined"]
        prop[f"{name}_identical_with_and_without_pipelining"] = (
            sorted(a) == sorted(c) and all(np.array_equal(a[i], c[i]) for i in a))
        prop[f"{name}_pipelining_speedup"] = round(prop[f"{name}_sequential"]["s_per_slice"]
                                                   / prop[f"{name}_pipelined"]["s_per_slice"], 2)
    prop["onnx_second_look_time_ratio"] = round(prop["onnx_pipelined"]["s_per_slice"]
                                                / prop["onnx_pipelined_without_second_look"]["s_per_slice"], 3)
    prop["start_slice"] = start
    report["propagation"] = prop
    report["cache"] = {"embedding_mib_fp16": 2.0, "after_propagation_mib": prop["onnx_pipelined"]["cache_mib"],
                       "budget_mib_default": 1024}

    # ------------------------------------------------------------------ encoder variants
    report["encoder_variants"] = encoder_variants(backends, windowed, lab, names, args)
    report["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    lat_default = latency["onnx"]
    report["targets_met"] = {
        "cached_p50_ms<=35": lat_default["cached_ms"]["p50"] <= TARGETS["cached_p50_ms"],
        "uncached_p50_ms<=550": lat_default["uncached_ms"]["p50"] <= TARGETS["uncached_p50_ms"],
        "first_mask_s<=1": first["onnx"]["ours_s"] <= TARGETS["first_mask_s"],
        "propagation_s_per_slice<=0.5": prop["onnx_pipelined"]["s_per_slice"] <= TARGETS["propagation_s_per_slice"],
        "note": "for the default runtime (auto -> ONNX Runtime on this CPU)"}
    print(json.dumps(report, indent=1))


def encoder_compute(eager_backend: Any, per_slice_encode: dict[str, float]) -> dict[str, Any]:
    """How far the fp32 encoder is from this CPU's arithmetic limit, measured in the same run.

    Why: the uncached and propagation targets hinge on one encoder call. If it already runs near
    the machine's large-SGEMM rate, no scheduling or runtime change reaches them in fp32; only
    lossy arithmetic would, and that has to pass the Dice check in encoder_variants.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        eager_backend.net.image_encoder(torch.rand(1, 3, eager_backend.spec.image_size, eager_backend.spec.image_size))
    gflop = counter.get_total_flops() / 1e9
    a = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
    a @ a
    runs = []
    for _ in range(10):
        t0 = time.perf_counter()
        a @ a
        runs.append(time.perf_counter() - t0)
    sgemm = 2 * 1024**3 / statistics.median(runs) / 1e9
    return {"encoder_gflop": round(gflop, 1), "machine_sgemm_1024_gflops": round(sgemm, 1),
            "achieved_gflops": {k: round(gflop / v, 1) for k, v in per_slice_encode.items()},
            "fp32_encoder_floor_s_at_sgemm_rate": round(gflop / sgemm, 3)}


def encoder_variants(backends: dict[str, Any], windowed: np.ndarray, lab: np.ndarray, names: dict[str, int],
                     args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per slice and mask Dice vs eager fp32 for ONNX Runtime, bf16 autocast and torch.compile.

    Every variant's embedding is decoded by the same eager fp32 decoder, so only the encoder differs.
    """
    import torch

    eager, onnx = backends["eager"], backends["onnx"]
    by_value = {v: k for k, v in names.items()}
    counts = (lab > 0).reshape(lab.shape[0], -1).sum(1)
    labelled = np.nonzero(counts > 0)[0]
    picks = labelled[np.linspace(0, len(labelled) - 1, args.dice_slices + 2).round().astype(int)[1:-1]]
    prompts: list[tuple[int, str, np.ndarray]] = []
    for k in picks:
        values, sizes = np.unique(lab[k][lab[k] > 0], return_counts=True)
        for v, _ in sorted(zip(values, sizes), key=lambda t: -t[1])[:3]:
            if int(v) in by_value and _ >= 400:
                prompts.append((int(k), by_value[int(v)], box_of(lab[k] == v)))

    def eager_encode(x):
        with torch.inference_mode():
            return eager.net.image_encoder(x)

    def bf16_encode(x):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return eager.net.image_encoder(x).float()

    variants: dict[str, Callable[[Any], Any]] = {
        "eager_fp32": eager_encode,
        "onnx_fp32": lambda x: torch.from_numpy(onnx._graph("encoder").run({"image": x.numpy()})[0]),
        "eager_bf16_autocast": bf16_encode,
    }
    compile_s: dict[str, float] = {}
    if not args.no_compile:
        compiled = torch.compile(eager.net.image_encoder)

        def compiled_fp32(x):
            with torch.inference_mode():
                return compiled(x)

        def compiled_bf16(x):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return compiled(x).float()

        variants["compile_fp32"] = compiled_fp32
        variants["compile_bf16"] = compiled_bf16
    inputs = {k: eager.prepare_image(windowed[k]) for k in sorted({p[0] for p in prompts})}
    first_x = next(iter(inputs.values()))
    out: dict[str, Any] = {"slices": len(inputs), "prompts": len(prompts),
                           "cpu_bf16_instructions": _cpu_has_bf16()}
    embeddings: dict[str, dict[int, Any]] = {}
    first_k = next(iter(inputs))
    slow_bf16 = None
    for name, fn in variants.items():
        if name == "compile_bf16" and slow_bf16 is not None:
            out[name] = {"skipped": f"bf16 autocast took {slow_bf16:.0f} s per slice on this CPU (no bf16 "
                                    "instructions); compiling it is not worth the minutes"}
            continue
        t0 = time.perf_counter()
        try:
            first_emb = fn(first_x)  # warm-up (compiles the compiled variants)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
            out[name] = {"error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        compile_s[name] = time.perf_counter() - t0
        if "bf16" in name and compile_s[name] > 10 * 1.5:  # emulated bf16: one call is the measurement
            slow_bf16 = compile_s[name]
            embeddings[name] = {first_k: first_emb}
            out[name] = {"encoder_s_median": round(compile_s[name], 1), "n": 1, "dice_on": "first slice only"}
            continue
        times = []
        for _ in range(args.variant_runs):
            t0 = time.perf_counter()
            fn(first_x)
            times.append(time.perf_counter() - t0)
        embeddings[name] = {k: fn(x) for k, x in inputs.items()}
        out[name] = {"encoder_s_median": round(statistics.median(times), 3), "n": len(times),
                     "first_call_s": round(compile_s[name], 1)}
    reference = embeddings["eager_fp32"]
    for name in embeddings:
        dices = []
        for k, _organ, box in prompts:
            if k not in embeddings[name]:
                continue
            g = eager.geometry(*windowed[k].shape)
            a = eager.decode(reference[k], g, box=box).logits > 0
            b = eager.decode(embeddings[name][k], g, box=box).logits > 0
            dices.append(dice(a, b))
        out[name]["dice_vs_eager_fp32"] = {"mean": round(float(np.mean(dices)), 4), "min": round(min(dices), 4)}
    default_s = out["onnx_fp32"]["encoder_s_median"]
    for name in embeddings:
        if name in ("eager_fp32", "onnx_fp32"):
            continue
        drop = 1.0 - out[name]["dice_vs_eager_fp32"]["mean"]
        faster = out[name]["encoder_s_median"] < default_s
        out[name]["qualifies_for_auto"] = bool(drop <= TARGETS["auto_variant_max_dice_drop"] and faster)
        out[name]["why"] = (f"Dice drop {drop:.4f} ({'<=' if drop <= 0.005 else '>'} 0.005), "
                            f"{out[name]['encoder_s_median']:.3f} s vs ONNX fp32 {default_s:.3f} s")
    return out


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


if __name__ == "__main__":
    main()
