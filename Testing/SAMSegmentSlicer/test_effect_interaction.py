"""The "SAM" effect's decisions: clicks vs drags, prompts per slice, preview, apply, undo."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import slice_node_through
from SAMSegmentSlicer import geometry
from SAMSegmentSlicer.effect_interaction import Action, ClickInterpreter, EffectController
from SAMSegmentSlicer.segment_io import segment_array
from test_logic import centre_ras, dice, world  # noqa: F401 - fixture


def test_click_drag_and_modifiers():
    c = ClickInterpreter()
    c.press((10, 10))
    assert c.release((11, 12)) == Action("include", (10.0, 10.0))
    for kw in ({"ctrl": True}, {"shift": True}, {"right": True}):
        c.press((5, 5), **kw)
        assert c.move((40, 40)) is None  # no rubber band for exclude
        assert c.release((40, 40)).kind == "exclude"
    c.press((10, 10))
    assert c.move((12, 11)) is None
    assert c.move((30, 40)) == ((10.0, 10.0), (30.0, 40.0))
    assert c.release((30, 40)) == Action("box", (10.0, 10.0), (30.0, 40.0))
    assert c.release((1, 1)) is None  # release without press


def display_xy(node, ras):
    m = geometry.vtk_to_numpy_matrix(node.GetXYToRAS())
    return tuple((np.linalg.inv(m) @ np.r_[ras, 1.0])[:2])


@pytest.mark.parametrize("orientation", ["Axial", "Coronal", "Sagittal"])
def test_drag_box_then_exclude_click_then_apply(world, orientation):  # noqa: F811
    scene, core, volume, seg, _, truth = world
    ras, ijk = centre_ras(volume, truth)
    node = slice_node_through(scene, volume, orientation, ras)
    ctl = EffectController(core)
    lo, hi = np.argwhere(truth).min(axis=0) - 1, np.argwhere(truth).max(axis=0) + 1  # k, j, i
    view = core.view_slice(node)
    comp = geometry.ijk_component(view.axis)
    a_ijk, b_ijk = lo[::-1].astype(float), hi[::-1].astype(float)
    a_ijk[comp] = b_ijk[comp] = view.index
    xy_a, xy_b = (display_xy(node, geometry.ijk_to_ras(volume, [p])[0]) for p in (a_ijk, b_ijk))
    ctl.interpreter.press(xy_a)
    ctl.interpreter.move(xy_b)
    pred = ctl.handle(node, ctl.interpreter.release(xy_b))
    plane = np.take(truth, view.index, view.axis)
    assert dice(pred.mask, plane) > 0.9
    ctl.interpreter.press(display_xy(node, ras), ctrl=True)
    pred2 = ctl.handle(node, ctl.interpreter.release(display_xy(node, ras)))
    assert pred2.prompts.labels.tolist() == [0]
    back = ctl.undo()  # removes the exclude point
    assert np.array_equal(back.mask, pred.mask)
    ctl.apply()
    written = segment_array(seg, core.segment_id, volume).astype(bool)
    assert dice(np.take(written, view.index, view.axis), plane) > 0.9
    assert written.sum() == np.take(written, view.index, view.axis).sum()
    assert ctl.state is None and core.current is None


def test_moving_to_another_slice_starts_new_prompts(world):  # noqa: F811
    scene, core, volume, seg, _, truth = world
    ras, ijk = centre_ras(volume, truth)
    node = slice_node_through(scene, volume, "Axial", ras)
    ctl = EffectController(core)
    corner = geometry.ijk_to_ras(volume, [[10, 10, ijk[2]]])[0]
    ctl.interpreter.press(display_xy(node, corner))
    ctl.interpreter.move(display_xy(node, ras))
    ctl.handle(node, ctl.interpreter.release(display_xy(node, ras)))
    first = ctl.state.view.index
    next_ras = geometry.ijk_to_ras(volume, [[ijk[0], ijk[1], ijk[2] + 1]])[0]
    node.JumpSliceByCentering(*next_ras)
    ctl.interpreter.press(display_xy(node, corner))
    ctl.interpreter.move(display_xy(node, next_ras))
    ctl.handle(node, ctl.interpreter.release(display_xy(node, next_ras)))
    assert ctl.state.view.index == first + 1 and len(ctl.state.points) == 0


def test_rejected_point_is_not_kept(world):  # noqa: F811
    from SAMSegmentLib.errors import PromptError

    scene, core, volume, seg, _, truth = world
    ras, _ = centre_ras(volume, truth)
    node = slice_node_through(scene, volume, "Axial", ras)
    ctl = EffectController(core)
    with pytest.raises(PromptError, match="box"):
        ctl.handle(node, Action("include", display_xy(node, ras)))
    assert ctl.state.points == []


def test_mouse_down_starts_encoding_the_slice_shown(world):  # noqa: F811
    """The encode starts on press, so a box drag overlaps it; the release decodes that embedding."""
    import time

    scene, core, volume, seg, _, truth = world
    ras, ijk = centre_ras(volume, truth)
    node = slice_node_through(scene, volume, "Axial", ras)
    ctl = EffectController(core)
    session, view = core.session, core.view_slice(node)
    assert not session.is_cached(view.ref) and session.encode_count == 0
    corner = geometry.ijk_to_ras(volume, [[10, 10, ijk[2]]])[0]
    ctl.press(node, display_xy(node, corner))
    assert ctl.interpreter.active
    deadline = time.monotonic() + 60
    while not session.is_cached(view.ref) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.is_cached(view.ref) and session.encode_count == 1  # before any release
    ctl.interpreter.move(display_xy(node, ras))
    pred = ctl.handle(node, ctl.interpreter.release(display_xy(node, ras)))
    assert pred is not None and pred.area > 0
    assert session.encode_count == 1  # (neighbour prefetches start only now and take far longer than this)
