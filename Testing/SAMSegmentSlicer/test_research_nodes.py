"""Everything mode, SAMAug priors and the uncertainty overlay, as nodes in a real MRML scene."""

from __future__ import annotations

import numpy as np
import pytest

from SAMSegmentSlicer.selftest import add_volume, slice_node_through
from SAMSegmentSlicer import geometry, research_nodes
from SAMSegmentSlicer.logic import SAMSegmentCore
from SAMSegmentSlicer.segment_io import segment_array


@pytest.fixture
def disks(mrml, link):
    """Three separate bright disks in a soft-tissue body, 3 slices, oblique geometry."""
    from phantoms import disks_ct  # Testing/SAMSegmentLib, on the path through pyproject.toml

    scene, app = mrml
    vol, masks = disks_ct(shape=(3, 96, 96))
    volume = add_volume(scene, vol)
    core = SAMSegmentCore(scene, app, link=link)
    core.set_inputs(volume, None, window=(-160, 240))
    yield scene, core, volume, masks
    core.close()


PARAMS = {"points_per_side": 5, "box_scales": (0.25,)}  # what finds all three disks (test_automatic.py)


def test_label_array_becomes_one_segment_per_label_exactly(mrml):
    scene, _ = mrml
    volume = add_volume(scene, np.zeros((5, 20, 24), np.int16))
    labels = np.zeros((5, 20, 24), np.int32)
    labels[1, 2:6, 3:9] = 1
    labels[1, 10:15, 10:20] = 2
    labels[3, 4:8, 4:8] = 3
    seg = research_nodes.labels_to_segmentation(scene, volume, labels, "found")
    ids = list(seg.GetSegmentation().GetSegmentIDs())
    assert len(ids) == 3
    arrays = sorted((segment_array(seg, sid, volume) for sid in ids),
                    key=lambda a: int(np.argwhere(a)[0][0] * 1000 + np.argwhere(a)[0][1]))
    for value, arr in zip((1, 2, 3), arrays):
        assert np.array_equal(arr.astype(bool), labels == value)
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0  # temporary removed


@pytest.mark.slow  # everything mode
def test_everything_on_a_slice_fills_a_new_segmentation(disks):
    from SAMSegmentLib.automatic import EverythingParams

    scene, core, volume, masks = disks
    view = core.view_slice(slice_node_through(scene, volume, "Axial", geometry.ijk_to_ras(volume, [[48, 48, 1]])[0]))
    seg = research_nodes.everything_to_segmentation(core, view=view, params=EverythingParams(**PARAMS))
    ids = list(seg.GetSegmentation().GetSegmentIDs())
    found = np.stack([segment_array(seg, sid, volume).astype(bool) for sid in ids])
    assert not found[:, [0, 2]].any()  # only the prompted slice
    for disk in masks:  # one segment per disk
        best = max(2 * (f[1] & disk).sum() / (f[1].sum() + disk.sum()) for f in found)
        assert best > 0.85
    assert seg is not core.segmentation_node  # the user's segmentation is untouched


@pytest.mark.slow  # everything mode on every slice
def test_samaug_priors_become_volumes_with_source_geometry(disks):
    from SAMSegmentLib.automatic import EverythingParams

    import slicer

    scene, core, volume, masks = disks
    params = EverythingParams(**PARAMS)
    seg_node, bnd_node = core.run_task(  # as the module runs it: computed on the server, nodes here
        "samaug", lambda progress, cancel: research_nodes.samaug_flow(core, 0, params, progress, cancel),
        lambda priors: research_nodes.priors_to_volumes(core, *priors))
    seg_prior = slicer.util.arrayFromVolume(seg_node)
    bnd_prior = slicer.util.arrayFromVolume(bnd_node)
    assert seg_prior.shape == bnd_prior.shape == (3, 96, 96)
    for disk in masks:
        assert (seg_prior[:, disk] > 0).mean() > 0.9
    assert not bnd_prior[:, 48, 2].any()  # far from any region boundary
    assert np.allclose(geometry.ijk_to_ras_matrix(seg_node), geometry.ijk_to_ras_matrix(volume))


@pytest.mark.slow  # jittered decodes on every slice
def test_uncertainty_overlay_toggles(disks):
    from SAMSegmentLib.prompts import Prompts

    scene, core, volume, masks = disks
    view = core.view_slice(slice_node_through(scene, volume, "Axial", geometry.ijk_to_ras(volume, [[48, 48, 1]])[0]))
    ys, xs = np.nonzero(masks[2])
    core.segment(view, Prompts(box=[xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2]))
    mean, entropy = research_nodes.show_uncertainty(core, n=8, jitter=0.15)
    assert mean.shape == entropy.shape == (96, 96)
    display = core.preview.node.GetDisplayNode()
    assert display.GetSegmentVisibility("uncertain")
    core.preview.set_uncertainty_visible(False)
    assert not display.GetSegmentVisibility("uncertain")
    # disagreement sits on the disk's rim, not in its centre
    assert entropy[int(ys.mean()), int(xs.mean())] < research_nodes.UNCERTAIN_ENTROPY_BITS
