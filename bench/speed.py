"""Prompt -> mask latency with a cached embedding vs the naive path that re-encodes on every
prompt, measured side by side in one run; and the cache's memory while a 400-slice volume is
walked. Prints JSON.

The session is built with the default runtime choice ("auto", or $SAMSEGMENT_RUNTIME), as a
user gets it; the JSON says what that resolved to for the encoder and the decoder.

Usage: python bench/speed.py [--size 512] [--prompts 40] [--walk 400] [--full-walk]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore", category=FutureWarning)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def phantom_slices(size: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    vol = np.full((n, size, size), -80.0)
    for k in range(n):
        r = size * (0.18 + 0.02 * np.sin(k / 3.0))
        vol[k][(yy - size / 2) ** 2 + ((xx - size / 2) / 1.3) ** 2 <= r * r] = 60.0
    vol += rng.normal(0, 8, vol.shape)
    return vol.astype(np.int16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=40, help="prompts timed on the cached slice")
    parser.add_argument("--naive", type=int, default=8, help="prompts timed on the re-encode path")
    parser.add_argument("--walk", type=int, default=400, help="slices walked through the cache")
    parser.add_argument("--walk-budget-mib", type=float, default=64.0)
    parser.add_argument("--full-walk", action="store_true", help="encode every walked slice with the model (slow)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from SAMSegmentLib.cache import CacheKey, EmbeddingCache
    from SAMSegmentLib.prompts import Prompts
    from SAMSegmentLib.session import SegmentationSession
    from SAMSegmentLib.volume import SliceRef

    vol = phantom_slices(args.size, 3)
    rng = np.random.default_rng(1)
    s = args.size

    def random_prompt() -> Prompts:
        x0, y0 = rng.uniform(0.25 * s, 0.35 * s, 2)
        x1, y1 = rng.uniform(0.65 * s, 0.75 * s, 2)
        p = Prompts(box=[x0, y0, x1, y1])
        if rng.random() < 0.5:
            p = p.with_point(s / 2 + rng.uniform(-10, 10), s / 2 + rng.uniform(-10, 10), 1)
        return p

    report: dict = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "python": platform.python_version(), "torch": torch.__version__}}
    with SegmentationSession() as session:
        session.set_volume(vol)
        ref = SliceRef(0, 1)
        backend = session.backend
        runtime = backend.prepare_runtime()  # load (or export once) the graphs before anything is timed
        session.predict(ref, random_prompt(), refine=False)  # encode once + warm up
        for _ in range(3):
            session.predict(ref, random_prompt(), refine=False)
        cached = []
        for _ in range(args.prompts):
            p = random_prompt()
            t0 = time.perf_counter()
            session.predict(ref, p, refine=False)
            cached.append(time.perf_counter() - t0)
        naive = []
        image = session.slice_image(ref)
        geom = session.geometry(ref)
        for _ in range(args.naive):
            p = random_prompt()
            t0 = time.perf_counter()
            emb = backend.encode(image)  # the naive path: encode again for every prompt
            out = backend.decode(emb, geom, p.points if len(p.points) else None, p.labels, p.box)
            _ = out.logits > 0
            naive.append(time.perf_counter() - t0)
        report["prompt_to_mask"] = {
            "slice": [s, s], "model": session.model_id, "device": backend.device,
            "runtime": {k: runtime[k] for k in ("requested", "encoder", "decoder")},
            "cached_ms": {"p50": round(1000 * percentile(cached, 50), 1), "p95": round(1000 * percentile(cached, 95), 1),
                          "n": len(cached)},
            "naive_reencode_ms": {"p50": round(1000 * percentile(naive, 50), 1),
                                  "p95": round(1000 * percentile(naive, 95), 1), "n": len(naive)},
            "speedup_p50": round(statistics.median(naive) / statistics.median(cached), 1),
            "target": "cached p50 <= 60 ms; speedup >= 20x",
        }
        # cache walk: the budget must hold while many more slices than fit are visited
        budget = int(args.walk_budget_mib * 2**20)
        cache = EmbeddingCache(budget_bytes=budget)
        emb = session.embedding(ref)
        peak = 0
        t0 = time.perf_counter()
        walk_vol = phantom_slices(64, 2)
        for i in range(args.walk):
            key = CacheKey("walk", 0, i, session.model_id, "bench")
            if args.full_walk:
                emb = backend.encode(session.slice_image(SliceRef(0, i % 3)))
            cache.put(key, emb)
            cache.get(CacheKey("walk", 0, max(0, i - 1), session.model_id, "bench"))
            peak = max(peak, cache.bytes_used)
        del walk_vol
        report["cache_walk"] = {"slices": args.walk, "budget_mib": args.walk_budget_mib,
                                "peak_mib": round(peak / 2**20, 2), "within_budget": peak <= budget,
                                "entries_kept": len(cache), "embedding_mib": round(2 * 256 * 64 * 64 / 2**20, 2),
                                "evictions": cache.stats.evictions, "hits": cache.stats.hits,
                                "real_encodes": bool(args.full_walk), "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
