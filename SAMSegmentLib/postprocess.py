"""Optional mask clean-up: fill holes, keep the largest connected component (both off by default,
because a structure can legitimately have holes (a kidney's pelvis) or several parts (bowel))."""

from __future__ import annotations

import numpy as np


def fill_mask_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed background; a 3D mask is filled slice by slice along axis 0 and in 3D."""
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return m.copy()
    if m.ndim == 3:
        m = np.stack([ndimage.binary_fill_holes(s) for s in m])
    return ndimage.binary_fill_holes(m)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component (4-connected in 2D, 6-connected in 3D)."""
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(m)
    if count <= 1:
        return m.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def postprocess(mask: np.ndarray, fill_holes: bool = False, largest_component: bool = False) -> np.ndarray:
    out = np.asarray(mask, dtype=bool)
    if largest_component:
        out = keep_largest_component(out)
    if fill_holes:
        out = fill_mask_holes(out)
    return out
