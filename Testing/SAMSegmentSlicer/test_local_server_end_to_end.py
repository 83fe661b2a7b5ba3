"""The module's logic on real MRML driving a real local server: a ``samsegment serve`` child process
started by ``LocalServerLink`` (as the module starts it), end to end: Start, prompt, Accept,
Propagate, Cancel, Undo; then the server is killed in the middle of a propagation and the logic
restarts it and resumes, with nothing lost and the same final segment as an uninterrupted run.

The interpreter running the tests stands in for the server environment's (it has the server's
packages; test_local_server.py checks the commands that would create that environment).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from SAMSegmentLib.prompts import Prompts
from SAMSegmentSlicer.geometry import ijk_to_ras
from SAMSegmentSlicer.logic import SAMSegmentCore
from SAMSegmentSlicer.segment_io import segment_array
from SAMSegmentSlicer.selftest import make_oblique_phantom, slice_node_through
from SAMSegmentSlicer.server_link import LocalServerLink

pytestmark = pytest.mark.slow  # a server process that loads the model, twice


def timed_polls(core: SAMSegmentCore, durations: list[float], until, timeout: float = 180.0) -> None:
    """Drive ``core.poll()`` as the module's 40 ms timer would, recording how long each call took."""
    deadline = time.monotonic() + timeout
    while not until():
        t0 = time.perf_counter()
        core.poll()
        durations.append(time.perf_counter() - t0)
        assert time.monotonic() < deadline, core.server_status()
        time.sleep(0.01)


def test_start_prompt_accept_propagate_cancel_undo_and_a_server_killed_mid_propagation(mrml, tmp_path):
    scene, app = mrml
    link = LocalServerLink(tmp_path / "env", tmp_path / "server.log", python=sys.executable)
    core = SAMSegmentCore(scene, app, link=link)
    polls: list[float] = []
    try:
        volume, truth = make_oblique_phantom(scene)
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "e2e")
        seg.CreateDefaultDisplayNodes()
        t0 = time.perf_counter()
        core.set_inputs(volume, seg)  # Start: the server is launched and the volume queued, nothing waits
        assert time.perf_counter() - t0 < 0.5
        timed_polls(core, polls, lambda: core.connected and not core.busy)
        assert core.window is not None and "local server http://127.0.0.1:" in core.server_status()

        centre = np.round(np.argwhere(truth).mean(axis=0)).astype(int)  # k, j, i
        node = slice_node_through(scene, volume, "Axial", ijk_to_ras(volume, [centre[::-1]])[0])
        view = core.view_slice(node)
        lo, hi = np.argwhere(truth).min(axis=0), np.argwhere(truth).max(axis=0)
        core.request(view, Prompts(box=[lo[2] - 1, lo[1] - 1, hi[2] + 1, hi[1] + 1]))  # prompt
        timed_polls(core, polls, lambda: core.current is not None)
        plane = np.take(truth, view.index, view.axis)
        assert 2 * (core.current.mask & plane).sum() / (core.current.mask.sum() + plane.sum()) > 0.9
        core.accept()  # Accept
        accepted = segment_array(seg, core.segment_id, volume)

        cancelled = core.propagate("both", axis=view.axis, cancel_after=1)  # Propagate, Cancel
        assert cancelled.result is not None and cancelled.result.cancelled and cancelled.written
        assert core.undo_edit()  # Undo: the cancelled run goes in one step
        assert np.array_equal(segment_array(seg, core.segment_id, volume), accepted)

        full = core.propagate("both", axis=view.axis)  # the uninterrupted reference
        reference = segment_array(seg, core.segment_id, volume)
        assert full.result is not None and not full.result.cancelled and len(full.written) >= 4
        assert core.undo_edit()
        assert np.array_equal(segment_array(seg, core.segment_id, volume), accepted)

        job = core.start_propagation("both", axis=view.axis)
        first_server = link.server._process
        timed_polls(core, polls, lambda: core.poll_propagation(job) and len(job.written) >= 1)
        first_server.kill()  # the server dies in the middle of the propagation
        first_server.wait(10)
        written_before = list(job.written)
        timed_polls(core, polls, lambda: (core.poll_propagation(job) or True) and job.finished, timeout=300)
        assert job.resumes == 1 and job.error is None and job.result is not None and not job.result.cancelled
        assert link.server._process is not first_server and link.server._process.poll() is None  # restarted
        assert job.written[:len(written_before)] == written_before  # nothing written before was lost
        assert np.array_equal(segment_array(seg, core.segment_id, volume), reference)  # same final segment
        assert sorted(job.written) == sorted(full.written)
        assert core.undo_edit()  # one Undo still removes the whole (resumed) run
        assert np.array_equal(segment_array(seg, core.segment_id, volume), accepted)
    finally:
        core.close()
        link.stop()
    # no main-thread call waited for the server: each poll did a few milliseconds of socket work
    polls.sort()
    assert polls[int(0.95 * len(polls))] < 0.05, polls[-5:]
    assert polls[-1] < 0.25, polls[-5:]
