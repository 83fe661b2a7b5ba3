"""Adaptation to accepted slices from the module's logic (issue 16): real MRML, a real server on
127.0.0.1 serving the eager LiteMedSAM model, everything through ``poll()`` as the module's timer
drives it.

The accepted slices are masks written into the target segment (what Accept writes); the adaptation
uses a quick setting that is always kept, so the tests check the plumbing: the report, predictions
through the adapted decoder, "Use stock model", the revert on another segment or volume, the signed
file saved and loaded, cancel, the order of the requests around a running adaptation, and the
refusals. Every adapter key is a temporary file ($SAMSEGMENT_ADAPTER_KEY), for the server in this
process too; nothing is written into the user's configuration.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from SAMSegmentLib.adaptation import KEY_ENV, MAGIC, AdaptSettings
from SAMSegmentLib.errors import CancelledError, SAMSegmentError
from SAMSegmentLib.prompts import Prompts
from SAMSegmentSlicer import geometry
from SAMSegmentSlicer.logic import ADAPTER_SUFFIX, SAMSegmentCore, spread_slices
from SAMSegmentSlicer.selftest import add_volume, box_phantom, slice_node_through
from SAMSegmentSlicer.server_link import RemoteServer

QUICK = AdaptSettings(check_steps=2, final_steps=1, min_gain=-1.0, mirror_min_gain=-1.0)  # always kept, quickly
ACCEPTED = (5, 7, 9)  # slices of the block (k 4-10) accepted along axis 0; 7 is held back
PROBE = 6  # a slice not accepted, prompted to compare the models


@pytest.fixture(autouse=True)
def adapter_key(tmp_path, monkeypatch):
    """The adapter key of this test: the server runs in this process and reads it on every use."""
    path = tmp_path / "keys" / "adapter-signing.key"
    monkeypatch.setenv(KEY_ENV, str(path))
    return path


def _scene(scene):
    vol, truth = box_phantom()
    volume = add_volume(scene, vol)
    volume.GetDisplayNode().SetAutoWindowLevel(False)
    volume.GetDisplayNode().SetWindowLevel(600, 200)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "adapt")
    seg.CreateDefaultDisplayNodes()
    return volume, seg, truth


@pytest.fixture
def world(mrml, link):
    scene, app = mrml
    volume, seg, truth = _scene(scene)
    core = SAMSegmentCore(scene, app, link=link)
    core.adaptation_settings = QUICK
    notes: list[str] = []
    core.on_status = notes.append
    core.set_inputs(volume, seg)
    core.wait_idle()  # the volume is on the server
    yield scene, core, volume, seg, truth, notes
    core.close()


@pytest.fixture
def offline(mrml):
    """The logic with a server that is never contacted (the refusals come before any request)."""
    scene, app = mrml
    volume, seg, truth = _scene(scene)
    core = SAMSegmentCore(scene, app, link=RemoteServer("http://127.0.0.1:9", "unused"))
    core.set_inputs(volume, seg)
    yield core, truth
    core.close()


def accept_slices(core, truth, slices=ACCEPTED):
    """What Accept writes on each slice: the block's mask, in the target segment."""
    for k in slices:
        core.writer.write_slice(core.segment_id, 0, k, truth[k], "replace")


def probe_view(scene, core, volume, truth, index=PROBE):
    centre = np.round(np.argwhere(truth).mean(axis=0)).astype(int)  # (k, j, i)
    centre[0] = index
    view = core.view_slice(slice_node_through(scene, volume, "Axial", geometry.ijk_to_ras(volume, [centre[::-1]])[0]))
    assert (view.axis, view.index) == (0, index)
    return view


def predict(core, view, truth):
    """(mask, score) of a box around the block on ``view``'s slice, decoded afresh (no refinement)."""
    ys, xs = np.nonzero(truth[view.index])
    core.request(view, Prompts(box=[xs.min() - 1, ys.min() - 1, xs.max() + 1, ys.max() + 1]), refine=False)
    prediction = core.wait_for_requests()
    return prediction.mask.copy(), float(prediction.score)


def same(a, b) -> bool:
    return np.array_equal(a[0], b[0]) and a[1] == b[1]


def poll_to_end(core, task, timeout=300.0, each=None):
    """Drive the task as the module's 40 ms timer does; ``each()`` runs after every poll."""
    deadline = time.monotonic() + timeout
    while True:
        done = core.poll_task(task)
        if each is not None:
            each()
        if done:
            return task.output
        assert time.monotonic() < deadline, core.server_status()
        time.sleep(0.01)


# --------------------------------------------------------------------------------------- refusals (no server)
def test_no_accepted_slice_is_a_clear_error(offline):
    core, _ = offline
    with pytest.raises(SAMSegmentError) as caught:
        core.start_adaptation(axis=0)
    assert "no accepted slice" in caught.value.problem and "accept the mask on 2-3 slices" in caught.value.remedy
    assert not core.adapting and not core.adapter_in_use


def test_save_and_load_refusals(offline, tmp_path):
    core, truth = offline
    with pytest.raises(SAMSegmentError, match="No adapter is in use"):
        core.start_save_adapter(tmp_path / f"a{ADAPTER_SUFFIX}")
    with pytest.raises(SAMSegmentError, match="not found"):
        core.start_load_adapter(tmp_path / f"missing{ADAPTER_SUFFIX}")
    other = tmp_path / f"other{ADAPTER_SUFFIX}"
    other.write_bytes(b"PK\x03\x04 not an adapter")
    with pytest.raises(SAMSegmentError, match="not a SAMSegment adapter file"):
        core.start_load_adapter(other)
    # an existing file is never replaced without asking
    core.adapter_segment, core._adapter_file = core.segment_id, MAGIC + b"fake"
    with pytest.raises(SAMSegmentError) as caught:
        core.start_save_adapter(other)
    assert "not replaced without asking" in caught.value.problem
    assert other.read_bytes().startswith(b"PK")


def test_slices_are_spread_over_the_structure():
    assert spread_slices([3, 1, 2], 8) == [1, 2, 3]
    picked = spread_slices(list(range(10, 70)), 8)
    assert len(picked) == 8 and picked[0] == 10 and picked[-1] == 69 and picked == sorted(set(picked))


# --------------------------------------------------------------------------------------- with the server
@pytest.mark.slow  # one adaptation (~10 s on 2 cores), a save and a load
def test_adapt_use_stock_save_load_and_revert_on_another_segment_or_volume(world, tmp_path, monkeypatch):
    scene, core, volume, seg, truth, notes = world
    view = probe_view(scene, core, volume, truth)
    stock = predict(core, view, truth)
    accept_slices(core, truth)

    task = core.start_adaptation(axis=0)
    assert core.adapting and "Adapting the model to 'SAM' (3 slices: 5, 7, 9)" in notes[-1]
    seen = []
    report = poll_to_end(core, task, each=lambda: seen.append(task.progress))
    assert report is core.adaptation_report and report.kept and report.slices == ACCEPTED
    assert report.held_back == "slice 7" and report.structure == "SAM" and report.steps == 3
    assert any(total == 3 and 0 < done < 3 for done, total, _ in seen)  # the training's progress
    assert not core.adapting and core.adapter_in_use and core.session.adapter_in_use
    assert notes[-1].startswith("Adaptation kept: Dice on held-back slice 7 ") and "this structure only" in notes[-1]
    assert core.describe_adapter().startswith("Adapted model in use for this segment (adapted to slices 5, 7, 9)")

    adapted = predict(core, view, truth)
    assert not same(adapted, stock)  # every decode of the session goes through the adapter

    # Save: the signed file, written once; never over an existing file without asking
    path = core.save_adapter(tmp_path / f"liver{ADAPTER_SUFFIX}")
    data = path.read_bytes()
    assert data.startswith(MAGIC) and len(data) > 1_000_000 and str(path) in notes[-1]
    with pytest.raises(SAMSegmentError, match="not replaced without asking"):
        core.save_adapter(path)
    assert core.save_adapter(path, overwrite=True) == path and path.read_bytes() == data

    # Use stock model: one call back to the stock predictions
    core.use_stock_model()
    assert not core.adapter_in_use and core.describe_adapter() == "Stock model in use."
    assert same(predict(core, view, truth), stock) and not core.session.adapter_in_use

    # Load: the saved adapter gives the adapted predictions again
    info = core.load_adapter(path)
    assert info["structure"] == "SAM" and core.adapter_in_use and core.session.adapter_in_use
    assert "liver.samadapter" in notes[-1] and "kept: Dice" in notes[-1]
    assert same(predict(core, view, truth), adapted)

    # the session reopened with the same volume (another box setting) gets the adapter back
    core.set_box_margin(False)
    core.wait_idle()
    assert core.adapter_in_use and core.session.adapter_in_use
    core.set_box_margin(True)
    core.wait_idle()
    assert same(predict(core, view, truth), adapted)

    # another segment: back to the stock model, said so
    other = seg.GetSegmentation().AddEmptySegment("", "kidney")
    core.set_segment(other)
    assert not core.adapter_in_use and "Segment 'kidney' selected: back to the stock model" in notes[-1]
    assert same(predict(core, view, truth), stock) and not core.session.adapter_in_use

    # another volume: the stock model too
    core.set_segment(seg.GetSegmentation().GetSegmentIdBySegmentName("SAM"))
    core.load_adapter(path)
    assert core.adapter_in_use
    copy = add_volume(scene, np.asarray(box_phantom()[0]), name="second scan")
    core.set_inputs(copy, seg, core.segment_id)
    assert not core.adapter_in_use and notes[-1].startswith("A new volume")
    core.wait_idle()
    assert not core.session.adapter_in_use

    # a file signed with another key (another site) is refused by the server, and said so
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "other-site.key"))
    with pytest.raises(SAMSegmentError, match="not signed with this machine's adapter key"):
        core.load_adapter(path)
    assert not core.adapter_in_use and not core.session.adapter_in_use
    assert notes[-1].startswith("The adapter was not loaded: ")


@pytest.mark.slow  # an adaptation cancelled after its first step
def test_cancel_mid_run_leaves_the_stock_model_and_requests_keep_their_order(world):
    scene, core, volume, seg, truth, notes = world
    view = probe_view(scene, core, volume, truth)
    stock = predict(core, view, truth)
    accept_slices(core, truth)
    task = core.start_adaptation(axis=0, settings=AdaptSettings(check_steps=200, final_steps=0, min_gain=-1.0))
    # a propagation asked for meanwhile waits for the adaptation's outcome; a prompt does not
    job = core.start_propagation("up", axis=0)
    deadline = time.monotonic() + 120
    while task.progress[0] < 1:
        core.poll_task(task)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert core.adapting and "job" in [item.kind for item in core._lane]  # not started on the server yet
    assert same(predict(core, view, truth), stock)  # served while the adaptation trains
    assert core.adapting
    task.cancel.cancel()
    with pytest.raises(CancelledError):
        poll_to_end(core, task)
    assert task.progress[0] < 200  # stopped between steps
    assert notes[-1] == "Adaptation cancelled: the stock model stays."
    assert not core.adapter_in_use and not core.session.adapter_in_use and core.adaptation_report is None
    assert job.running and not job.written
    # the held propagation starts once the adaptation ended; no adaptation while it writes into the segment
    with pytest.raises(SAMSegmentError, match="A propagation is running"):
        core.start_adaptation(axis=0)
    while not job.finished:
        if core.poll_propagation(job):
            job.cancel.cancel()  # one slice shows it ran; the rest is propagation's own business
        assert time.monotonic() < deadline + 120
        time.sleep(0.01)
    assert job.error is None and job.result is not None and job.written
    assert same(predict(core, view, truth), stock)


@pytest.mark.slow  # an adaptation not kept, then one cancelled by a segment switch
def test_not_kept_and_another_segment_cancels_a_running_adaptation(world):
    scene, core, volume, seg, truth, notes = world
    accept_slices(core, truth, slices=(6,))  # one slice: the held-back view is its mirror image
    report = core.adapt(axis=0, settings=AdaptSettings(check_steps=1, final_steps=3, min_gain=1.0,
                                                       mirror_min_gain=1.0))  # cannot gain 1
    assert not report.kept and report.held_back == "slice 6 mirrored" and report.steps == 1
    assert not core.adapter_in_use and not core.session.adapter_in_use and core.adaptation_report is report
    assert notes[-1].startswith("Adaptation not kept: Dice on held-back slice 6 mirrored ")
    assert notes[-1].endswith("(the stock model stays).")
    assert core.describe_adapter() == "Stock model in use."

    accept_slices(core, truth)
    task = core.start_adaptation(axis=0, settings=AdaptSettings(check_steps=200, final_steps=0, min_gain=-1.0))
    deadline = time.monotonic() + 120
    while task.progress[0] < 1:
        core.poll_task(task)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    core.set_segment(seg.GetSegmentation().AddEmptySegment("", "spleen"))
    assert "another segment was selected" in notes[-1]
    with pytest.raises(CancelledError):
        poll_to_end(core, task)
    assert not core.adapter_in_use and not core.session.adapter_in_use


class RestartedServer:
    """A restartable link (as the local server's): the server behind it is replaced on a new port."""

    restartable = True
    error = None

    def __init__(self, handle, token: str) -> None:
        self.token = token
        self.replace(handle)

    def replace(self, handle) -> None:
        self.handle, self.url = handle, handle.url

    def poll(self):
        return "ready", self.url, self.token

    def describe(self) -> str:
        return f"test server {self.handle.url}"

    def stop(self) -> None:
        self.handle.stop()


@pytest.mark.slow  # two servers in this process
def test_a_restarted_server_gets_the_adapter_in_use_back(mrml, backend, tmp_path):
    """The logic sends the volume again to a restarted server; the adapter in use goes with it."""
    from conftest import SERVER_TOKEN
    from SAMSegmentLib.adaptation import DecoderAdapter, trained_parameters
    from SAMSegmentLib.server.serve import ServerHandle
    from SAMSegmentLib.server.state import Limits, ServerState

    def server():
        return ServerHandle(ServerState(Limits(max_prefetch_radius=0), backends=(backend,)), SERVER_TOKEN).start()

    scene, app = mrml
    volume, seg, truth = _scene(scene)
    link = RestartedServer(server(), SERVER_TOKEN)
    core = SAMSegmentCore(scene, app, link=link)
    notes: list[str] = []
    core.on_status = notes.append
    try:
        core.set_inputs(volume, seg)
        core.wait_idle()
        view = probe_view(scene, core, volume, truth)
        stock = predict(core, view, truth)
        tensors = {name: p.detach().cpu().numpy() + 0.02 for name, p in
                   trained_parameters(backend.net.mask_decoder).items()}
        path = DecoderAdapter(backend.spec.id, backend.model_sha256, tensors, "SAM").save(tmp_path / "a.samadapter")
        core.load_adapter(path)
        adapted = predict(core, view, truth)
        assert not same(adapted, stock) and core.adapter_in_use
        first = link.handle
        first.stop()  # the server dies; the next request finds it gone
        ys, xs = np.nonzero(truth[view.index])
        core.request(view, Prompts(box=[xs.min() - 1, ys.min() - 1, xs.max() + 1, ys.max() + 1]), refine=False)
        deadline = time.monotonic() + 60
        while core.connected:
            core.poll()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        link.replace(server())  # restarted on another port: the logic sends the volume again
        again = core.wait_for_requests()
        assert same((again.mask, float(again.score)), adapted)
        assert core.adapter_in_use and core.session.adapter_in_use
        assert not any("stock model" in note for note in notes[-2:])
    finally:
        core.close()
        link.stop()
