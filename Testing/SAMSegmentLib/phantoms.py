"""Volumes with known masks, generated in code: tests know the right answer by construction."""

from __future__ import annotations

import numpy as np

from SAMSegmentLib.metrics import dice  # noqa: F401 - tests import it from here
from SAMSegmentLib.preprocessing import mask_bbox


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
    """The mask's bounding box (x0, y0, x1, y1) as the box prompt a user would drag."""
    return mask_bbox(mask2d).astype(float).tolist()


def disks_ct(shape: tuple[int, int, int] = (2, 96, 96),
             disks: tuple[tuple[float, float, float], ...] = ((30.0, 28.0, 10.0), (30.0, 68.0, 9.0), (68.0, 50.0, 11.0)),
             disk_hu: float = 200.0, background_hu: float = -80.0, noise_hu: float = 8.0,
             seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Separate bright disks (row, column, radius) in a soft-tissue body, the same on every slice.

    For everything mode: the right answer is one region per disk. Returns (int16 HU volume,
    one bool (H, W) mask per disk).
    """
    rng = np.random.default_rng(seed)
    h, w = shape[1:]
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    body = ((yy - h / 2) / (h * 0.47)) ** 2 + ((xx - w / 2) / (w * 0.47)) ** 2 <= 1.0
    masks = [(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r for cy, cx, r in disks]
    plane = np.full((h, w), -1000.0)
    plane[body] = background_hu
    for m in masks:
        plane[m] = disk_hu
    vol = np.repeat(plane[None], shape[0], axis=0) + rng.normal(0.0, noise_hu, shape)
    return np.round(vol).astype(np.int16), masks


def half_blurred_square(size: int = 96, lo: int = 28, hi: int = 68, sigma: float = 4.0, inside_hu: float = 200.0,
                        outside_hu: float = -80.0, noise_hu: float = 5.0,
                        seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One slice with a bright square whose left edge is sharp and right edge Gaussian-blurred.

    A prompt's jitter should move the mask's right edge more than its left edge. Returns
    (int16 volume (1, size, size), bool square mask).
    """
    from scipy import ndimage

    square = np.zeros((size, size), dtype=bool)
    square[lo:hi, lo:hi] = True
    sharp = np.where(square, inside_hu, outside_hu)
    blurred = ndimage.gaussian_filter(sharp, sigma)
    img = sharp.copy()
    half = (lo + hi) // 2
    img[:, half:] = blurred[:, half:]
    img += np.random.default_rng(seed).normal(0.0, noise_hu, img.shape)
    return np.round(img)[None].astype(np.int16), square
