"""Scheduling with the real model: a click on a cached slice is never stuck behind look-ahead
encodes, interactive work jumps queued look-ahead, and pipelined propagation (encode slice n+1
while slice n is decoded) gives exactly the masks of the one-slice-at-a-time loop."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from phantoms import box_of, ellipsoid_ct
from SAMSegmentLib.propagation import StopRules, propagate
from SAMSegmentLib.prompts import Prompts
from SAMSegmentLib.volume import SliceRef


class EncodeLog:
    """Wraps the real ``backend.encode`` (the model still runs) to record when encodes run."""

    def __init__(self, backend) -> None:
        self.original = backend.encode
        self.started = threading.Event()
        self.spans: list[tuple[float, float]] = []
        self.images: list[bytes] = []
        self.running = 0
        self.lock = threading.Lock()

    def __call__(self, image):
        t0 = time.perf_counter()
        with self.lock:
            self.running += 1
            self.images.append(image.tobytes())
        self.started.set()
        try:
            return self.original(image)
        finally:
            with self.lock:
                self.running -= 1
                self.spans.append((t0, time.perf_counter()))

    @property
    def finished(self) -> int:
        return len(self.spans)


def test_cached_prompt_does_not_wait_for_running_lookahead_encode(session, phantom, monkeypatch):
    vol, mask = phantom
    session.set_volume(vol)
    session.backend.prepare_runtime()  # graph loading is not part of what is timed
    ref = SliceRef(0, 12)
    prompts = Prompts(box=box_of(mask[12]))
    t0 = time.perf_counter()
    session.embedding(ref)
    one_encode = time.perf_counter() - t0
    session.predict(ref, prompts, refine=False)  # warm decode
    log = EncodeLog(session.backend)
    monkeypatch.setattr(session.backend, "encode", log)
    queued = session.prefetch(ref, radius=5)
    assert queued == 10
    assert log.started.wait(30)  # a look-ahead encode is now running and cannot be interrupted
    waits = []
    for _ in range(2):
        t0 = time.perf_counter()
        pred = session.predict(ref, prompts, refine=False)
        waits.append(time.perf_counter() - t0)
        assert pred.area > 0
    # both masks came back while that first encode was still running: nothing waited for it
    assert log.finished == 0, (waits, one_encode)
    assert max(waits) < 0.5 * one_encode, (waits, one_encode)


@pytest.mark.slow  # several encodes queued behind each other
def test_uncached_prompt_jumps_queued_lookahead(session, phantom, monkeypatch):
    vol, mask = phantom
    session.set_volume(vol)
    log = EncodeLog(session.backend)
    monkeypatch.setattr(session.backend, "encode", log)
    session.prefetch(SliceRef(0, 12), radius=4, direction=1)  # 13, 11, 14, 10, ...
    assert log.started.wait(30)
    target = SliceRef(0, 5)
    session.predict(target, Prompts(box=box_of(mask[12])))
    # the look-ahead encode already running finished; the click's slice came next, before 11, 14, ...
    assert log.images[:2] == [session.slice_image(SliceRef(0, 13)).tobytes(),
                              session.slice_image(target).tobytes()]


@pytest.fixture(scope="module")
def drifting():
    return ellipsoid_ct(drift=0.5, seed=5)


def _propagate_fresh(backend, vol, anchor_box, lookahead: int):
    """Propagate 2 slices each way from slice 12 on an empty cache; returns (result, encode spans, decode spans)."""
    from SAMSegmentLib.session import SegmentationSession

    encode_log = EncodeLog(backend)
    decodes: list[tuple[float, float]] = []
    original_decode = backend.decode

    def timed_decode(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original_decode(*args, **kwargs)
        finally:
            decodes.append((t0, time.perf_counter()))

    backend.encode, backend.decode = encode_log, timed_decode
    try:
        with SegmentationSession(model=backend) as s:
            s.set_volume(vol)
            anchor = s.predict(SliceRef(0, 12), Prompts(box=anchor_box)).mask
            decodes.clear()
            encode_log.spans.clear()
            result = propagate(s, 0, {12: anchor}, direction="both", rules=StopRules(max_slices=2),
                               lookahead=lookahead)
            assert s.encode_count == 1 + 4  # the anchor, then each propagated slice once; nothing wasted
    finally:
        del backend.encode, backend.decode  # back to the class methods
    return result, encode_log.spans, decodes


def _overlaps(spans_a, spans_b) -> int:
    return sum(1 for a0, a1 in spans_a for b0, b1 in spans_b if a0 < b1 and b0 < a1)


@pytest.mark.slow  # two propagations
def test_pipelined_propagation_overlaps_and_gives_identical_masks(backend, drifting):
    vol, mask = drifting
    box = box_of(mask[12])
    plain, plain_enc, plain_dec = _propagate_fresh(backend, vol, box, lookahead=0)
    piped, piped_enc, piped_dec = _propagate_fresh(backend, vol, box, lookahead=1)
    assert sorted(plain.masks) == sorted(piped.masks) == [10, 11, 13, 14]
    for index in plain.masks:
        assert np.array_equal(plain.masks[index], piped.masks[index]), index
        a, b = plain.outcomes[index], piped.outcomes[index]
        assert (a.score, a.area, a.iou_previous, a.candidate) == (b.score, b.area, b.iou_previous, b.candidate)
    assert [(x.anchor, x.direction, x.reason) for x in plain.stops] == \
        [(x.anchor, x.direction, x.reason) for x in piped.stops]
    # without look-ahead no decode runs during an encode; with it, decodes run while the next slice encodes
    assert _overlaps(plain_enc, plain_dec) == 0
    assert _overlaps(piped_enc, piped_dec) >= 2
