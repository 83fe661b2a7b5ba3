"""The SAMSegment logic end to end on real MRML with the real LiteMedSAM model.

A bright block in an oblique, mirrored, anisotropic volume is prompted through Markups in each
view orientation; the accepted mask must land on the block's voxels of exactly that slice, undo
must restore the segment exactly, a cancelled propagation must leave a consistent segment that one
undo removes. (The full propagation flow is test_selftest.py, shared with the in-Slicer self-test.)
"""

from __future__ import annotations

import numpy as np
import pytest

from SAMSegmentLib.metrics import dice
from SAMSegmentSlicer.selftest import add_volume, box_phantom, slice_node_through
from SAMSegmentSlicer import geometry
from SAMSegmentSlicer.logic import SAMSegmentCore
from SAMSegmentSlicer.segment_io import segment_array

ORIENTATIONS = {"Axial": 0, "Coronal": 1, "Sagittal": 2}


@pytest.fixture
def world(mrml, link):
    scene, app = mrml
    vol, truth = box_phantom()
    volume = add_volume(scene, vol)
    volume.GetDisplayNode().SetAutoWindowLevel(False)
    volume.GetDisplayNode().SetWindowLevel(600, 200)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.CreateDefaultDisplayNodes()
    core = SAMSegmentCore(scene, app, link=link)
    core.set_inputs(volume, seg)
    core.wait_idle()  # the volume is on the server
    yield scene, core, volume, seg, vol, truth
    core.close()


def block_box(truth, axis, index, margin=1):
    """The block's box on one slice in slice pixels (x0, y0, x1, y1)."""
    ys, xs = np.nonzero(np.take(truth, index, axis))
    return np.array([xs.min() - margin, ys.min() - margin, xs.max() + margin, ys.max() + margin], float)


def centre_ras(volume, truth):
    centre_ijk = np.argwhere(truth).mean(axis=0)[::-1]  # (i, j, k)
    return geometry.ijk_to_ras(volume, [np.round(centre_ijk)])[0], np.round(centre_ijk).astype(int)


def test_window_comes_from_the_display_node(world):
    _, core, *_ = world
    assert (core.window.low, core.window.high) == (-100, 500)


def box_corners(volume, truth, axis, index, margin=1):
    """RAS corners of the block's bounding box on one slice, drawn as a user would."""
    lo, hi = np.argwhere(truth).min(axis=0) - margin, np.argwhere(truth).max(axis=0) + margin  # (k, j, i)
    lo[axis] = hi[axis] = index
    return geometry.ijk_to_ras(volume, [lo[::-1], hi[::-1]])


# Axial in the fast tier; the other two views are slow
@pytest.mark.parametrize("orientation", [o if o == "Axial" else pytest.param(o, marks=pytest.mark.slow)
                                         for o in sorted(ORIENTATIONS)])
def test_box_prompt_in_each_view_writes_the_right_voxels(world, orientation):
    import slicer

    scene, core, volume, seg, vol, truth = world
    ras, ijk = centre_ras(volume, truth)
    node = slice_node_through(scene, volume, orientation, ras)
    calls = []
    core.watch_markups(lambda: calls.append(1) or core.view_slice(node), asynchronous=False)
    axis = ORIENTATIONS[orientation]
    index = int(ijk[geometry.ijk_component(axis)])
    a, b = box_corners(volume, truth, axis, index)
    core.prompts.set_box(a, b, geometry.vtk_to_numpy_matrix(node.GetSliceToRAS()))
    assert calls, "changing the ROI must re-run the decoder"
    view = core.current_view
    assert (view.axis, view.index) == (axis, index)
    expected_plane = np.take(truth, view.index, axis)
    assert dice(core.current.mask, expected_plane) > 0.9
    assert segment_array(seg, core.segment_id, volume).sum() == 0  # preview only until accepted
    core.accept()
    written = segment_array(seg, core.segment_id, volume).astype(bool)
    assert dice(np.take(written, view.index, axis), expected_plane) > 0.9
    others = np.delete(written, view.index, axis)
    assert not others.any(), "nothing may be written outside the prompted slice"
    assert np.array_equal(slicer.util.arrayFromVolume(volume), vol)  # source untouched


def test_markups_points_refine_the_box_and_rerun_on_every_change(world):
    from SAMSegmentLib.errors import PromptError

    scene, core, volume, seg, _, truth = world
    ras, ijk = centre_ras(volume, truth)
    node = slice_node_through(scene, volume, "Axial", ras)
    runs = []
    core.watch_markups(lambda: runs.append(1) or core.view_slice(node), asynchronous=False)
    # LiteMedSAM is box-trained: a lone point is refused with a remedy rather than an empty mask
    errors = []
    core.on_error = errors.append
    core.prompts.add_point(ras, include=True)
    assert isinstance(core.last_error, PromptError) and "box" in str(core.last_error) and errors
    assert core.current is None
    core.prompts.include_node.RemoveAllControlPoints()
    a, b = box_corners(volume, truth, 0, int(ijk[2]), margin=2)
    core.prompts.set_box(a, b, geometry.vtk_to_numpy_matrix(node.GetSliceToRAS()))
    full = core.current.mask.copy()
    n = len(runs)
    # an exclude point on the block's left half, then dragged: each change re-runs the decoder
    lo, hi = np.argwhere(truth).min(axis=0), np.argwhere(truth).max(axis=0)
    left = geometry.ijk_to_ras(volume, [[lo[2] + 3, (lo[1] + hi[1]) // 2, ijk[2]]])[0]
    core.prompts.add_point(left, include=False)
    assert len(runs) > n
    assert core.current_prompts.labels.tolist() == [0]
    excluded = core.current.mask.copy()
    n = len(runs)
    outside = geometry.ijk_to_ras(volume, [[1, 1, ijk[2]]])[0]
    core.prompts.exclude_node.SetNthControlPointPositionWorld(0, *outside)
    assert len(runs) > n
    assert not np.array_equal(core.current.mask, excluded) or not np.array_equal(excluded, full)
    core.prompts.exclude_node.RemoveNthControlPoint(0)
    assert np.array_equal(core.current.mask, full)  # same prompts, same mask


def test_roi_box_prompt(world):
    scene, core, volume, seg, _, truth = world
    ras, ijk = centre_ras(volume, truth)
    node = slice_node_through(scene, volume, "Axial", ras)
    core.watch_markups(lambda: core.view_slice(node), asynchronous=False)
    lo, hi = np.argwhere(truth).min(axis=0), np.argwhere(truth).max(axis=0)
    a = geometry.ijk_to_ras(volume, [[lo[2] - 1, lo[1] - 1, ijk[2]]])[0]
    b = geometry.ijk_to_ras(volume, [[hi[2] + 1, hi[1] + 1, ijk[2]]])[0]
    core.prompts.set_box(a, b, geometry.vtk_to_numpy_matrix(node.GetSliceToRAS()))
    assert core.current is not None
    assert core.current_prompts.box is not None
    assert dice(core.current.mask, truth[ijk[2]]) > 0.9


def test_accept_then_undo_restores_segment_exactly(world):
    scene, core, volume, seg, _, truth = world
    ras, ijk = centre_ras(volume, truth)
    node = slice_node_through(scene, volume, "Axial", ras)
    view = core.view_slice(node)
    # something the user painted before, on the same slice
    from SAMSegmentLib.prompts import Prompts

    painted = np.zeros(truth.shape[1:], dtype=bool)
    painted[:5, :5] = True
    core.writer.write_slice(core.segment_id, 0, view.index, painted)
    before = segment_array(seg, core.segment_id, volume)
    core.segment(view, Prompts(box=block_box(truth, 0, view.index)))
    core.accept()
    assert not np.array_equal(segment_array(seg, core.segment_id, volume), before)
    assert core.undo_edit()
    assert np.array_equal(segment_array(seg, core.segment_id, volume), before)


def test_asynchronous_request_matches_blocking(world):
    from SAMSegmentLib.prompts import Prompts

    scene, core, volume, seg, _, truth = world
    ras, ijk = centre_ras(volume, truth)
    view = core.view_slice(slice_node_through(scene, volume, "Axial", ras))
    prompts = Prompts(box=block_box(truth, 0, view.index))
    core.request(view, Prompts(box=[1.0, 1.0, 8.0, 8.0]))  # superseded
    core.request(view, prompts)
    shown = core.wait_for_requests()
    blocking = core.session.predict(view.ref, prompts, refine=False)  # same box, same margin
    assert shown is not None and np.array_equal(core.current_prompts.box, prompts.box)
    assert np.array_equal(shown.mask, blocking.mask)


@pytest.mark.slow  # a propagation through MRML
def test_cancelled_propagation_is_consistent_and_one_undo_step(world):
    from SAMSegmentLib.prompts import Prompts

    scene, core, volume, seg, _, truth = world
    ras, ijk = centre_ras(volume, truth)
    view = core.view_slice(slice_node_through(scene, volume, "Axial", ras))
    core.segment(view, Prompts(box=block_box(truth, 0, view.index)))
    core.accept()
    after_accept = segment_array(seg, core.segment_id, volume)
    job = core.propagate("up", cancel_after=1)
    assert job.result is not None and job.result.cancelled
    current = segment_array(seg, core.segment_id, volume)
    filled = sorted(int(i) for i in np.nonzero(current.any(axis=(1, 2)))[0])
    assert filled == sorted({view.index, *job.written})
    for index in job.written:  # each written slice is exactly what the engine decided
        assert np.array_equal(current[index].astype(bool), job.result.masks[index])
    assert len(job.written) < truth.any(axis=(1, 2)).sum() - 1
    assert core.undo_edit()
    assert np.array_equal(segment_array(seg, core.segment_id, volume), after_accept)


def test_errors_are_clear(world):
    from SAMSegmentLib.errors import SAMSegmentError

    scene, core, volume, seg, _, _ = world
    with pytest.raises(SAMSegmentError, match="no proposal"):
        core.accept()
    with pytest.raises(SAMSegmentError, match="empty"):
        core.propagate("both")
    with pytest.raises(SAMSegmentError, match="No source volume"):
        SAMSegmentCore(scene).set_inputs(None, seg)
    idle = SAMSegmentCore(scene)  # the module's timer polls before Start: silent, nothing asked for
    assert idle.poll() is None and not idle.busy
    idle.set_inputs(volume, seg)
    with pytest.raises(SAMSegmentError, match="No SAMSegment server is configured"):
        idle.view_slice(scene.AddNewNodeByClass("vtkMRMLSliceNode"))


@pytest.mark.slow  # a propagation through MRML
def test_closing_the_scene_cancels_running_work_and_writes_nothing_afterwards(world):
    """Review finding 15: StartCloseEvent precedes vtkMRMLScene::Clear; the module releases the
    scene there, so neither propagation slices nor a task's result land in the next scene."""
    from SAMSegmentLib.client import Pause
    from SAMSegmentLib.prompts import Prompts

    scene, core, volume, seg, _, truth = world
    ras, _ = centre_ras(volume, truth)
    view = core.view_slice(slice_node_through(scene, volume, "Axial", ras))
    core.segment(view, Prompts(box=block_box(truth, view.axis, view.index)))
    core.accept()
    job = core.start_propagation("both", axis=view.axis)
    finished = []

    def slow(progress, cancel):  # a server request that runs until cancelled
        while not cancel.cancelled:
            yield Pause(0.01)
        return "cancelled"

    task = core.start_task("slow", slow, lambda result: finished.append(result))
    core.poll()
    core.release_scene(job, task)
    scene.Clear(False)
    assert job.cancel.cancelled and task.cancel.cancelled
    assert core.writer is None and core.segmentation_node is None and core.volume_node is None
    core.wait_idle(timeout=120)  # the server job ends (cancelled); the task's request is dropped or returns
    assert not core.busy and core.poll_task(task) and finished == []  # its finish() never runs
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_module_logic_initialises_the_core_once():
    """Review finding 17. SAMSegment.py cannot be imported without Qt; its bases are read from the
    source and combined with ScriptedLoadableModuleLogic's initialiser as Slicer 5.10 has it
    (Base/Python/slicer/ScriptedLoadableModule.py l.296-308: ``super().__init__()`` first)."""
    import ast
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "SAMSegment" / "SAMSegment.py").read_text(encoding="utf-8")
    cls = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "SAMSegmentLogic")
    assert [ast.unparse(b) for b in cls.bases] == ["SAMSegmentCore", "ScriptedLoadableModuleLogic"]
    calls = []

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__[:-5]
            self.isSingletonParameterNode = True

    class CountingCore(SAMSegmentCore):
        def __init__(self, *args, **kwargs):
            calls.append(args)
            super().__init__(*args, **kwargs)

    class SAMSegmentLogic(CountingCore, ScriptedLoadableModuleLogic):
        def __init__(self, scene):
            CountingCore.__init__(self, scene, None)
            ScriptedLoadableModuleLogic.__init__(self)

    scene = __import__("slicer").vtkMRMLScene()
    logic = SAMSegmentLogic(scene)
    assert len(calls) == 1 and logic.scene is scene and logic.moduleName == "SAMSegment"


@pytest.mark.slow  # a propagation through MRML
def test_the_box_roi_as_a_3d_box_prompt(world):
    """Issue 15 in Slicer: the ROI is already a 3D box. With an empty segment and "keep within the
    box", its middle slice is segmented from its box and the propagation stays inside it: no slice
    outside its range, no voxel outside it; one Undo removes it all."""
    scene, core, volume, seg, _, truth = world
    ras, ijk = centre_ras(volume, truth)
    node = slice_node_through(scene, volume, "Axial", ras)
    core.prompts.ensure_nodes()
    lo, hi = np.argwhere(truth).min(axis=0), np.argwhere(truth).max(axis=0)  # (k, j, i)
    lo_k, hi_k = int(lo[0]) + 1, int(hi[0]) - 1  # the box covers all but the block's end slices
    a = geometry.ijk_to_ras(volume, [[lo[2] - 1, lo[1] - 1, lo_k]])[0]
    b = geometry.ijk_to_ras(volume, [[hi[2] + 1, hi[1] + 1, hi_k]])[0]
    core.prompts.set_box(a, b, geometry.vtk_to_numpy_matrix(node.GetSliceToRAS()))
    box = core.prompts.box3d(volume, truth.shape)
    assert box["lo"][0] == lo_k and box["hi"][0] == hi_k
    before = segment_array(seg, core.segment_id, volume)
    job = core.propagate("both", axis=0, within_roi=True)
    written = segment_array(seg, core.segment_id, volume).astype(bool)
    filled = np.nonzero(written.any(axis=(1, 2)))[0]
    assert filled.min() >= lo_k and filled.max() <= hi_k and len(filled) >= hi_k - lo_k  # inside its range
    inside = np.zeros_like(written)
    inside[box["lo"][0]:box["hi"][0] + 1, box["lo"][1]:box["hi"][1] + 1, box["lo"][2]:box["hi"][2] + 1] = True
    assert not (written & ~inside).any()  # no voxel outside the box
    assert dice(written, truth & inside) > 0.85 and job.result is not None
    middle = (lo_k + hi_k) // 2
    assert f"Started from the box's middle slice, {middle} (model score" in core.describe_job(job)
    assert core.undo_edit() and np.array_equal(segment_array(seg, core.segment_id, volume), before)
    core.current_view = view = core.view_slice(node)  # the user is on this slice: it seeds, not the middle
    job = core.propagate("both", axis=0, within_roi=True)
    assert job.boxes is not None and list(job.boxes) == [view.index] and view.index in job.result.masks
    described = core.describe_job(job)
    assert f"Started from the slice shown, {view.index} (model score" in described and "middle" not in described
    written = segment_array(seg, core.segment_id, volume).astype(bool)
    assert not (written & ~inside).any() and dice(written, truth & inside) > 0.85
