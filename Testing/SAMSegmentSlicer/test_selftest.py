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
def core(mrml, link):
    scene, app = mrml
    c = SAMSegmentCore(scene, app, link=link)
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


def test_configure_from_parameters_and_rules(mrml, core, engine_server):
    scene, _ = mrml
    volume, _ = make_oblique_phantom(scene)
    params = types.SimpleNamespace(model="", checkpoint="", device="auto", windowFromDisplay=True,
                                   inputVolume=volume, segmentation=None, segmentID="", includePoints=None,
                                   excludePoints=None, boxROI=None, minIoU=0.3, minScore=0.1,
                                   minIntensityAgreement=0.4, limitRange=True, rangeFirst=2, rangeLast=9)
    core.configure_from_parameters(params)
    core.wait_idle()
    assert params.segmentation is not None and params.segmentID
    assert params.includePoints is not None and params.boxROI is not None
    assert (core.window.low, core.window.high) == (-100, 500)
    rules = core.rules_from_parameters(params)
    assert (rules.min_iou, rules.min_score, rules.min_intensity_agreement, rules.index_range) == (0.3, 0.1, 0.4, (2, 9))
    assert "litemedsam" in core.model_ids()

    def server_margin() -> float:
        core.wait_idle()
        return engine_server.state.session(core.session.session_id).session.box_margin

    assert server_margin() == 0.1  # LiteMedSAM's margin on user boxes ...
    params.boxMargin = False
    core.configure_from_parameters(params)
    assert server_margin() == 0.0  # ... and boxes as drawn when the user unticks it
    core.set_box_margin(True)  # the checkbox, between two prompts
    assert server_margin() == 0.1


def test_server_status_names_the_server_and_its_device(mrml, core, engine_server):
    from SAMSegmentLib.prompts import Prompts

    scene, _ = mrml
    volume, truth = make_oblique_phantom(scene)
    core.set_inputs(volume, None)
    from SAMSegmentSlicer.geometry import ijk_to_ras

    view = core.view_slice(slice_node_through(scene, volume, "Axial", ijk_to_ras(volume, [[28, 24, 7]])[0]))
    core.segment(view, Prompts(box=np.array([15, 13, 40, 34.0])))
    core.wait_idle()
    status = core.server_status()
    assert engine_server.url in status and "cpu" in status and "idle" in status
