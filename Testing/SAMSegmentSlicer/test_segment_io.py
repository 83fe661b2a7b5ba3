"""Segment writes through the Segment Editor logic: exact voxels, undo, masking, overlap."""

from __future__ import annotations

import numpy as np
import pytest

from mrml_fixtures import SegmentEditorWidgetMirror, segment_editor_singleton
from SAMSegmentSlicer.selftest import add_volume
from SAMSegmentSlicer.segment_io import SegmentWriter, segment_array

SHAPE = (10, 30, 36)


@pytest.fixture
def setup(mrml):
    scene, app = mrml
    source = np.random.default_rng(0).integers(-100, 300, SHAPE).astype(np.int16)
    volume = add_volume(scene, source)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.CreateDefaultDisplayNodes()
    writer = SegmentWriter(scene, seg, volume, app_logic=app)
    return scene, volume, seg, writer, source.copy()


def plane_mask(shape2d, r0, r1, c0, c1):
    m = np.zeros(shape2d, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


@pytest.mark.parametrize("axis,index", [(0, 3), (1, 17), (2, 5)])
def test_slice_lands_in_exactly_those_voxels(setup, axis, index):
    _, volume, seg, writer, source = setup
    sid = writer.ensure_segment(None, "organ")
    plane_shape = tuple(s for a, s in enumerate(SHAPE) if a != axis)
    mask = plane_mask(plane_shape, 2, 7, 4, 11)
    writer.write_slice(sid, axis, index, mask)
    expected = np.zeros(SHAPE, dtype=np.uint8)
    idx = [slice(None)] * 3
    idx[axis] = index
    expected[tuple(idx)] = mask
    assert np.array_equal(segment_array(seg, sid, volume), expected)
    import slicer

    assert np.array_equal(slicer.util.arrayFromVolume(volume), source)  # source never modified


def test_replace_touches_only_its_slice_and_undo_restores_exactly(setup):
    _, volume, seg, writer, _ = setup
    sid = writer.ensure_segment(None, "organ")
    writer.write_slice(sid, 0, 4, plane_mask((30, 36), 5, 20, 5, 20))
    writer.write_slice(sid, 0, 5, plane_mask((30, 36), 8, 22, 6, 25))
    before = segment_array(seg, sid, volume)
    assert before[4].sum() == 15 * 15 and before[5].sum() == 14 * 19  # the second write kept the first
    writer.write_slice(sid, 0, 5, plane_mask((30, 36), 1, 4, 1, 4))  # replace slice 5 only
    after = segment_array(seg, sid, volume)
    assert np.array_equal(after[4], before[4])
    assert after[5].sum() == 9
    assert writer.undo()
    assert np.array_equal(segment_array(seg, sid, volume), before)


def test_overlap_setting_decides_whether_other_segments_change(setup):
    _, volume, seg, writer, _ = setup
    other = writer.ensure_segment(None, "other")
    target = writer.ensure_segment(None, "target")
    writer.write_slice(other, 0, 2, plane_mask((30, 36), 0, 30, 0, 18))
    other_before = segment_array(seg, other, volume)
    editor = segment_editor_singleton(seg.GetScene())  # the settings the user sees in the Segment Editor
    editor.SetOverwriteMode(editor.OverwriteNone)  # "allow overlap"
    writer.write_slice(target, 0, 2, plane_mask((30, 36), 10, 20, 10, 30))
    assert np.array_equal(segment_array(seg, other, volume), other_before)
    assert segment_array(seg, target, volume)[2, 10:20, 10:30].all()
    writer.undo()
    editor.SetOverwriteMode(editor.OverwriteAllSegments)
    writer.write_slice(target, 0, 2, plane_mask((30, 36), 10, 20, 10, 30))
    other_after = segment_array(seg, other, volume)
    assert not other_after[2, 10:20, 10:18].any()  # overwritten where target now is
    assert other_after[2, :10, :18].all()  # untouched elsewhere


def test_masking_to_inside_a_segment_and_intensity_range(setup):
    import slicer

    _, volume, seg, writer, source = setup
    region = writer.ensure_segment(None, "region")
    target = writer.ensure_segment(None, "target")
    writer.write_slice(region, 0, 6, plane_mask((30, 36), 0, 15, 0, 36))
    editor = segment_editor_singleton(seg.GetScene())
    editor.SetOverwriteMode(editor.OverwriteNone)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID(region)
    writer.write_slice(target, 0, 6, np.ones((30, 36), dtype=bool))
    written = segment_array(seg, target, volume)[6]
    assert written[:15].all() and not written[15:].any()
    writer.undo()
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(0, 150)
    writer.write_slice(target, 0, 6, np.ones((30, 36), dtype=bool))
    written = segment_array(seg, target, volume)[6].astype(bool)
    inside = (source[6] >= 0) & (source[6] <= 150)
    assert np.array_equal(written, inside)


def test_writes_follow_the_volume_when_segmentation_is_transformed(mrml):
    import vtk

    scene, app = mrml
    volume = add_volume(scene, np.zeros(SHAPE, dtype=np.int16))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.CreateDefaultDisplayNodes()
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(1, 3, 7.0)
    t.SetMatrixTransformToParent(m)
    writer = SegmentWriter(scene, seg, volume, app_logic=app)
    seg.SetAndObserveTransformNodeID(t.GetID())
    sid = writer.ensure_segment(None, "organ")
    writer.write_slice(sid, 0, 3, plane_mask((30, 36), 5, 10, 5, 10))
    # world positions of the written voxels are those of the volume's voxels
    from SAMSegmentSlicer.geometry import ijk_to_ras, node_to_world

    bounds = [0.0] * 6
    seg.GetSegmentation().GetSegment(sid).GetBounds(bounds)
    local_center = np.array([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])
    world_center = (node_to_world(seg) @ np.r_[local_center, 1])[:3]
    expected = ijk_to_ras(volume, [[7.0, 7.0, 3.0]])[0]
    assert np.allclose(world_center, expected, atol=1.5)


def test_add_and_remove_modes(setup):
    _, volume, seg, writer, _ = setup
    sid = writer.ensure_segment(None, "organ")
    writer.write_slice(sid, 1, 10, plane_mask((10, 36), 2, 6, 2, 10))
    writer.write_slice(sid, 1, 10, plane_mask((10, 36), 2, 6, 8, 20), mode="add")
    assert segment_array(seg, sid, volume)[2:6, 10, 2:20].all()
    writer.write_slice(sid, 1, 10, plane_mask((10, 36), 0, 10, 0, 5), mode="remove")
    arr = segment_array(seg, sid, volume)
    assert not arr[:, 10, :5].any() and arr[2:6, 10, 5:20].all() and arr.sum() == 4 * 15


def test_unknown_segment_is_a_clear_error(setup):
    from SAMSegmentLib.errors import SAMSegmentError

    *_, writer, _ = setup
    with pytest.raises(SAMSegmentError, match="not in"):
        writer.write_slice("nope", 0, 1, np.ones((30, 36), dtype=bool))


def slice_labelmap(volume, seg, axis, index, mask2d):
    from SAMSegmentSlicer.segment_io import oriented_labelmap, slice_slab

    return oriented_labelmap(volume, seg, *slice_slab(mask2d, axis, index))


def test_settings_are_read_from_the_segment_editor_at_every_write(setup):
    """Review finding 5: the module's writes follow the Segment Editor's own node, not a private
    node with defaults, and pick up a change made between two writes."""
    scene, volume, seg, writer, source = setup
    target = writer.ensure_segment(None, "target")
    full = np.ones((30, 36), dtype=bool)
    writer.write_slice(target, 0, 1, full)  # Segment Editor never opened: everywhere, no intensity mask
    assert segment_array(seg, target, volume)[1].all()
    editor = segment_editor_singleton(scene)
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(0, 150)
    writer.write_slice(target, 0, 2, full)
    assert np.array_equal(segment_array(seg, target, volume)[2].astype(bool), (source[2] >= 0) & (source[2] <= 150))
    editor.SetSourceVolumeIntensityMask(False)
    writer.write_slice(target, 0, 3, full)
    assert segment_array(seg, target, volume)[3].all()


def test_mask_segment_missing_from_this_segmentation_is_a_clear_error(setup):
    import slicer

    from SAMSegmentLib.errors import SAMSegmentError

    scene, volume, seg, writer, _ = setup
    target = writer.ensure_segment(None, "target")
    editor = segment_editor_singleton(scene)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID("a segment of another segmentation")
    with pytest.raises(SAMSegmentError, match="Editable area"):
        writer.write_slice(target, 0, 1, np.ones((30, 36), dtype=bool))
    assert not segment_array(seg, target, volume).any()


@pytest.mark.parametrize("intensity_mask", [False, True])
def test_write_lands_when_segmentation_geometry_differs_from_the_volume(mrml, intensity_mask):
    """Review finding 7: a segmentation whose geometry is not the volume's (here 2x oversampled, as
    Segment Editor > Specify geometry makes it). Slicer drops a modifier that is not on the
    segmentation's grid when the intensity range is on; the slice is placed on that grid."""
    scene, app = mrml
    source = np.random.default_rng(1).integers(0, 100, SHAPE).astype(np.int16)
    volume = add_volume(scene, source)
    fine = add_volume(scene, np.zeros(tuple(2 * s for s in SHAPE), np.int16), name="oversampled",
                      spacing=tuple(s / 2 for s in (0.8, 1.1, 2.5)))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(fine)
    editor = segment_editor_singleton(scene)
    editor.SetSourceVolumeIntensityMask(intensity_mask)
    editor.SetSourceVolumeIntensityMaskRange(-1000, 1000)  # every voxel qualifies
    writer = SegmentWriter(scene, seg, volume, app_logic=app)
    sid = writer.ensure_segment(None, "organ")
    mask = plane_mask((30, 36), 6, 20, 8, 30)
    writer.write_slice(sid, 0, 4, mask)
    written = segment_array(seg, sid, volume).astype(bool)
    assert np.array_equal(written[4], mask)
    assert not np.delete(written, 4, axis=0).any()


def test_segment_editor_undo_reverts_our_write_and_not_the_users_earlier_edit(mrml):
    """Review finding 5: vtkSegmentationHistory::RestorePreviousState goes back to the last *saved*
    state, so without a saved state before our write the Segment Editor's Ctrl+Z would also revert
    the user's last edit. With the editor open on this segmentation, its state is saved first."""
    scene, app = mrml
    volume = add_volume(scene, np.zeros(SHAPE, dtype=np.int16))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    user = seg.GetSegmentation().AddEmptySegment("user")
    sam = seg.GetSegmentation().AddEmptySegment("sam")
    singleton = segment_editor_singleton(scene)
    results = {}
    for guarded in (False, True):
        editor = SegmentEditorWidgetMirror(scene, app, singleton)
        editor.setSegmentationNode(seg)
        editor.setSourceVolumeNode(volume)
        singleton.SetSelectedSegmentID(user)
        editor.paint(user, slice_labelmap(volume, seg, 0, 2, plane_mask((30, 36), 0, 10, 0, 10)))
        painted = segment_array(seg, user, volume)
        writer = SegmentWriter(scene, seg, volume, app_logic=app,
                               segment_editor=(lambda e=editor: e) if guarded else None)
        writer.write_slice(sam, 0, 5, plane_mask((30, 36), 10, 20, 10, 20))
        assert singleton.GetSegmentationNode() is seg and singleton.GetSelectedSegmentID() == user  # untouched
        editor.undo()
        results[guarded] = (np.array_equal(segment_array(seg, user, volume), painted),
                            not segment_array(seg, sam, volume).any())
        writer.close()
        editor.setSegmentationNode(None)  # a new history next round
        for sid in (user, sam):
            seg.GetSegmentation().GetSegment(sid).RemoveAllRepresentations()
        seg.GetSegmentation().RemoveSegment(user)
        seg.GetSegmentation().RemoveSegment(sam)
        user = seg.GetSegmentation().AddEmptySegment("user")
        sam = seg.GetSegmentation().AddEmptySegment("sam")
    assert results[True] == (True, True)  # our write reverted, the user's paint kept
    assert results[False] == (False, True)  # the mechanism the guard prevents: the paint went too
