"""The session's threads: volume swaps racing the worker and the decode lane, and closing.

Each race is made deterministic with the real LiteMedSAM backend: the only patch is a wrapper
that pauses a worker-thread call on an event (the cache lookup that follows reading the cache
key, or the encoder call), so the main thread can act at exactly that moment.
"""

from __future__ import annotations

import threading
import time

import pytest

from phantoms import box_of, dice, ellipsoid_ct
from SAMSegmentLib.prompts import Prompts
from SAMSegmentLib.session import SegmentationSession
from SAMSegmentLib.volume import SliceRef
from SAMSegmentLib.worker import PRIORITY_PREFETCH

WINDOW = (-160, 240)


def _pause_first_get_on(session, thread_of, entered: threading.Event, release: threading.Event, monkeypatch) -> None:
    """Make the first ``cache.get`` on the thread ``thread_of()`` wait for ``release``.

    The cache lookup is where a job has already named its cache key and has not yet read the
    slice image or geometry: the moment a volume swap must not be able to split.
    """
    real_get = session.cache.get

    def paused_get(key):
        if threading.current_thread() is thread_of() and not entered.is_set():
            entered.set()
            assert release.wait(60), "the test never released the paused job"
        return real_get(key)

    monkeypatch.setattr(session.cache, "get", paused_get)


def _relative_error(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_set_volume_during_a_prefetch_encode_files_no_embedding_under_the_wrong_key(backend, monkeypatch):
    """set_volume(B) lands while a prefetch encode of volume A has read its cache key (A's
    signature) and not yet its slice image: the embedding filed under A's key must be A's."""
    vol_a, truth_a = ellipsoid_ct(center=(12.0, 30.0, 35.0))
    vol_b, _ = ellipsoid_ct(center=(12.0, 66.0, 80.0))  # same shape, the object elsewhere
    ref = SliceRef(0, 13)
    with SegmentationSession(model=backend) as s:
        s.set_volume(vol_a, WINDOW)
        entered, release = threading.Event(), threading.Event()
        _pause_first_get_on(s, lambda: s.worker.thread, entered, release, monkeypatch)
        assert s.prefetch(SliceRef(0, 12), radius=1) == 2  # slice 13 first, then 11
        assert entered.wait(60), "the prefetch encode never started"
        s.set_volume(vol_b, WINDOW)  # the swap, while the encode of A's slice 13 is paused
        release.set()
        s.worker.submit(lambda: None, PRIORITY_PREFETCH).result()  # FIFO behind the prefetches
        assert s.encode_count == 1  # slice 13 of A; slice 11 was superseded by the new volume
        assert not s.is_cached(ref)  # nothing was filed under B's key

        # back to A (same signature, so the same keys): what was filed under A's key is A's slice
        s.set_volume(vol_a, WINDOW)
        assert s.is_cached(ref)
        cached = s.embedding(ref)
        assert s.encode_count == 1  # served from the cache
        fresh_a = backend.encode(s.slice_image(ref))
        assert _relative_error(cached, fresh_a) < 1e-2  # fp16 storage only
        pred = s.predict(ref, Prompts(box=box_of(truth_a[13])))
        assert dice(pred.mask, truth_a[13]) > 0.9


def test_set_volume_during_a_decode_keeps_the_decode_on_its_own_volume(backend, monkeypatch):
    """A predict on A whose decode-lane job is paused after its cache lookup while set_volume(B)
    (another slice size) lands: the mask is decoded with A's geometry, and is not recorded as
    B's refinement history."""
    vol_a, truth_a = ellipsoid_ct()
    vol_b, _ = ellipsoid_ct(shape=(24, 80, 64))
    ref = SliceRef(0, 12)
    box = Prompts(box=box_of(truth_a[12]))
    with SegmentationSession(model=backend) as s:
        s.set_volume(vol_a, WINDOW)
        s.embedding(ref)  # cached: the predict goes to the decode lane
        entered, release = threading.Event(), threading.Event()
        _pause_first_get_on(s, lambda: s.decoder_lane.thread, entered, release, monkeypatch)
        result: dict = {}

        def click() -> None:
            try:
                result["pred"] = s.predict(ref, box)
            except BaseException as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        caller = threading.Thread(target=click)
        caller.start()
        assert entered.wait(60), "the decode never started"
        s.set_volume(vol_b, WINDOW)
        release.set()
        caller.join(60)
        assert "error" not in result, result.get("error")
        pred = result["pred"]
        assert pred.mask.shape == truth_a[12].shape
        assert dice(pred.mask, truth_a[12]) > 0.9
        assert s.current(ref) is None  # A's mask is no refinement history of B's slice 12


def test_close_returns_at_once_while_an_encode_runs(backend, phantom, monkeypatch):
    """close() never waits behind the encoder call in progress: queued work is cancelled, the
    worker stops after its current call, and join() waits for that if the caller wants to."""
    vol, _ = phantom
    s = SegmentationSession(model=backend)
    s.set_volume(vol, WINDOW)
    entered, release = threading.Event(), threading.Event()
    real_encode = s.backend.encode

    def slow_encode(image):
        entered.set()
        assert release.wait(10), "the test never released the encode"
        return real_encode(image)

    monkeypatch.setattr(s.backend, "encode", slow_encode)
    assert s.prefetch(SliceRef(0, 12), radius=2) == 4
    assert entered.wait(60)
    queued = s.encode_async(SliceRef(0, 3))
    start = time.perf_counter()
    s.close()
    took = time.perf_counter() - start
    try:
        assert took < 0.2, f"close() blocked for {took:.2f} s"
        assert s.worker.thread.is_alive()  # still inside the paused encoder call
        assert queued.cancelled()  # queued work is dropped, and whoever waits on it is told
        assert not s.join(timeout=0.05)
    finally:
        release.set()
    assert s.join(timeout=60)
    assert not s.worker.thread.is_alive() and not s.decoder_lane.thread.is_alive()
    assert s.encode_count == 1  # only the call that was running when close() came
    with pytest.raises(RuntimeError, match="closed"):
        s.embedding(SliceRef(0, 12))
    s.close()  # twice is harmless
