"""Volumes with known masks, generated in code: tests know the right answer by construction."""

from __future__ import annotations

import numpy as np


def ellipsoid_ct(shape: tuple[int, int, int] = (24, 96, 112), center: tuple[float, float, float] | None = None,
                 radii: tuple[float, float, float] = (8.0, 26.0, 32.0), organ_hu: float = 60.0,
                 background_hu: float = -80.0, noise_hu: float = 8.0, seed: int = 0,
                 drift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A soft-tissue ellipsoid (about liver/spleen contrast) in fat, with a body outline and noise.

    ``drift`` shifts the ellipsoid's in-plane centre by that many pixels per slice, so propagation
    has to follow a moving object. Returns (int16 HU volume, bool mask).
    """
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    ck, cj, ci = center if center is not None else (shape[0] / 2.0, shape[1] / 2.0, shape[2] / 2.0)
    cj_k = cj + drift * (k - ck)
    mask = ((k - ck) / radii[0]) ** 2 + ((j - cj_k) / radii[1]) ** 2 + ((i - ci) / radii[2]) ** 2 <= 1.0
    body = ((j - shape[1] / 2.0) / (shape[1] * 0.47)) ** 2 + ((i - shape[2] / 2.0) / (shape[2] * 0.47)) ** 2 <= 1.0
    vol = np.full(shape, -1000.0)
    vol[body] = background_hu
    vol[mask] = organ_hu
    vol += rng.normal(0.0, noise_hu, shape)
    return np.round(vol).astype(np.int16), mask


def box_of(mask2d: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask2d)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s
