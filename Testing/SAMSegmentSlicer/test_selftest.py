"""The module self-test flow (the same one SAMSegmentTest runs in Slicer) on headless MRML, and
the logic methods that only the module panel calls."""

from __future__ import annotations

import types

import numpy as np
import pytest

from SAMSegmentSlicer.selftest import slice_node_through
from SAMSegmentSlicer.logic import SAMSegmentCore
from SAMSegmentSlicer.selftest import make_oblique_phantom, run_logic_flow


@pytest.fixture
def core(mrml, backend):
    from SAMSegmentLib.session import SegmentationSession

    scene, app = mrml
    c = SAMSegmentCore(scene, app)
    session = SegmentationSession(model=backend)
    session.prefetch = lambda *a, **k: 0  # off: no test reads a neighbour; its encodes outlive the test
    c.use_session(session)
    yield c
    c.close()


@pytest.mark.slow  # a propagation through MRML
@pytest.mark.parametrize("orientation", ["Axial"])  # other orientations: test_logic.py
def test_self_test_flow(mrml, core, orientation):
    report = run_logic_flow(mrml[0], core, orientation=orientation)
    assert report["preview_dice"] > 0.9 and report["slice_dice"] > 0.9
    assert report["outside_slice_voxels"] == 0
    assert report["volume_dice"] > 0.85 and report["slices_written"] >= 4
    assert report["anchor_kept"]
    assert report["undo_exact"] and report["source_unchanged"]


def test_active_view_is_the_one_holding_the_last_prompt(mrml, core):
    scene, _ = mrml
    volume, truth = make_oblique_phantom(scene)
    core.set_inputs(volume, None)
    from SAMSegmentSlicer.geometry import ijk_to_ras

    centre = ijk_to_ras(volume, [[28, 24, 7]])[0]
    views = {o: slice_node_through(scene, volume, o, centre) for o in ("Axial", "Coronal", "Sagittal")}
    core.prompts.ensure_nodes()
    core.prompts.observe(lambda: None)
    # a point on the sagittal plane only (moved off the axial and coronal planes)
    off = ijk_to_ras(volume, [[28, 40, 3]])[0]
    core.prompts.add_point(off, include=True)
    assert core.active_view(list(views.values())).axis == 2
    core.prompts.include_node.SetNthControlPointPositionWorld(0, *ijk_to_ras(volume, [[10, 24, 2]])[0])
    assert core.active_view(list(views.values())).axis == 1


def test_configure_from_parameters_and_rules(mrml, core):
    scene, _ = mrml
    volume, _ = make_oblique_phantom(scene)
    params = types.SimpleNamespace(model="", checkpoint="", device="auto", windowFromDisplay=True,
                                   inputVolume=volume, segmentation=None, segmentID="", includePoints=None,
                                   excludePoints=None, boxROI=None, minIoU=0.3, minScore=0.1,
                                   minIntensityAgreement=0.4, limitRange=True, rangeFirst=2, rangeLast=9)
    core.model_key = ("litemedsam", "", "", "")  # the fixture's session already holds LiteMedSAM
    core.configure_from_parameters(params)
    assert params.segmentation is not None and params.segmentID
    assert params.includePoints is not None and params.boxROI is not None
    assert (core.window.low, core.window.high) == (-100, 500)
    rules = core.rules_from_parameters(params)
    assert (rules.min_iou, rules.min_score, rules.min_intensity_agreement, rules.index_range) == (0.3, 0.1, 0.4, (2, 9))
    assert "litemedsam" in core.model_ids()
    assert core.session.box_margin == 0.1  # LiteMedSAM's margin on user boxes ...
    params.boxMargin = False
    core.configure_from_parameters(params)
    assert core.session.box_margin == 0.0  # ... and boxes as drawn when the user unticks it
    core.set_box_margin(True)  # the checkbox, between two prompts
    assert core.session.box_margin == 0.1
    status = core.cache_status()
    assert status["slices"] == 0 and status["mib"] == 0


def test_cache_status_counts_encoded_slices(mrml, core):
    from SAMSegmentLib.prompts import Prompts

    scene, _ = mrml
    volume, truth = make_oblique_phantom(scene)
    core.set_inputs(volume, None)
    from SAMSegmentSlicer.geometry import ijk_to_ras

    view = core.view_slice(slice_node_through(scene, volume, "Axial", ijk_to_ras(volume, [[28, 24, 7]])[0]))
    core.session.prefetch = lambda *a, **k: 0  # measure only the prompted slice
    core.segment(view, Prompts(box=np.array([15, 13, 40, 34.0])))
    status = core.cache_status()
    assert status["slices"] == 1 and 0 < status["mib"] < 5
