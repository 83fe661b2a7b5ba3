"""The "SAM" effect's decisions: clicks vs drags, prompts per slice, preview, apply, undo."""

from __future__ import annotations

import numpy as np
import pytest

from SAMSegmentSlicer.selftest import add_volume, slice_node_through
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


@pytest.mark.parametrize("orientation", ["Axial", pytest.param("Coronal", marks=pytest.mark.slow),
                                         pytest.param("Sagittal", marks=pytest.mark.slow)])
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
    ctl.handle(node, ctl.interpreter.release(xy_b))  # returns at once; the mask arrives on poll()
    pred = ctl.wait()
    plane = np.take(truth, view.index, view.axis)
    assert dice(pred.mask, plane) > 0.9
    ctl.interpreter.press(display_xy(node, ras), ctrl=True)
    ctl.handle(node, ctl.interpreter.release(display_xy(node, ras)))
    ctl.wait()
    assert core.current_prompts.labels.tolist() == [0]
    ctl.undo()  # removes the exclude point
    back = ctl.wait()
    assert np.array_equal(back.mask, pred.mask)
    ctl.apply()
    written = segment_array(seg, core.segment_id, volume).astype(bool)
    assert dice(np.take(written, view.index, view.axis), plane) > 0.9
    assert written.sum() == np.take(written, view.index, view.axis).sum()
    assert ctl.state is None and core.current is None


@pytest.mark.slow  # encodes several slices
def test_moving_to_another_slice_starts_new_prompts(world):  # noqa: F811
    scene, core, volume, seg, _, truth = world
    ras, ijk = centre_ras(volume, truth)
    node = slice_node_through(scene, volume, "Axial", ras)
    ctl = EffectController(core)
    corner = geometry.ijk_to_ras(volume, [[10, 10, ijk[2]]])[0]
    ctl.interpreter.press(display_xy(node, corner))
    ctl.interpreter.move(display_xy(node, ras))
    ctl.handle(node, ctl.interpreter.release(display_xy(node, ras)))
    ctl.wait()
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
    ctl.handle(node, Action("include", display_xy(node, ras)))  # sent; the server refuses it
    with pytest.raises(PromptError, match="box"):
        ctl.wait()
    assert ctl.state.points == []


def test_mouse_down_starts_encoding_the_slice_shown(world, engine_server):  # noqa: F811
    """The server starts the encode on press, so a box drag overlaps it; the release decodes that
    embedding. The press itself only sends a request (it never waits for the server)."""
    import time

    scene, core, volume, seg, _, truth = world
    ras, ijk = centre_ras(volume, truth)
    node = slice_node_through(scene, volume, "Axial", ras)
    ctl = EffectController(core)
    server_session = engine_server.state.session(core.session.session_id).session
    engine_server.state.clear_caches()  # earlier tests encoded this phantom (embeddings are keyed by content)
    view = core.view_slice(node)
    assert not server_session.is_cached(view.ref) and server_session.encode_count == 0
    corner = geometry.ijk_to_ras(volume, [[10, 10, ijk[2]]])[0]
    t0 = time.perf_counter()
    ctl.press(node, display_xy(node, corner))
    assert time.perf_counter() - t0 < 0.05 and ctl.interpreter.active
    deadline = time.monotonic() + 60
    while not server_session.is_cached(view.ref) and time.monotonic() < deadline:
        core.poll()  # the module's timer
        time.sleep(0.01)
    assert server_session.is_cached(view.ref) and server_session.encode_count == 1  # before any release
    ctl.interpreter.move(display_xy(node, ras))
    ctl.handle(node, ctl.interpreter.release(display_xy(node, ras)))
    pred = ctl.wait()
    assert pred is not None and pred.area > 0
    assert server_session.encode_count == 1


@pytest.fixture
def editor(world):  # noqa: F811
    """The Segment Editor showing the world's volume and segmentation with two segments, and an
    effect controller wired to it the way SegmentEditorSAMLib/SegmentEditorEffect.py wires it."""
    from mrml_fixtures import ScriptedEffectMirror, SegmentEditorWidgetMirror, segment_editor_singleton
    from SAMSegmentSlicer.effect_interaction import EffectSink
    from SAMSegmentSlicer.logic import SAMSegmentCore

    scene, core, volume, seg, _, truth = world
    node = segment_editor_singleton(scene)
    widget = SegmentEditorWidgetMirror(scene, core.app_logic, node)
    widget.setSegmentationNode(seg)
    widget.setSourceVolumeNode(volume)
    first = seg.GetSegmentation().AddEmptySegment("first", "first", (1.0, 0.0, 0.0))
    second = seg.GetSegmentation().AddEmptySegment("second", "second", (0.0, 0.0, 1.0))
    node.SetSelectedSegmentID(first)
    effect_core = SAMSegmentCore(scene, core.app_logic, link=core.link)  # the module's server, shared
    effect = ScriptedEffectMirror(widget)
    ctl = EffectController(effect_core, effect.parameterSetNode, EffectSink(effect, effect.modes))
    yield ctl, widget, node, first, second
    effect_core.close()


def drag_block_box(ctl, scene, volume, truth, orientation="Axial"):
    ras, _ = centre_ras(volume, truth)
    node = slice_node_through(scene, volume, orientation, ras)
    ctl.bind()
    view = ctl.core.view_slice(node)
    lo, hi = np.argwhere(truth).min(axis=0) - 1, np.argwhere(truth).max(axis=0) + 1  # k, j, i
    comp = geometry.ijk_component(view.axis)
    a_ijk, b_ijk = lo[::-1].astype(float), hi[::-1].astype(float)
    a_ijk[comp] = b_ijk[comp] = view.index
    xy_a, xy_b = (display_xy(node, geometry.ijk_to_ras(volume, [p])[0]) for p in (a_ijk, b_ijk))
    ctl.press(node, xy_a)
    ctl.interpreter.move(xy_b)
    ctl.handle(node, ctl.interpreter.release(xy_b))
    return view, ctl.wait()


def test_effect_writes_into_the_segment_selected_at_apply_through_the_editors_undo(world, editor):  # noqa: F811
    """Review finding 6: the segment is read at every press and Apply, not once at activation; the
    write goes through the effect (the editor's logic and undo stack)."""
    scene, core, volume, seg, _, truth = world
    ctl, widget, node, first, second = editor
    view, pred = drag_block_box(ctl, scene, volume, truth)
    assert ctl.core.segment_id == first
    node.SetSelectedSegmentID(second)  # the user picks another segment while the preview is shown
    ctl.apply()
    plane = np.take(truth, view.index, view.axis)
    written = segment_array(seg, second, volume).astype(bool)
    assert dice(np.take(written, view.index, view.axis), plane) > 0.9
    assert not segment_array(seg, first, volume).any()
    assert node.GetSelectedSegmentID() == second  # the user's choice is not snapped back
    widget.undo()  # the Segment Editor's Ctrl+Z
    assert not segment_array(seg, second, volume).any()


def test_effect_follows_a_new_source_volume(world, editor):  # noqa: F811
    scene, core, volume, seg, vol, truth = world
    ctl, widget, node, first, second = editor
    drag_block_box(ctl, scene, volume, truth)
    other = add_volume(scene, np.roll(vol, 3, axis=2), name="follow-up")
    node.SetAndObserveSourceVolumeNode(other)
    ctl.bind()
    assert ctl.core.volume_node is other and ctl.state is None and ctl.core.current is None
    ctl.core.wait_idle()  # the new volume is sent to the server
    assert np.array_equal(ctl.core.session.volume, np.roll(vol, 3, axis=2))


def test_effect_edit_lands_on_an_oversampled_segmentation_with_intensity_masking(world, editor):  # noqa: F811
    """Review finding 7: the modifier is placed on defaultModifierLabelmap()'s geometry."""
    scene, core, volume, seg, _, truth = world
    ctl, widget, node, first, second = editor
    fine = add_volume(scene, np.zeros(tuple(2 * s for s in truth.shape), np.int16), name="oversampled",
                      spacing=tuple(s / 2 for s in (0.8, 1.1, 2.5)))
    seg.SetReferenceImageGeometryParameterFromVolumeNode(fine)
    node.SetSourceVolumeIntensityMask(True)
    node.SetSourceVolumeIntensityMaskRange(-10000, 10000)
    view, pred = drag_block_box(ctl, scene, volume, truth)
    ctl.apply()
    written = segment_array(seg, first, volume).astype(bool)
    assert dice(np.take(written, view.index, view.axis), pred.mask) > 0.98
    assert np.take(written, view.index, view.axis).sum() == written.sum()


def test_without_a_server_a_click_is_a_message(world):  # noqa: F811
    """Review finding 12, now that the engine never runs in Slicer's process: an effect with no
    server configured says so on release; the press neither loads nor waits for anything."""
    from SAMSegmentLib.errors import SAMSegmentError
    from SAMSegmentSlicer.logic import SAMSegmentCore

    scene, core, volume, seg, _, truth = world
    effect_core = SAMSegmentCore(scene, core.app_logic)
    effect_core.set_inputs(volume, seg)
    ctl = EffectController(effect_core)
    ras, _ = centre_ras(volume, truth)
    node = slice_node_through(scene, volume, "Axial", ras)
    ctl.press(node, display_xy(node, ras))
    assert effect_core.session is None
    with pytest.raises(SAMSegmentError, match="No SAMSegment server is configured"):
        ctl.handle(node, ctl.interpreter.release(display_xy(node, ras)))
    assert effect_core.session is None
    effect_core.close()
