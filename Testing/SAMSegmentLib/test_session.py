"""The interactive session with the real LiteMedSAM model on phantoms with known masks."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from phantoms import box_of, dice
from SAMSegmentLib.errors import PromptError, SAMSegmentError, VolumeError
from SAMSegmentLib.prompts import Prompts
from SAMSegmentLib.volume import SliceRef
from SAMSegmentLib.worker import PRIORITY_PREFETCH


def test_box_on_each_axis(session, phantom):
    vol, mask = phantom
    session.set_volume(vol)
    for axis in (0, 1, 2):
        index = vol.shape[axis] // 2
        truth = np.take(mask, index, axis)
        pred = session.predict(SliceRef(axis, index), Prompts(box=box_of(truth)))
        assert pred.mask.shape == truth.shape
        assert dice(pred.mask, truth) > 0.95, axis


def test_points_refinement_and_undo(session, phantom):
    vol, mask = phantom
    session.set_volume(vol)
    ref = SliceRef(0, 12)
    truth = mask[12]
    ys, xs = np.nonzero(truth)
    first = session.predict(ref, Prompts(box=box_of(truth)))
    assert session.current(ref) is first
    # a corrective exclude click in the middle of the object must carve the mask there
    cy, cx = int(ys.mean()), int(xs.mean())
    prompts = Prompts(box=box_of(truth)).with_point(cx, cy, 0)
    second = session.predict(ref, prompts)
    assert second.prompts.labels.tolist() == [0]
    assert not np.array_equal(second.mask, first.mask)
    assert session.undo(ref) is first
    assert session.undo(ref) is None
    with pytest.raises(SAMSegmentError, match="Nothing to undo"):
        session.undo(ref)


def test_refinement_passes_previous_logits(session, phantom, monkeypatch):
    vol, mask = phantom
    session.set_volume(vol)
    ref = SliceRef(0, 12)
    seen = []
    original = session.backend.decode

    import inspect

    def spy(*args, **kwargs):
        seen.append(inspect.signature(original).bind(*args, **kwargs).arguments.get("mask_input"))
        return original(*args, **kwargs)

    monkeypatch.setattr(session.backend, "decode", spy)
    first = session.predict(ref, Prompts(box=box_of(mask[12])))
    session.predict(ref, Prompts(box=box_of(mask[12])).with_point(56, 48, 1))
    assert seen[0] is None
    assert seen[1] is first.low_res_logits


def test_each_slice_is_encoded_once(session, phantom):
    vol, mask = phantom
    session.set_volume(vol)
    ref = SliceRef(0, 10)
    for _ in range(3):
        session.predict(ref, Prompts(box=box_of(mask[10])))
    assert session.encode_count == 1
    assert session.cache.stats.hits >= 2


@pytest.mark.slow  # encodes a neighbourhood of slices
def test_prefetch_runs_on_the_worker_nearest_first(session, phantom, monkeypatch):
    vol, _ = phantom
    session.set_volume(vol)
    threads, order = set(), []
    original = session.backend.encode

    def spy(image):
        threads.add(threading.current_thread().name)
        order.append(image.tobytes())
        return original(image)

    monkeypatch.setattr(session.backend, "encode", spy)
    queued = session.prefetch(SliceRef(0, 12), radius=2, direction=-1)
    assert queued == 4
    session.worker.submit(lambda: None, PRIORITY_PREFETCH).result()  # FIFO behind the prefetches
    session.embedding(SliceRef(0, 12))  # after them all
    assert threads == {session.worker.thread.name}
    expected = [session.slice_image(SliceRef(0, i)).tobytes() for i in (11, 13, 10, 14, 12)]
    assert order == expected
    assert all(session.is_cached(SliceRef(0, i)) for i in (10, 11, 13, 14))


def test_bad_volumes_are_refused_with_reasons(session):
    with pytest.raises(VolumeError, match="2D image"):
        session.set_volume(np.zeros((32, 32)))
    with pytest.raises(VolumeError, match="4D"):
        session.set_volume(np.zeros((2, 3, 32, 32)))
    with pytest.raises(VolumeError, match="empty"):
        session.set_volume(np.zeros((0, 32, 32)))
    bad = np.zeros((4, 32, 32), dtype=np.float32)
    bad[1, 2, 3] = np.nan
    bad[2, 2, 3] = np.inf
    with pytest.raises(VolumeError, match="2 NaN or infinite"):
        session.set_volume(bad)
    with pytest.raises(VolumeError, match="single intensity|same value"):
        session.set_volume(np.full((4, 32, 32), 7.0))


def test_bad_prompts_are_refused_with_reasons(session, phantom):
    vol, mask = phantom
    session.set_volume(vol)
    h, w = vol.shape[1:]
    with pytest.raises(PromptError, match="outside"):
        session.predict(SliceRef(0, 12), Prompts.from_lists([(w + 5, 3)]))
    with pytest.raises(PromptError, match="zero area"):
        session.predict(SliceRef(0, 12), Prompts(box=[10, 10, 10, 40]))
    with pytest.raises(PromptError, match="Only exclude"):
        session.predict(SliceRef(0, 12), Prompts.from_lists([], [(10, 10)]))
    with pytest.raises(PromptError, match="No prompt"):
        session.predict(SliceRef(0, 12), Prompts())
    with pytest.raises(VolumeError, match="outside the volume"):
        session.predict(SliceRef(0, 99), Prompts(box=[1, 1, 9, 9]))
    assert session.encode_count == 0  # nothing reached the model


def test_box_trained_model_refuses_points_alone_and_refines_a_box_with_them(session, sample_ct):
    from scipy import ndimage

    vol, lab, names = sample_ct
    spleen = lab == names["spleen"]
    k = int(spleen.sum(axis=(1, 2)).argmax())
    session.set_volume(vol)
    ref = SliceRef(0, k)
    cy, cx = np.unravel_index(ndimage.distance_transform_edt(spleen[k]).argmax(), spleen[k].shape)
    assert session.backend.spec.needs_box
    with pytest.raises(PromptError, match="segments from a box.*drag a box"):
        session.predict(ref, Prompts.from_lists([(float(cx), float(cy))]))
    box = Prompts(box=box_of(spleen[k]))
    full = session.predict(ref, box)
    # an exclude point in the middle of the spleen removes area around it: points refine the box
    cut = session.predict(ref, box.with_point(float(cx), float(cy), 0))
    assert cut.area < 0.95 * full.area
    assert not (cut.mask & ~full.mask).any() or (cut.mask & ~full.mask).sum() < 10


def test_user_box_gets_the_model_margin_and_propagation_boxes_do_not(backend, phantom):
    """predict() widens a drawn box by the model's margin (LiteMedSAM under-segments from tight
    boxes); box_margin=0 decodes it as drawn, which is exactly what decode() does."""
    from SAMSegmentLib.preprocessing import widen_box
    from SAMSegmentLib.session import SegmentationSession

    vol, mask = phantom
    box = np.array(box_of(mask[12]), dtype=float)
    ref = SliceRef(0, 12)
    with SegmentationSession(model=backend) as s, SegmentationSession(model=backend, box_margin=0) as raw:
        s.set_volume(vol)
        raw.set_volume(vol)
        assert s.box_margin == backend.spec.box_margin == 0.1
        widened = s.predict(ref, Prompts(box=box))
        geom = s.geometry(ref)
        expected = widen_box(box, geom, 0.1, backend.spec.box_margin_min_px)
        np.testing.assert_allclose(widened.prompts.box, expected)
        side = box[2:] - box[:2] + 1
        np.testing.assert_allclose(expected[:2], box[:2] - 0.1 * side)  # 10 % of each side, per axis
        np.testing.assert_allclose(widened.logits, s.decode(ref, Prompts(box=expected)).logits, atol=1e-2)
        as_drawn = raw.predict(ref, Prompts(box=box))
        np.testing.assert_array_equal(as_drawn.prompts.box, box)
        np.testing.assert_allclose(as_drawn.logits, s.decode(ref, Prompts(box=box)).logits, atol=1e-2)
        assert np.abs(widened.logits - as_drawn.logits).max() > 0.1  # and the margin did change the answer
        # the margin never leaves the slice, and a degenerate box is refused as drawn, not widened
        h, w = vol.shape[1:]
        edge = s.predict(ref, Prompts(box=[0, 0, w - 1, 40]))
        assert edge.prompts.box[0] == 0 and edge.prompts.box[2] == w - 1
        with pytest.raises(PromptError, match="zero area"):
            s.predict(ref, Prompts(box=[10, 10, 10, 40]))
        # a small box still gets at least box_margin_min_px model pixels
        tiny = widen_box(np.array([50.0, 50.0, 52.0, 52.0]), geom, 0.1, 2.0)
        assert np.allclose(tiny, [50 - 2 / geom.scale_xy[0], 50 - 2 / geom.scale_xy[1],
                                  52 + 2 / geom.scale_xy[0], 52 + 2 / geom.scale_xy[1]])
    with pytest.raises(SAMSegmentError, match="Box margin"):
        SegmentationSession(model=backend, box_margin=-0.1)


def test_constant_slice_is_refused(session, phantom):
    vol, _ = phantom
    vol = vol.copy()
    vol[3] = -1000
    session.set_volume(vol)
    with pytest.raises(VolumeError, match="constant after windowing"):
        session.predict(SliceRef(0, 3), Prompts(box=[10, 10, 40, 40]))


def test_box_past_the_edge_is_clipped(session, phantom):
    vol, mask = phantom
    session.set_volume(vol)
    b = box_of(mask[12])
    pred = session.predict(SliceRef(0, 12), Prompts(box=[b[0], b[1], b[2], vol.shape[1] + 40]))
    assert pred.prompts.box[3] == vol.shape[1] - 1


def test_postprocessing_options(backend, phantom):
    from SAMSegmentLib.session import SegmentationSession

    vol, mask = phantom
    with SegmentationSession(model=backend, fill_holes=True, largest_component=True) as s:
        s.set_volume(vol)
        pred = s.predict(SliceRef(0, 12), Prompts(box=box_of(mask[12])))
        from scipy import ndimage

        assert ndimage.label(pred.mask)[1] == 1
        assert np.array_equal(ndimage.binary_fill_holes(pred.mask), pred.mask)


EXIT_ENDINGS = {
    # a script that never closes its session: the session's finalizer stops the threads at exit
    "never closed": ("s.predict(SliceRef(0, 2), Prompts(box=[10, 10, 50, 50]))\n"
                     "s.prefetch(SliceRef(0, 2), radius=2)\n"),
    # close() does not wait, so the exit comes while the worker is still inside the encoder
    "closed during an encode": ("entered = threading.Event()\n"
                                "real = s.backend.encode\n"
                                "def encode(image):\n"
                                "    entered.set()\n"
                                "    return real(image)\n"
                                "s.backend.encode = encode\n"
                                "s.prefetch(SliceRef(0, 2), radius=2)\n"
                                "assert entered.wait(120)\n"
                                "s.close()\n"),
}


@pytest.mark.slow  # a subprocess that loads the model again
@pytest.mark.parametrize("ending", sorted(EXIT_ENDINGS))
def test_exit_while_prefetching_is_clean(tmp_path, ending):
    """A script must exit normally with encodes in flight, whether it closed its session or not
    (a daemon thread inside torch at interpreter exit aborts the process: the exit hook waits
    for the call in progress)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "exit.py"
    script.write_text(
        "import sys, threading\n"
        "from phantoms import disks_ct\n"
        "from SAMSegmentLib.session import SegmentationSession\n"
        "from SAMSegmentLib.prompts import Prompts\n"
        "from SAMSegmentLib.volume import SliceRef\n"
        "vol, _ = disks_ct(shape=(5, 384, 384))\n"  # without the exit hook, ~1 run in 2 aborts at this size
        "s = SegmentationSession(runtime='eager')\n"
        "s.set_volume(vol, (-160, 240))\n"
        + EXIT_ENDINGS[ending] + "print('done')\n")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(Path(__file__).resolve().parent)]))  # phantoms
    done = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "done"


def test_a_mask_does_not_depend_on_who_encoded_the_slice(eager_backend, phantom):
    """A miss (just encoded) and a hit (from the fp16 cache) decode the same embedding: a client of a
    shared server cache, a prefetch race or a restarted server get identical masks."""
    from SAMSegmentLib.session import SegmentationSession

    vol, _ = phantom
    ref = SliceRef(0, vol.shape[0] // 2)
    box = Prompts(box=[20, 20, 44, 44])
    with SegmentationSession(model=eager_backend) as s:
        s.set_volume(vol)
        miss = s.decode(ref, box)
        assert s.encode_count == 1
        hit = s.decode(ref, box)
        assert s.encode_count == 1
    np.testing.assert_array_equal(miss.logits, hit.logits)


@pytest.mark.slow  # two propagations
def test_two_encode_workers_propagate_the_same_masks_and_encode_each_slice_once(eager_backend):
    """Look-ahead encodes spread over two workers (samsegment serve --encode-workers 2): the masks are
    those of one worker, and no slice is encoded twice although both workers and the decode chain
    ask for the same slices."""
    from phantoms import ellipsoid_ct

    from SAMSegmentLib.propagation import propagate
    from SAMSegmentLib.session import SegmentationSession

    vol, truth = ellipsoid_ct(shape=(9, 96, 112), radii=(3.5, 26.0, 32.0))  # a short organ: few encodes
    index = int(truth.sum(axis=(1, 2)).argmax())
    results = {}
    for workers in (1, 2):
        with SegmentationSession(model=eager_backend, encode_workers=workers) as s:
            s.set_volume(vol)
            anchor = s.predict(SliceRef(0, index), Prompts(box=box_of(truth[index]))).mask
            result = propagate(s, 0, {index: anchor}, "both")
            assert len(s.encoders) == workers
        assert s.join(30)  # closed: the look-ahead still running has ended
        assert s.encode_count == len(s.cache) >= len(result.masks) + 1  # every slice encoded exactly once
        results[workers] = result
    assert sorted(results[1].masks) == sorted(results[2].masks)
    for i, mask in results[1].masks.items():
        assert np.array_equal(results[2].masks[i], mask), i
    with pytest.raises(SAMSegmentError, match="encode_workers"):
        SegmentationSession(model=eager_backend, encode_workers=0)
