from __future__ import annotations

import numpy as np

from SAMSegmentLib.postprocess import fill_mask_holes, keep_largest_component, postprocess


def ring() -> np.ndarray:
    m = np.zeros((20, 20), bool)
    m[4:16, 4:16] = True
    m[8:12, 8:12] = False
    return m


def test_fill_holes_2d_and_3d():
    filled = fill_mask_holes(ring())
    assert filled[8:12, 8:12].all() and filled.sum() == 144
    vol = np.stack([ring(), ring()])
    assert fill_mask_holes(vol)[:, 8:12, 8:12].all()
    assert not fill_mask_holes(np.zeros((5, 5), bool)).any()


def test_largest_component():
    m = np.zeros((20, 20), bool)
    m[1:3, 1:3] = True
    m[10:18, 10:18] = True
    out = keep_largest_component(m)
    assert out.sum() == 64 and not out[1:3, 1:3].any()
    assert not keep_largest_component(np.zeros((4, 4), bool)).any()


def test_options_default_off():
    m = ring()
    m[0, 0] = True
    assert np.array_equal(postprocess(m), m)
    both = postprocess(m, fill_holes=True, largest_component=True)
    assert not both[0, 0] and both[8:12, 8:12].all()
