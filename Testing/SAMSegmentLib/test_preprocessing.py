"""Windowing and the slice <-> model-input geometry."""

from __future__ import annotations

import numpy as np
import pytest

from SAMSegmentLib.errors import PromptError, VolumeError
from SAMSegmentLib.preprocessing import (CT_PRESETS, IntensityWindow, SliceGeometry, auto_window, robust_window,
                                         validate_prompt_geometry)


def test_window_maps_to_uint8_with_clipping():
    w = IntensityWindow.from_level_width(40, 400)
    out = w.apply(np.array([[-1000, -160, 40, 240, 3000]], dtype=np.int16))
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 0, 128, 255, 255]]
    with pytest.raises(VolumeError, match="empty"):
        IntensityWindow(10, 10)


def test_auto_window_ct_and_mr():
    ct = np.full((4, 8, 8), -1000, dtype=np.int16)
    ct[:, 2:6, 2:6] = 50
    assert auto_window(ct).source.startswith("CT preset")
    rng = np.random.default_rng(0)
    mr = rng.gamma(2.0, 100.0, (4, 32, 32)).astype(np.float32)
    win = auto_window(mr)
    assert win.source.startswith("percentiles")
    lo, hi = np.percentile(mr[mr > mr.min()], [0.5, 99.5])
    assert win.low == pytest.approx(lo, rel=1e-6) and win.high == pytest.approx(hi, rel=1e-6)
    assert auto_window(ct, preset="lung").level == CT_PRESETS["lung"][0]
    with pytest.raises(VolumeError, match="single intensity"):
        robust_window(np.zeros((3, 4, 4)))


def test_one_window_for_all_slices_keeps_tissue_comparable():
    # two slices with the same tissue value but different extremes: per-slice min-max would
    # map the tissue differently; one volume window maps it identically
    vol = np.zeros((2, 16, 16), dtype=np.int16)
    vol[:, 4:8, 4:8] = 60
    vol[0, 0, 0] = 1000
    out = IntensityWindow.from_level_width(40, 400).apply(vol)
    assert out[0, 5, 5] == out[1, 5, 5]


@pytest.mark.parametrize("hw,size,mode", [((101, 122), 256, "longest_side"), ((512, 512), 256, "longest_side"),
                                           ((30, 122), 1024, "longest_side"), ((91, 117), 1024, "stretch")])
def test_coordinates_round_trip_exactly(hw, size, mode):
    g = SliceGeometry(hw[0], hw[1], size, mode)
    pts = np.array([[0.0, 0.0], [hw[1] - 1.0, hw[0] - 1.0], [10.25, 7.5]])
    back = g.points_from_model(g.points_to_model(pts))
    np.testing.assert_allclose(back, pts, atol=1e-9)
    new_h, new_w = g.scaled_size
    assert max(new_h, new_w) == size
    if mode == "longest_side":
        assert abs(new_h / new_w - hw[0] / hw[1]) < 2.0 / size  # aspect kept


@pytest.mark.parametrize("hw,size", [((101, 122), 256), ((64, 40), 1024)])
def test_mask_to_model_and_back_is_the_same_mask(hw, size):
    g = SliceGeometry(hw[0], hw[1], size, "longest_side")
    mask = np.zeros(hw, dtype=bool)
    mask[20:50, 10:35] = True
    low = g.mask_to_low_res(mask, 256)
    assert low.shape == (1, 1, 256, 256)
    back = g.low_res_to_slice(low, 256)[0, 0].numpy() > 0
    # interior exact; only the boundary ring may move by a pixel through two resamplings
    assert np.array_equal(back[25:45, 15:30], mask[25:45, 15:30])
    assert (back ^ mask).sum() <= 2 * (mask.sum() ** 0.5) * 2


def test_prompt_validation_messages():
    validate_prompt_geometry(10, 20, np.array([[19.0, 9.0]]), np.array([0, 0, 5, 5]))
    with pytest.raises(PromptError, match=r"outside the 20x10 slice"):
        validate_prompt_geometry(10, 20, np.array([[25.0, 3.0]]), None)
    with pytest.raises(PromptError, match="zero area"):
        validate_prompt_geometry(10, 20, None, np.array([3, 3, 3, 8]))
    with pytest.raises(PromptError, match="swapped"):
        validate_prompt_geometry(10, 20, None, np.array([8, 3, 3, 8]))
    with pytest.raises(PromptError, match="entirely outside"):
        validate_prompt_geometry(10, 20, None, np.array([30, 3, 40, 8]))
    with pytest.raises(PromptError, match="NaN"):
        validate_prompt_geometry(10, 20, np.array([[np.nan, 1.0]]), None)
