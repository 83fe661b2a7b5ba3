"""The interactive session: one volume, one model, prompts in, masks out.

Encoding a slice is the slow step (about a second on a laptop CPU); decoding a prompt takes tens
of milliseconds. The session therefore encodes each slice at most once (``EmbeddingCache``),
encodes neighbours in the background while the user works (``prefetch``), and reuses the last
low-resolution logits when the user adds a corrective click, as SAM's interactive loop does.

Two lanes: every encode runs on the inference worker (one thread, priority-ordered), and every
decode of an already-cached slice runs on a second thread, the decode lane. A running encoder
call cannot be interrupted, so with one thread a click arriving during a look-ahead encode waited
for the rest of it (up to a second); on the decode lane it waits for at most the decode in front
of it, and propagation can decode slice n while the worker encodes slice n+1.

Threads and volume state: everything ``set_volume`` decides (the volume, its windowed copy, the
window, the volume signature and the preprocessing key) is one immutable ``VolumeState``,
replaced as a whole by reference. Each encode or decode job takes the state once when it starts
and reads its cache key, slice image and geometry from that one object, so a volume swapped in
while a job runs can never pair one volume's embedding with the other's key or geometry.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .backends import SamBackend
from .cache import DEFAULT_BUDGET_BYTES, CacheKey, EmbeddingCache
from .errors import SAMSegmentError, VolumeError
from .model_registry import default_model_id
from .preprocessing import IntensityWindow, SliceGeometry, auto_window, widen_box
from .prompts import Prompts, check_prompts, require_box
from .volume import SliceRef, check_slice_ref, constant_slice_error, get_slice, slice_shape, validate_volume, volume_signature
from .worker import (PRIORITY_INTERACTIVE, PRIORITY_PREFETCH, PRIORITY_PROPAGATION, CancelToken, InferenceWorker,
                     ProgressCallback)

if TYPE_CHECKING:
    from .adaptation import AdaptationReport, AdaptSettings, DecoderAdapter

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One decoded mask on one slice."""

    ref: SliceRef
    mask: np.ndarray  # bool (H, W)
    score: float  # decoder's predicted IoU (poorly calibrated for LiteMedSAM; use for ranking only)
    low_res_logits: Any  # torch.Tensor (1, 1, 256, 256) in the model frame, for refinement
    logits: np.ndarray  # float32 (H, W) slice logits; mask = logits > 0 before post-processing
    prompts: Prompts = field(default_factory=Prompts)

    @property
    def area(self) -> int:
        """The number of mask pixels."""
        return int(np.count_nonzero(self.mask))


@dataclass(frozen=True, eq=False)
class VolumeState:
    """What ``set_volume`` decided, as one immutable snapshot (see the module docstring).

    A job reads its cache key, slice image and slice size from one of these, never from the
    session, so all three describe the same volume. ``windowed`` is read-only; ``volume`` is the
    caller's array as given (not copied).
    """

    volume: np.ndarray  # (K, J, I), as passed to set_volume
    windowed: np.ndarray  # uint8 (K, J, I): the volume through ``window``, what the model sees
    window: IntensityWindow
    signature: str  # volume_signature(volume)
    prep_key: str  # the model's preprocessing key plus the window: part of every cache key
    model_id: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (K, J, I) shape of the volume."""
        return tuple(self.volume.shape)  # type: ignore[return-value]

    def key(self, ref: SliceRef) -> CacheKey:
        """The cache key of the embedding of slice ``ref`` of this volume.

        Args:
            ref: a slice of this volume.

        Returns:
            The key naming this volume's content, the slice, the model and the preprocessing.
        """
        return CacheKey(self.signature, ref.axis, ref.index, self.model_id, self.prep_key)

    def slice_image(self, ref: SliceRef) -> np.ndarray:
        """The windowed uint8 (H, W) image of slice ``ref``, as the model sees it before resizing.

        Args:
            ref: a slice of this volume (refused with ``VolumeError`` if outside it).

        Returns:
            A new (H, W) uint8 array.
        """
        return get_slice(self.windowed, ref)

    def slice_size(self, ref: SliceRef) -> tuple[int, int]:
        """The (H, W) size of slice ``ref``, without reading it.

        Args:
            ref: a slice of this volume (refused with ``VolumeError`` if outside it).

        Returns:
            (rows, columns) of the slice image.
        """
        check_slice_ref(self.windowed.shape, ref)
        return slice_shape(self.windowed.shape, ref.axis)

    def is_constant(self, ref: SliceRef) -> bool:
        """Whether every pixel of the windowed slice ``ref`` has the same value.

        Args:
            ref: a slice of this volume.

        Returns:
            True when the slice has nothing to segment after windowing.
        """
        image = self.slice_image(ref)
        return int(image.min()) == int(image.max())


def _close_workers(*workers: InferenceWorker) -> None:
    """Close ``workers`` without waiting (the session's finalizer: runs on close, GC or exit)."""
    for worker in workers:
        worker.close()


class SegmentationSession:
    """Segment slices of one volume with one model.

    Thread-safe for any number of caller threads (a GUI, a request thread, a propagation job)
    plus the session's own two threads: the volume lives in one ``VolumeState`` swapped whole,
    and the prompt history and the prefetch generation are guarded by one lock.
    """

    def __init__(self, model: str | SamBackend | None = None, checkpoint: str | Path | None = None,
                 device: str | None = None, cache_bytes: int = DEFAULT_BUDGET_BYTES,
                 cache_dir: str | Path | None = None, refine_with_logits: bool = True,
                 fill_holes: bool = False, largest_component: bool = False, runtime: str | None = None,
                 box_margin: float | None = None, cache: EmbeddingCache | None = None,
                 encode_workers: int = 1) -> None:
        """Build (or adopt) the backend and start the session's two threads; no volume yet.

        Args:
            model: a registry model id (None: the registry's default) or an already built
                ``SamBackend`` (then ``checkpoint``, ``device`` and ``runtime`` are ignored).
            checkpoint: a user checkpoint instead of the registry's weights.
            device: "cpu", "cuda", "cuda:N", "mps" or None (the best available).
            cache_bytes: the in-memory embedding budget.
            cache_dir: a folder for the disk tier of the embedding cache (None: memory only).
            cache: an existing embedding cache to use instead (``cache_bytes`` and ``cache_dir`` are
                then ignored); its keys hold volume signature, model and preprocessing, so sessions
                of one model can share one (the server's clients do).
            refine_with_logits: ``predict`` feeds the previous mask's logits back on a corrective click.
            fill_holes, largest_component: post-processing of every decoded mask.
            runtime: "auto" (default, or ``$SAMSEGMENT_RUNTIME``), "eager" or "onnx".
            box_margin: fraction of a user box's side added around it in ``predict`` (None: the
                model's own, see models.json; 0: decode boxes exactly as drawn).
            encode_workers: threads that run look-ahead encodes (propagation, prefetch); a slice's
                encode does not depend on the previous mask, so with more than one, the next slices
                are encoded side by side while the decode chain runs (for machines with cores or
                devices to spare; each worker uses the backend's own thread settings).

        Raises:
            SAMSegmentError: ``box_margin`` is not a fraction between 0 and 1 (and the backend's
                own errors when it is built here).
        """
        if isinstance(model, SamBackend):
            self.backend = model
        else:
            self.backend = SamBackend.from_model_id(model or default_model_id(), checkpoint, device, runtime=runtime)
        self.cache = cache if cache is not None else EmbeddingCache(cache_bytes, cache_dir)
        if not (isinstance(encode_workers, int) and 1 <= encode_workers <= 64):
            raise SAMSegmentError(f"encode_workers must be an integer from 1 to 64, got {encode_workers!r}",
                                  "give 1 (one encoder at a time) or the number of encoders to run side by side")
        self.worker = InferenceWorker()
        # decodes of cached slices: never queued behind an encoder call (see the module docstring)
        self.decoder_lane = InferenceWorker(name="samsegment-decode")
        # look-ahead encodes go round-robin over the worker and these
        self.encoders = [self.worker] + [InferenceWorker(name=f"samsegment-encode-{i}")
                                         for i in range(1, encode_workers)]
        self._next_encoder = 0
        self._encoding: dict[Any, Future] = {}  # slice key -> the encode in progress (no slice twice)
        # A session nobody closed must still stop its threads before the interpreter tears down:
        # a daemon thread inside torch at exit aborts the process ("terminate called ...").
        self._finalizer = weakref.finalize(self, _close_workers, self.decoder_lane, *self.encoders)
        self.refine_with_logits = refine_with_logits
        if box_margin is not None and not (np.isfinite(box_margin) and 0.0 <= box_margin <= 1.0):
            raise SAMSegmentError(f"Box margin {box_margin!r} is not a fraction between 0 and 1",
                                  "give e.g. 0.1 for 10 % of the box side, or 0 to use boxes as drawn")
        self.box_margin = self.backend.spec.box_margin if box_margin is None else float(box_margin)
        self.fill_holes = fill_holes
        self.largest_component = largest_component
        self._lock = threading.RLock()
        self._state: VolumeState | None = None  # replaced whole by set_volume, never modified
        self._history: dict[SliceRef, list[Prediction]] = {}  # of the current state's volume
        self._prefetch_generation = 0
        self._closed = False
        self.encode_count = 0
        self._adapter: DecoderAdapter | None = None  # of the current volume and structure; None: stock

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SegmentationSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the session's threads and return at once, never waiting behind a running encode.

        Queued encodes and decodes that have not started are cancelled; the worker and the decode
        lane each end after the call they are in (``join`` waits for that). Later calls that need
        a thread, and calls that were waiting in the queue, raise ``worker.WorkerClosedError`` (a
        ``CancelledError``, hence a ``SAMSegmentError``, and a ``RuntimeError``); a propagation
        running on another thread returns what it decided so far, its fronts stopped as
        ``CANCELLED``. Closing twice is harmless; at interpreter exit the running call is waited
        for, so a script may close (or forget to close) and just exit.
        """
        with self._lock:
            self._closed = True
            self._prefetch_generation += 1
        self._finalizer()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the threads of a closed session have finished their current calls.

        Args:
            timeout: seconds to wait at most, for both threads together (None: no limit).

        Returns:
            True when both threads have ended; False on timeout (or if the session is open).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in (self.decoder_lane, *self.encoders):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not worker.join(left):
                return False
        return True

    @property
    def model_id(self) -> str:
        """The backend's model id (part of every cache key)."""
        return self.backend.model_id

    @property
    def state(self) -> VolumeState:
        """The current volume snapshot (see ``VolumeState``); a later ``set_volume`` replaces it.

        Raises:
            SAMSegmentError: no volume is loaded.
        """
        state = self._state
        if state is None:
            raise SAMSegmentError("No volume is loaded in the session", "call set_volume(array) first")
        return state

    @property
    def has_volume(self) -> bool:
        """Whether ``set_volume`` has loaded a volume."""
        return self._state is not None

    @property
    def _volume(self) -> np.ndarray | None:
        # read by SAMSegmentSlicer (logic.py and its tests) before ``has_volume`` existed
        state = self._state
        return None if state is None else state.volume

    @property
    def volume(self) -> np.ndarray:
        """The current (K, J, I) volume, as passed to ``set_volume``."""
        return self.state.volume

    @property
    def window(self) -> IntensityWindow | None:
        """The current intensity window (None before ``set_volume``)."""
        state = self._state
        return None if state is None else state.window

    @property
    def signature(self) -> str:
        """The current volume's content signature ("" before ``set_volume``)."""
        state = self._state
        return "" if state is None else state.signature

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (K, J, I) shape of the current volume."""
        return self.state.shape

    def set_volume(self, volume: np.ndarray, window: IntensityWindow | str | tuple[float, float] | None = None,
                   modality: str = "auto", overwrite_disk_cache: bool = False) -> IntensityWindow:
        """Load a volume: from here on every call works on it (calls already running finish on the old one).

        Args:
            volume: (K, J, I) scalar array (kept by reference, not copied; do not modify it while
                the session uses it).
            window: an ``IntensityWindow``, a CT preset name, (low, high), or None/"auto" for one
                chosen from the image and ``modality``.
            modality: "auto", "ct" or "mr", for an automatic window.
            overwrite_disk_cache: let a disk cache folder built for another volume, model or window
                be emptied and reused instead of refused.

        Returns:
            The window in use.

        Raises:
            VolumeError: the array is not a usable volume, or nothing is visible through the window.
            CacheMismatchError: the disk cache folder belongs to something else (and no overwrite).
        """
        arr = validate_volume(volume)
        if isinstance(window, IntensityWindow):
            win = window
        elif isinstance(window, str):
            win = auto_window(arr, modality, preset=window) if window != "auto" else auto_window(arr, modality)
        elif window is not None:
            win = IntensityWindow(float(window[0]), float(window[1]))
        else:
            win = auto_window(arr, modality)
        # hashing releases the GIL: it runs beside the windowing
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="samsegment-hash") as pool:
            hashing = pool.submit(volume_signature, arr)
            windowed = win.apply(arr)
            signature = hashing.result()
        if int(windowed.min()) == int(windowed.max()):
            raise VolumeError(f"After windowing to [{win.low:g}, {win.high:g}] ({win.source}) every voxel has the "
                              "same value; nothing is visible to segment",
                              "choose a window that covers the image's intensities (e.g. --window auto or --modality mr)")
        prep_key = f"{self.backend.spec.preprocessing_key()}|window={win.key()}"
        windowed.flags.writeable = False  # shared by every job holding this state
        state = VolumeState(arr, windowed, win, signature, prep_key, self.model_id)
        if self.cache.disk is not None:
            self.cache.disk.bind(signature, self.model_id, prep_key, overwrite=overwrite_disk_cache)
        with self._lock:
            self._prefetch_generation += 1
            self._state = state
            self._history.clear()
            self._adapter = None  # an adapter belongs to the volume (and structure) it was made for
        log.info("volume %s, window [%g, %g] (%s)", arr.shape, win.low, win.high, win.source)
        return win

    # ------------------------------------------------------------------ adaptation
    @property
    def adapter(self) -> DecoderAdapter | None:
        """The adapted decoder every decode goes through, or None for the stock model."""
        return self._adapter

    def use_adapter(self, adapter: DecoderAdapter | None) -> None:
        """Decode through ``adapter`` from now on (None: back to the stock model).

        Prompts, propagation, everything mode and uncertainty all decode through it until the next
        ``set_volume`` or ``use_adapter``; the caller reverts when the user switches structure.

        Raises:
            CheckpointError: the adapter was trained from another model or other weights.
        """
        if adapter is not None:
            adapter.check_model(self.backend)
            # its ONNX graphs now (where the decoder runs in ONNX Runtime), not at the first decode
            self.worker.call(lambda: self.backend.prepare_adapter(adapter), PRIORITY_INTERACTIVE)
        with self._lock:
            self._adapter = adapter

    def adapt(self, axis: int, accepted: dict[int, np.ndarray], structure: str | None = None,
              settings: AdaptSettings | None = None, cancel: CancelToken | None = None,
              progress: ProgressCallback | None = None) -> AdaptationReport:
        """Adapt the decoder to the accepted masks (``adaptation.adapt``) and use it when the
        held-back check keeps it (then ``adapter`` holds it); otherwise the model in use stays.

        Args:
            axis, accepted, structure, settings, cancel, progress: as for ``adaptation.adapt``.

        Returns:
            The ``AdaptationReport`` (``kept`` says whether the adapter is now in use).
        """
        from .adaptation import adapt

        state = self.state
        report, adapter = adapt(self, axis, accepted, structure, settings, cancel, progress)
        if adapter is not None:
            with self._lock:
                if self._state is state:  # a new volume meanwhile: the adapter is not for it
                    self._adapter = adapter
        return report

    def use_stock_model(self) -> None:
        """Decode with the stock model again (``use_adapter(None)``)."""
        self.use_adapter(None)

    def adapter_file_bytes(self, key: bytes | None = None) -> bytes | None:
        """The adapter in use as a signed adapter file's content (None: the stock model is in use).

        Args:
            key: the signing key (None: ``adaptation.signing_key()``).
        """
        from .adaptation import signing_key

        adapter = self._adapter
        return None if adapter is None else adapter.to_bytes(key if key is not None else signing_key())

    def load_adapter_file_bytes(self, data: bytes, key: bytes | None = None, source: str = "the adapter") -> dict:
        """Verify a signed adapter file's content and use it (``use_adapter``).

        Args:
            data: the file's bytes.
            key: the signing key (None: ``adaptation.signing_key()``).
            source: what ``data`` is, for messages.

        Returns:
            {"structure": ..., "report": ...} of the adapter now in use.

        Raises:
            CheckpointError: not an adapter, damaged, not signed with the key, or of another model.
        """
        from .adaptation import DecoderAdapter, signing_key

        adapter = DecoderAdapter.from_bytes(data, key if key is not None else signing_key(), source)
        self.use_adapter(adapter)
        return {"structure": adapter.structure, "report": adapter.report}

    # ------------------------------------------------------------------ slices and embeddings
    def slice_image(self, ref: SliceRef) -> np.ndarray:
        """The windowed uint8 image of a slice of the current volume, as the model sees it before resizing.

        Args:
            ref: the slice (refused with ``VolumeError`` if outside the volume).

        Returns:
            A new (H, W) uint8 array.
        """
        return self.state.slice_image(ref)

    def geometry(self, ref: SliceRef, state: VolumeState | None = None) -> SliceGeometry:
        """The mapping between slice ``ref`` and the model's input frame.

        Args:
            ref: the slice.
            state: the volume snapshot to read (default: the current one); a job that also takes
                an embedding passes the same ``session.state`` to both.

        Returns:
            The backend's ``SliceGeometry`` for the slice's (H, W).
        """
        return self._geometry(self.state if state is None else state, ref)

    def _geometry(self, state: VolumeState, ref: SliceRef) -> SliceGeometry:
        return self.backend.geometry(*state.slice_size(ref))

    def is_cached(self, ref: SliceRef) -> bool:
        """Whether the embedding of slice ``ref`` of the current volume is cached (memory or disk).

        Args:
            ref: the slice.

        Returns:
            True when a prompt on it needs no encode; False also when no volume is loaded.
        """
        state = self._state
        return state is not None and state.key(ref) in self.cache

    def is_constant(self, ref: SliceRef) -> bool:
        """Whether slice ``ref`` of the current volume is one value after windowing (nothing to segment).

        Args:
            ref: the slice.

        Returns:
            True when every pixel of the windowed slice is equal.
        """
        return self.state.is_constant(ref)

    def _embedding_now(self, ref: SliceRef, state: VolumeState, lookahead: bool = False):
        """Embedding of slice ``ref`` of ``state``'s volume, encoded and cached on a miss; on the worker thread.

        A ``lookahead`` job (prefetch, ``encode_async``) of a session closed since it was taken
        returns None instead of starting an encoder call nobody will use.
        """
        key = state.key(ref)
        while True:
            emb = self.cache.get(key)
            if emb is not None:
                return emb
            if lookahead and self._closed:
                return None
            with self._lock:
                running = self._encoding.get(key)
                if running is None:
                    mine = self._encoding[key] = Future()
            if running is None:
                break
            running.result()  # another encoder has this slice in hand; then read it from the cache
        try:
            fresh = self.backend.encode(state.slice_image(ref))
            with self._lock:
                self.encode_count += 1
            self.cache.put(key, fresh)
            # the cache's precision, as a hit would return it: masks do not depend on who encoded first
            return self.cache.as_stored(fresh).to(fresh.device).float()
        finally:
            with self._lock:
                del self._encoding[key]
            mine.set_result(None)

    def _embedding(self, ref: SliceRef, state: VolumeState, priority: int):
        check_slice_ref(state.shape, ref)
        return self.worker.call(lambda: self._embedding_now(ref, state), priority)

    def embedding(self, ref: SliceRef, priority: int = PRIORITY_INTERACTIVE, state: VolumeState | None = None):
        """The image embedding of slice ``ref``, encoding (and caching) it on the worker if needed.

        Args:
            ref: the slice.
            priority: the worker queue priority of the encode (``PRIORITY_*``); on the worker
                thread itself the call runs inline.
            state: the volume snapshot to encode from (default: the current one); a job that
                also reads the slice image or geometry takes ``session.state`` once and passes it.

        Returns:
            The embedding as a float32 tensor, rounded to the cache's precision (``EmbeddingCache.as_stored``)
            whether it was just encoded or came from the cache.
        """
        return self._embedding(ref, self.state if state is None else state, priority)

    def encode_async(self, ref: SliceRef, priority: int = PRIORITY_PROPAGATION) -> Future:
        """Queue the encode of ``ref`` on the worker and return at once (propagation's look-ahead).

        Unlike ``prefetch`` it does not supersede other queued look-ahead, so several propagation
        fronts can each keep one slice ahead.

        Args:
            ref: a slice of the current volume.
            priority: the worker queue priority (``PRIORITY_*``).

        Returns:
            A future resolving to True when an encode was needed, False when the slice was already
            cached, is constant, or the volume was replaced (or the session closed) before the
            encode started (it then encodes nothing). Cancelling it before it starts drops the encode.
        """
        state = self.state
        check_slice_ref(state.shape, ref)
        key = state.key(ref)
        if key in self.cache:
            done: Future = Future()
            done.set_result(False)
            return done

        def run() -> bool:
            if self._state is not state or key in self.cache or state.is_constant(ref):
                return False
            return self._embedding_now(ref, state, lookahead=True) is not None

        return self._encoder().submit(run, priority)

    def _encoder(self) -> InferenceWorker:
        """The worker for the next look-ahead encode (round-robin)."""
        with self._lock:
            self._next_encoder = (self._next_encoder + 1) % len(self.encoders)
            return self.encoders[self._next_encoder]

    def prefetch(self, around: SliceRef, radius: int = 2, direction: int = 0) -> int:
        """Queue background encodes of the neighbours of ``around``, nearest first.

        A newer prefetch request, or a new volume, supersedes older queued ones, so scrolling
        fast never builds a backlog.

        Args:
            around: the slice the user is on (itself not queued).
            radius: how many slices on each side.
            direction: +1/-1 puts the slices the user scrolls or propagates towards first; 0 puts
                the next slice first.

        Returns:
            The number of slices queued (cached ones are skipped); 0 when no volume is loaded.
        """
        with self._lock:
            state = self._state
            if state is None or radius <= 0:
                return 0
            self._prefetch_generation += 1
            generation = self._prefetch_generation
        n = state.shape[around.axis]
        order: list[int] = []
        for step in range(1, radius + 1):
            forward, backward = around.index + step, around.index - step
            pair = (backward, forward) if direction < 0 else (forward, backward)
            order.extend(i for i in pair if 0 <= i < n)
        queued = 0
        for index in order:
            ref = SliceRef(around.axis, index)
            if state.key(ref) in self.cache:
                continue
            self._encoder().submit(lambda ref=ref: self._prefetch_one(ref, state, generation), PRIORITY_PREFETCH)
            queued += 1
        return queued

    def _prefetch_one(self, ref: SliceRef, state: VolumeState, generation: int) -> None:
        if generation != self._prefetch_generation or state.key(ref) in self.cache or state.is_constant(ref):
            return
        self._embedding_now(ref, state, lookahead=True)

    def encode_slices(self, refs: Iterable[SliceRef], progress: ProgressCallback | None = None,
                      cancel: CancelToken | None = None) -> int:
        """Encode (and cache) many slices of the current volume, e.g. for ``samsegment embed``.

        Args:
            refs: the slices, encoded in this order (constant slices are skipped).
            progress: called after each slice with (done, total, message).
            cancel: checked before each slice; cancelling raises ``errors.CancelledError``.

        Returns:
            How many slices were encoded (cached ones cost nothing and are not counted).
        """
        refs = list(refs)
        state = self.state
        before = self.encode_count
        for done, ref in enumerate(refs):
            if cancel is not None:
                cancel.raise_if_cancelled()
            if not state.is_constant(ref):
                self._embedding(ref, state, PRIORITY_INTERACTIVE)
            if progress is not None:
                progress(done + 1, len(refs), f"slice {ref.index}")
        return self.encode_count - before

    # ------------------------------------------------------------------ prompting
    def _check_prompts(self, ref: SliceRef, prompts: Prompts, state: VolumeState) -> Prompts:
        return check_prompts(prompts, *state.slice_size(ref))

    def decode(self, ref: SliceRef, prompts: Prompts, mask_input: Any = None, priority: int = PRIORITY_INTERACTIVE,
               record: bool = False) -> Prediction:
        """Decode ``prompts`` on ``ref`` (encoding it first if needed); propagation uses this
        directly with its own boxes and mask inputs.

        Args:
            ref: a slice of the current volume.
            prompts: points and/or box in slice pixels, decoded as given (a box past the edge is
                clipped; no margin is added, unlike ``predict``).
            mask_input: low-res (1, 1, 256, 256) logits for the decoder's mask prompt, or None.
            priority: the queue priority (``PRIORITY_*``) of the encode and the decode.
            record: append the prediction to the slice's history (as ``predict`` does).

        Returns:
            The ``Prediction``.

        Raises:
            PromptError: no prompt, only exclude points, or a prompt outside the slice.
            VolumeError: the slice is outside the volume, or constant after windowing.
        """
        return self._decode(ref, prompts, self.state, mask_input, priority, record)

    def _decode(self, ref: SliceRef, prompts: Prompts, state: VolumeState, mask_input: Any, priority: int,
                record: bool) -> Prediction:
        prompts = self._check_prompts(ref, prompts, state)
        if state.is_constant(ref):
            raise constant_slice_error(ref, state.slice_image(ref))
        key = state.key(ref)
        adapter = self._adapter

        def run() -> Prediction:
            emb = None
            if threading.current_thread() is self.decoder_lane.thread:
                emb = self.cache.get(key)
                if emb is None:  # evicted since it was queued here: encode on the worker, as for any miss
                    emb = self.worker.call(lambda: self._embedding_now(ref, state), priority)
            else:
                emb = self._embedding_now(ref, state)
            geom = self._geometry(state, ref)
            single_point = prompts.box is None and len(prompts.points) == 1
            multimask = single_point and mask_input is None and self.backend.spec.multimask_output
            out = self.backend.decode(emb, geom, prompts.points if len(prompts.points) else None, prompts.labels,
                                      prompts.box, mask_input, multimask, features_key=key, adapter=adapter)
            mask = out.logits > 0.0
            if self.fill_holes or self.largest_component:
                from .postprocess import postprocess

                mask = postprocess(mask, fill_holes=self.fill_holes, largest_component=self.largest_component)
            return Prediction(ref, mask, out.score, out.low_res_logits, out.logits, prompts)

        # a cached slice is decoded on the decode lane, so the decode never waits for an encoder
        # call running (or queued ahead of it) on the worker; a slice to encode first goes to the worker
        lane = self.decoder_lane if key in self.cache else self.worker
        pred = lane.call(run, priority)
        if record:
            with self._lock:
                if self._state is state:  # a new volume came meanwhile: this is not its history
                    self._history.setdefault(ref, []).append(pred)
        return pred

    def predict(self, ref: SliceRef, prompts: Prompts, refine: bool = True) -> Prediction:
        """Mask for the user's current prompts on ``ref``, recorded in the slice's history.

        When the slice already has a prediction and ``refine`` is on, its low-res logits go in as
        the mask prompt, so a corrective click edits the mask instead of starting over. The box
        gets the session's ``box_margin`` (models that learnt from loose boxes under-segment from
        a tight one); propagation composes its own boxes and calls ``decode``, which takes boxes
        as given.

        Args:
            ref: a slice of the current volume.
            prompts: the full current set on that slice (all clicks so far and the box).
            refine: feed the previous prediction's logits back (when ``refine_with_logits`` is on
                and there are points).

        Returns:
            The ``Prediction`` (its ``prompts`` carry the box as decoded, widened and clipped).

        Raises:
            PromptError: as for ``decode``; also points without a box for a box-trained model.
            VolumeError: as for ``decode``.
        """
        with self._lock:  # the volume and its history, as one
            state = self.state
            history = self._history.get(ref)
            previous = history[-1] if history else None
        check_slice_ref(state.shape, ref)
        if self.backend.spec.needs_box and prompts.box is None and len(prompts.points):
            # a point outside the slice is reported as such first
            require_box(self.backend.spec, self._check_prompts(ref, prompts, state))
        if prompts.box is not None and self.box_margin > 0.0:
            checked = self._check_prompts(ref, prompts, state)  # a zero-area or outside box is refused as drawn
            prompts = Prompts(checked.points, checked.labels, self._user_box(state, ref, checked.box))
        mask_input = None
        if refine and self.refine_with_logits and previous is not None and len(prompts.points):
            mask_input = previous.low_res_logits
        return self._decode(ref, prompts, state, mask_input, PRIORITY_INTERACTIVE, record=True)

    def user_box(self, ref: SliceRef, box: np.ndarray) -> np.ndarray:
        """The box ``predict`` decodes for ``box`` drawn by the user on ``ref``; anything that
        reasons about the user's box decodes this one too.

        Args:
            ref: a slice of the current volume.
            box: (x0, y0, x1, y1) in slice pixels.

        Returns:
            The box widened by ``box_margin`` (at least the model's minimum, never past the
            slice), as float64; unchanged when the margin is 0.
        """
        return self._user_box(self.state, ref, box)

    def _user_box(self, state: VolumeState, ref: SliceRef, box: np.ndarray) -> np.ndarray:
        if self.box_margin <= 0.0:
            return np.asarray(box, dtype=np.float64)
        return widen_box(box, self._geometry(state, ref), self.box_margin, self.backend.spec.box_margin_min_px)

    def current(self, ref: SliceRef) -> Prediction | None:
        """The latest prediction on ``ref`` (None if none).

        Args:
            ref: a slice of the current volume.

        Returns:
            The last ``Prediction`` recorded on the slice, or None.
        """
        with self._lock:
            history = self._history.get(ref)
            return history[-1] if history else None

    def undo(self, ref: SliceRef) -> Prediction | None:
        """Drop the last prediction on ``ref``.

        Args:
            ref: a slice of the current volume.

        Returns:
            The prediction now current, or None if none is left.

        Raises:
            SAMSegmentError: the slice has no prediction to drop.
        """
        with self._lock:
            history = self._history.get(ref)
            if not history:
                raise SAMSegmentError(f"Nothing to undo on slice {ref.index} (axis {ref.axis})",
                                      "place a prompt first")
            history.pop()
            return history[-1] if history else None

    def reset(self, ref: SliceRef | None = None) -> None:
        """Forget the prompt history of one slice, or of all; cached embeddings stay.

        Args:
            ref: the slice, or None for every slice.
        """
        with self._lock:
            if ref is None:
                self._history.clear()
            else:
                self._history.pop(ref, None)
