"""RAS <-> IJK <-> slice pixels on real MRML nodes with oblique, mirrored, anisotropic volumes."""

from __future__ import annotations

import numpy as np
import pytest

from SAMSegmentSlicer.selftest import add_volume, slice_node_through
from SAMSegmentSlicer import geometry

SHAPE = (14, 48, 56)  # K, J, I

# Which array axis a view shows once rotated onto this volume's planes. The volume's directions
# are a modest rotation of LPS-flipped RAS, so I stays closest to R, J to A and K to S.
ORIENTATIONS = {"Axial": 0, "Coronal": 1, "Sagittal": 2}


@pytest.fixture
def volume(mrml):
    scene, _ = mrml
    return add_volume(scene, np.zeros(SHAPE, dtype=np.int16))


def test_ijk_ras_round_trip_uses_directions_spacing_and_origin(volume):
    ijk = np.array([[0, 0, 0], [3, 7, 2], [55, 47, 13]], dtype=float)
    ras = geometry.ijk_to_ras(volume, ijk)
    assert np.allclose(ras[0], volume.GetOrigin())
    # one voxel step along K moves 2.5 mm (the K spacing), whatever the direction
    step = geometry.ijk_to_ras(volume, [[0, 0, 1]])[0] - ras[0]
    assert np.linalg.norm(step) == pytest.approx(2.5)
    assert np.allclose(geometry.ras_to_ijk(volume, ras), ijk)


def test_linear_parent_transform_is_followed(mrml, volume):
    import vtk

    scene, _ = mrml
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 40.0)
    m.SetElement(2, 3, -5.0)
    transform.SetMatrixTransformToParent(m)
    before = geometry.ijk_to_ras(volume, [[3, 4, 5]])[0]
    volume.SetAndObserveTransformNodeID(transform.GetID())
    after = geometry.ijk_to_ras(volume, [[3, 4, 5]])[0]
    assert np.allclose(after - before, [40.0, 0.0, -5.0])
    assert np.allclose(geometry.ras_to_ijk(volume, [after])[0], [3, 4, 5])


def test_slice_pixel_convention_matches_numpy_take():
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # K, J, I
    ijk = np.array([[5, 3, 2]])  # i, j, k
    for axis in range(3):
        xy = geometry.ijk_to_slice_xy(ijk, axis)[0]
        index = int(ijk[0, geometry.ijk_component(axis)])
        plane = np.take(vol, index, axis)
        assert plane[int(xy[1]), int(xy[0])] == vol[2, 3, 5]
        back = geometry.slice_xy_to_ijk(xy, axis, index)[0]
        assert np.allclose(back, ijk[0])


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_view_picks_volume_axis_and_index_from_its_plane(mrml, volume, orientation):
    scene, _ = mrml
    voxel = np.array([20, 31, 9])  # i, j, k
    ras = geometry.ijk_to_ras(volume, [voxel])[0]
    node = slice_node_through(scene, volume, orientation, ras)
    view = geometry.view_slice(volume, geometry.vtk_to_numpy_matrix(node.GetSliceToRAS()), SHAPE)
    axis = ORIENTATIONS[orientation]
    assert view.axis == axis
    assert view.index == voxel[geometry.ijk_component(axis)]
    assert view.inside and not view.is_oblique


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_click_in_view_lands_on_the_voxel_under_it(mrml, volume, orientation):
    """Display XY -> RAS (slice node) -> IJK (volume) -> slice pixel, for every orientation."""
    scene, _ = mrml
    voxel = np.array([20, 31, 9])
    ras = geometry.ijk_to_ras(volume, [voxel])[0]
    node = slice_node_through(scene, volume, orientation, ras)
    xy_to_ras = geometry.vtk_to_numpy_matrix(node.GetXYToRAS())
    xy = (np.linalg.inv(xy_to_ras) @ np.r_[ras, 1.0])[:2]  # the screen pixel showing the voxel
    clicked = geometry.xy_to_ras(node, tuple(xy))
    axis = ORIENTATIONS[orientation]
    index = int(voxel[geometry.ijk_component(axis)])
    pix, kept = geometry.points_on_slice(volume, np.array([clicked]), axis, index)
    assert list(kept) == [0]
    expected = geometry.ijk_to_slice_xy([voxel], axis)[0]
    assert np.allclose(pix[0], expected, atol=1e-6)


def test_points_off_the_slice_are_not_prompts_for_it(volume):
    ras = geometry.ijk_to_ras(volume, [[10, 10, 4], [10, 10, 4.4], [10, 10, 5]])
    _, kept = geometry.points_on_slice(volume, ras, 0, 4)
    assert list(kept) == [0, 1]


def test_standard_axial_view_on_oblique_volume_reports_obliqueness(mrml, volume):
    scene, _ = mrml
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    node.SetOrientation("Axial")
    node.UpdateMatrices()
    view = geometry.view_slice(volume, geometry.vtk_to_numpy_matrix(node.GetSliceToRAS()), SHAPE)
    assert view.axis == 0
    assert view.is_oblique and view.oblique_deg == pytest.approx(15.0, abs=0.5)


def test_roi_box_on_slice_and_rotated_roi(mrml, volume):
    scene, _ = mrml
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    # an ROI with the volume's own axes spanning voxels i 10..30, j 5..25, k 2..8
    lo, hi = np.array([10, 5, 2.0]), np.array([30, 25, 8.0])
    center = geometry.ijk_to_ras(volume, [(lo + hi) / 2])[0]
    directions = geometry.ijk_to_ras_matrix(volume)[:3, :3] / np.array([0.8, 1.1, 2.5])
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, float(directions[r, c]))
    roi.SetAndObserveObjectToNodeMatrix(m)
    roi.SetCenterWorld(*center)
    roi.SetSize(*((hi - lo) * np.array([0.8, 1.1, 2.5])))
    box = geometry.box_on_slice(volume, geometry.roi_corners_ras(roi), 0, 5)
    assert np.allclose(box, [10, 5, 30, 25], atol=1e-6)
    assert geometry.box_on_slice(volume, geometry.roi_corners_ras(roi), 0, 12) is None
    # on a sagittal (I) slice the box spans j and k
    assert np.allclose(geometry.box_on_slice(volume, geometry.roi_corners_ras(roi), 2, 20), [5, 2, 25, 8], atol=1e-6)


def test_non_linear_transform_gives_a_clear_error(mrml, volume):
    from SAMSegmentLib.errors import SAMSegmentError

    scene, _ = mrml
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    volume.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(SAMSegmentError, match="non-linear transform.*Harden"):
        geometry.ijk_to_ras_matrix(volume)
