"""Overlap of two masks: the one Dice and the one IoU of the engine, its tests and benchmarks."""

from __future__ import annotations

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap 2|A&B| / (|A| + |B|) of two masks.

    Args:
        a: a mask; nonzero is inside.
        b: a mask of the same shape.

    Returns:
        The Dice in [0, 1]; 1.0 when both masks are empty (they agree).
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    sa, sb = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    if sa + sb == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / (sa + sb)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union |A&B| / |A|B| of two masks.

    Args:
        a: a mask; nonzero is inside.
        b: a mask of the same shape.

    Returns:
        The IoU in [0, 1]; 1.0 when both masks are empty (they agree).
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union
