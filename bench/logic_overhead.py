"""What the Slicer logic adds on top of the engine for one prompt -> segment update (JSON out).

On real MRML from slicer-core, a 512x512 slice with its embedding cached: the same box prompts go
(a) straight to the engine in-process (``session.predict``) and (b) through the logic as a user
would issue them: an ROI markups change -> observer -> RAS->IJK prompts -> HTTP request to a
SAMSegment server on 127.0.0.1 (in this process, the same backend object) -> engine -> response
-> preview segment written. So (b) - (a) is what the Slicer side and the server hop cost together.
Runs alternate a/b so machine noise hits both alike; the overhead is b - a per prompt. Accept
(the write into the user's segment through the Segment Editor logic, with undo state) is timed
separately.

A box drawn on a slice that is not encoded yet: the time from the mouse release to the preview,
with the encode started on mouse-down (what the SAM effect does: ``SAMSegmentCore.warm``) and
without, for a drag of ``--drag-s`` seconds; the two alternate, the slice evicted before each.

    .venv/bin/python bench/logic_overhead.py [--repeats 30] [--cold-repeats 5] [--drag-s 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SAMSegment"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--runtime", default=None, help="engine runtime (auto, eager, onnx); default: engine's choice")
    parser.add_argument("--cold-repeats", type=int, default=5, help="box drags on a slice not yet encoded, per mode")
    parser.add_argument("--drag-s", type=float, default=0.5, help="how long the box drag lasts (mouse down to up)")
    args = parser.parse_args()

    import SimpleITK as sitk
    import torch
    from scipy import ndimage

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from SAMSegmentLib import sample_data
    from SAMSegmentLib.prompts import Prompts
    from SAMSegmentLib.server.serve import ServerHandle
    from SAMSegmentLib.server.state import Limits, ServerState
    from SAMSegmentLib.session import SegmentationSession
    from SAMSegmentSlicer import geometry
    from SAMSegmentSlicer.logic import SAMSegmentCore
    from SAMSegmentSlicer.selftest import add_volume, headless_mrml, slice_node_through
    from SAMSegmentSlicer.server_link import RemoteServer

    scene, app, _logics = headless_mrml()

    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.path(sample_data.IMAGE))))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.path(sample_data.LABELS))))
    k = int(np.argmax((labels == sample_data.label_values()["liver"]).sum(axis=(1, 2))))
    sub = slice(max(0, k - 2), k + 3)
    zoom = (1, 512 / ct.shape[1], 512 / ct.shape[2])
    vol = ndimage.zoom(ct[sub].astype(np.float32), zoom, order=1).astype(np.int16)
    lab = ndimage.zoom(labels[sub], zoom, order=0)
    kk = k - sub.start
    volume = add_volume(scene, vol, spacing=(0.7, 0.7, 3.0))
    volume.GetDisplayNode().SetAutoWindowLevel(False)
    volume.GetDisplayNode().SetWindowLevel(400, 40)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.CreateDefaultDisplayNodes()

    kwargs = {"runtime": args.runtime} if args.runtime else {}
    session = SegmentationSession(**kwargs)
    token = "bench-" + os.urandom(12).hex()
    # no look-ahead encodes: measure the prompt path only
    server = ServerHandle(ServerState(Limits(max_prefetch_radius=0), backends=(session.backend,)), token).start()
    core = SAMSegmentCore(scene, app, link=RemoteServer(server.url, token))
    core.set_inputs(volume, seg)
    core.wait_idle()
    server_session = server.state.session(core.session.session_id).session
    ys, xs = np.nonzero(lab[kk] == sample_data.label_values()["liver"])
    centre = geometry.ijk_to_ras(volume, [[xs.mean(), ys.mean(), kk]])[0]
    node = slice_node_through(scene, volume, "Axial", centre)
    view = core.view_slice(node)
    session.set_volume(vol, core.window)
    session.embedding(view.ref)  # cached from here on, in both
    server_session.embedding(view.ref)
    core.watch_markups(lambda: view, asynchronous=False)
    s2r = geometry.vtk_to_numpy_matrix(node.GetSliceToRAS())
    rng = np.random.default_rng(0)
    base = np.array([xs.min(), ys.min(), xs.max(), ys.max()], float)

    engine_ms, logic_ms, prompt_ms = [], [], []
    for _ in range(args.repeats):
        box = base + rng.uniform(-8, 8, 4)
        t0 = time.perf_counter()
        session.predict(view.ref, Prompts(box=box), refine=False)
        engine_ms.append(1e3 * (time.perf_counter() - t0))
        a = geometry.ijk_to_ras(volume, [[box[0], box[1], kk]])[0]
        b = geometry.ijk_to_ras(volume, [[box[2], box[3], kk]])[0]
        t0 = time.perf_counter()
        core.prompts.set_box(a, b, s2r)  # fires the observer -> decode -> preview
        logic_ms.append(1e3 * (time.perf_counter() - t0))
        prompt_ms.append(1e3 * core.last_timing.get("prompts_s", 0.0))
    accept_ms = []
    for _ in range(5):
        core.prompts.set_box(*geometry.ijk_to_ras(volume, [[base[0], base[1], kk], [base[2], base[3], kk]]), s2r)
        t0 = time.perf_counter()
        core.accept()
        accept_ms.append(1e3 * (time.perf_counter() - t0))
    cold: dict[str, list[float]] = {"encode_on_release": [], "encode_on_mouse_down": []}
    for i in range(2 * args.cold_repeats):
        warm = i % 2 == 1
        server.state.clear_caches()  # the slice is not encoded
        core.reset_prompts(view.ref)
        core.wait_idle()
        if warm:
            core.warm(view)  # mouse down: the server starts the encode
        drag_end = time.perf_counter() + args.drag_s
        while time.perf_counter() < drag_end:  # the user drags the box; the module's timer polls
            core.poll()
            time.sleep(0.04)
        t0 = time.perf_counter()
        core.segment(view, Prompts(box=base), refine=False)  # mouse up
        cold["encode_on_mouse_down" if warm else "encode_on_release"].append(1e3 * (time.perf_counter() - t0))
    overhead = np.array(logic_ms) - np.array(engine_ms)
    out = {
        "slice": "512x512 (sample CT liver slice, resampled)", "repeats": args.repeats,
        "runtime": session.backend.runtime_info() if hasattr(session.backend, "runtime_info") else "eager",
        "engine_prompt_to_mask_ms": {"p50": float(np.median(engine_ms)), "p95": float(np.percentile(engine_ms, 95))},
        "logic_markups_to_preview_ms": {"p50": float(np.median(logic_ms)), "p95": float(np.percentile(logic_ms, 95))},
        "logic_overhead_ms": {"p50": float(np.median(overhead)), "p95": float(np.percentile(overhead, 95))},
        "of_which_markups_to_prompts_ms_p50": float(np.median(prompt_ms)),
        "accept_write_with_undo_state_ms_p50": float(np.median(accept_ms)),
        "target_overhead_ms": 15.0,
        "meets_target": bool(np.median(overhead) <= 15.0),
        "unencoded_slice_release_to_preview_ms_p50": {k: float(np.median(v)) for k, v in cold.items()},
        "drag_s": args.drag_s,
    }
    print(json.dumps(out, indent=2, default=str))
    core.close()
    server.stop()
    session.close()


if __name__ == "__main__":
    main()
