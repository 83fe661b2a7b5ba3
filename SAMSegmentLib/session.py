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
"""

from __future__ import annotations

import logging
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .backends import LOW_RES_SIZE, SamBackend
from .cache import DEFAULT_BUDGET_BYTES, CacheKey, EmbeddingCache
from .errors import PromptError, SAMSegmentError, VolumeError
from .model_registry import default_model_id
from .preprocessing import (IntensityWindow, SliceGeometry, auto_window, clip_box, validate_prompt_geometry,
                            widen_box)
from .prompts import Prompts
from .volume import SliceRef, check_slice_ref, get_slice, validate_volume, volume_signature
from .worker import (PRIORITY_INTERACTIVE, PRIORITY_PREFETCH, PRIORITY_PROPAGATION, CancelToken, InferenceWorker,
                     ProgressCallback)

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
        return int(np.count_nonzero(self.mask))


def _close_workers(*workers: InferenceWorker) -> None:
    for worker in workers:
        worker.close()


class SegmentationSession:
    """Segment slices of one volume with one model; thread-safe for one GUI + the internal worker."""

    def __init__(self, model: str | SamBackend | None = None, checkpoint: str | Path | None = None,
                 device: str | None = None, cache_bytes: int = DEFAULT_BUDGET_BYTES,
                 cache_dir: str | Path | None = None, refine_with_logits: bool = True,
                 fill_holes: bool = False, largest_component: bool = False, runtime: str | None = None,
                 box_margin: float | None = None) -> None:
        """``runtime``: "auto" (default, or ``$SAMSEGMENT_RUNTIME``), "eager" or "onnx" for a backend
        built here from ``model``; ignored when ``model`` is an already-built ``SamBackend``.
        ``box_margin``: fraction of a user box's side added around it in ``predict`` (None: the
        model's own, see models.json; 0: decode boxes exactly as drawn)."""
        if isinstance(model, SamBackend):
            self.backend = model
        else:
            self.backend = SamBackend.from_model_id(model or default_model_id(), checkpoint, device, runtime=runtime)
        self.cache = EmbeddingCache(cache_bytes, cache_dir)
        self.worker = InferenceWorker()
        # decodes of cached slices: never queued behind an encoder call (see the module docstring)
        self.decoder_lane = InferenceWorker(name="samsegment-decode")
        # A session nobody closed must still stop its threads before the interpreter tears down:
        # a daemon thread inside torch at exit aborts the process ("terminate called ...").
        self._finalizer = weakref.finalize(self, _close_workers, self.worker, self.decoder_lane)
        self.refine_with_logits = refine_with_logits
        if box_margin is not None and not (np.isfinite(box_margin) and 0.0 <= box_margin <= 1.0):
            raise SAMSegmentError(f"Box margin {box_margin!r} is not a fraction between 0 and 1",
                                  "give e.g. 0.1 for 10 % of the box side, or 0 to use boxes as drawn")
        self.box_margin = self.backend.spec.box_margin if box_margin is None else float(box_margin)
        self.fill_holes = fill_holes
        self.largest_component = largest_component
        self._lock = threading.RLock()
        self._volume: np.ndarray | None = None
        self._windowed: np.ndarray | None = None
        self.window: IntensityWindow | None = None
        self.signature = ""
        self._prep_key = ""
        self._history: dict[SliceRef, list[Prediction]] = {}
        self._prefetch_generation = 0
        self.encode_count = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SegmentationSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._prefetch_generation += 1
        self._finalizer()

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    @property
    def volume(self) -> np.ndarray:
        if self._volume is None:
            raise SAMSegmentError("No volume is loaded in the session", "call set_volume(array) first")
        return self._volume

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape)  # type: ignore[return-value]

    def set_volume(self, volume: np.ndarray, window: IntensityWindow | str | tuple[float, float] | None = None,
                   modality: str = "auto", overwrite_disk_cache: bool = False) -> IntensityWindow:
        """Load a (K, J, I) volume; ``window`` is an IntensityWindow, a CT preset name, (low, high) or auto."""
        arr = validate_volume(volume)
        if isinstance(window, IntensityWindow):
            win = window
        elif isinstance(window, str):
            win = auto_window(arr, modality, preset=window) if window != "auto" else auto_window(arr, modality)
        elif window is not None:
            win = IntensityWindow(float(window[0]), float(window[1]))
        else:
            win = auto_window(arr, modality)
        # hashing releases the GIL: it runs beside the windowing (0.26 -> 0.15 s for 200 x 512 x 512 int16)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="samsegment-hash") as pool:
            hashing = pool.submit(volume_signature, arr)
            windowed = win.apply(arr)
            signature = hashing.result()
        if int(windowed.min()) == int(windowed.max()):
            raise VolumeError(f"After windowing to [{win.low:g}, {win.high:g}] ({win.source}) every voxel has the "
                              "same value; nothing is visible to segment",
                              "choose a window that covers the image's intensities (e.g. --window auto or --modality mr)")
        prep_key = f"{self.backend.spec.preprocessing_key()}|window={win.key()}"
        if self.cache.disk is not None:
            self.cache.disk.bind(signature, self.model_id, prep_key, overwrite=overwrite_disk_cache)
        with self._lock:
            self._prefetch_generation += 1
            self._volume, self._windowed, self.window = arr, windowed, win
            self.signature, self._prep_key = signature, prep_key
            self._history.clear()
        log.info("volume %s, window [%g, %g] (%s)", arr.shape, win.low, win.high, win.source)
        return win

    # ------------------------------------------------------------------ slices and embeddings
    def slice_image(self, ref: SliceRef) -> np.ndarray:
        """The windowed uint8 image of a slice, as the model sees it before resizing."""
        if self._windowed is None:
            raise SAMSegmentError("No volume is loaded in the session", "call set_volume(array) first")
        return get_slice(self._windowed, ref)

    def geometry(self, ref: SliceRef) -> SliceGeometry:
        h, w = self.slice_image(ref).shape
        return self.backend.geometry(h, w)

    def _key(self, ref: SliceRef) -> CacheKey:
        return CacheKey(self.signature, ref.axis, ref.index, self.model_id, self._prep_key)

    def is_cached(self, ref: SliceRef) -> bool:
        return self._key(ref) in self.cache

    def is_constant(self, ref: SliceRef) -> bool:
        image = self.slice_image(ref)
        return int(image.min()) == int(image.max())

    def _embedding_now(self, ref: SliceRef):
        """Embedding of ``ref``; must run on the worker thread."""
        key = self._key(ref)
        emb = self.cache.get(key)
        if emb is None:
            image = self.slice_image(ref)
            emb = self.backend.encode(image)
            self.encode_count += 1
            self.cache.put(key, emb)
        return emb

    def embedding(self, ref: SliceRef, priority: int = PRIORITY_INTERACTIVE):
        check_slice_ref(self.shape, ref)
        return self.worker.call(lambda: self._embedding_now(ref), priority)

    def encode_async(self, ref: SliceRef, priority: int = PRIORITY_PROPAGATION) -> Future:
        """Queue the encode of ``ref`` on the worker and return at once (propagation's look-ahead).

        The future resolves to True when an encode was needed, False when the slice was already
        cached; cancelling it before it starts drops the encode. Unlike ``prefetch`` it does not
        supersede other queued look-ahead, so several propagation fronts can each keep one slice
        ahead.
        """
        check_slice_ref(self.shape, ref)
        key = self._key(ref)
        if key in self.cache:
            done: Future = Future()
            done.set_result(False)
            return done

        def run() -> bool:
            if key in self.cache or self.is_constant(ref):
                return False
            self._embedding_now(ref)
            return True

        return self.worker.submit(run, priority)

    def prefetch(self, around: SliceRef, radius: int = 2, direction: int = 0) -> int:
        """Queue background encodes of the neighbours of ``around``, nearest first.

        ``direction`` +1/-1 puts the slices the user scrolls or propagates towards first. A newer
        prefetch request supersedes older queued ones, so scrolling fast never builds a backlog.
        Returns the number of slices queued.
        """
        if self._volume is None or radius <= 0:
            return 0
        n = self.shape[around.axis]
        order: list[int] = []
        for step in range(1, radius + 1):
            forward, backward = around.index + step, around.index - step
            pair = (backward, forward) if direction < 0 else (forward, backward)
            order.extend(i for i in pair if 0 <= i < n)
        with self._lock:
            self._prefetch_generation += 1
            generation = self._prefetch_generation
        queued = 0
        for index in order:
            ref = SliceRef(around.axis, index)
            if self.is_cached(ref):
                continue
            self.worker.submit(lambda ref=ref: self._prefetch_one(ref, generation), PRIORITY_PREFETCH)
            queued += 1
        return queued

    def _prefetch_one(self, ref: SliceRef, generation: int) -> None:
        if generation != self._prefetch_generation or self.is_cached(ref) or self.is_constant(ref):
            return
        self._embedding_now(ref)

    def encode_slices(self, refs: Iterable[SliceRef], progress: ProgressCallback | None = None,
                      cancel: CancelToken | None = None) -> int:
        """Encode (and cache) many slices, e.g. for ``samsegment embed``; returns how many were encoded."""
        refs = list(refs)
        before = self.encode_count
        for done, ref in enumerate(refs):
            if cancel is not None:
                cancel.raise_if_cancelled()
            if not self.is_constant(ref):
                self.embedding(ref, PRIORITY_INTERACTIVE)
            if progress is not None:
                progress(done + 1, len(refs), f"slice {ref.index}")
        return self.encode_count - before

    # ------------------------------------------------------------------ prompting
    def _check_prompts(self, ref: SliceRef, prompts: Prompts) -> Prompts:
        h, w = self.slice_image(ref).shape
        if prompts.is_empty:
            raise PromptError("No prompt given", "click an include point or drag a box on the structure")
        if not prompts.has_include:
            raise PromptError("Only exclude points were given; SAM needs to know what to include",
                              "add an include point or a box on the structure")
        validate_prompt_geometry(h, w, prompts.points, prompts.box)
        box = None if prompts.box is None else clip_box(prompts.box, h, w)
        return Prompts(prompts.points, prompts.labels, box)

    def decode(self, ref: SliceRef, prompts: Prompts, mask_input: Any = None, priority: int = PRIORITY_INTERACTIVE,
               record: bool = False) -> Prediction:
        """Decode ``prompts`` on ``ref`` (encoding it first if needed) without touching the history
        unless ``record``; propagation uses this directly with its own mask inputs."""
        prompts = self._check_prompts(ref, prompts)
        if self.is_constant(ref):
            value = int(self.slice_image(ref).flat[0])
            raise VolumeError(f"Slice {ref.index} along axis {ref.axis} is constant after windowing (all {value}); "
                              "there is nothing to segment on it", "choose another slice or widen the intensity window")

        def run() -> Prediction:
            emb = None
            if threading.current_thread() is self.decoder_lane.thread:
                emb = self.cache.get(self._key(ref))
                if emb is None:  # evicted since it was queued here: encode on the worker, as for any miss
                    emb = self.worker.call(lambda: self._embedding_now(ref), priority)
            else:
                emb = self._embedding_now(ref)
            geom = self.geometry(ref)
            single_point = prompts.box is None and len(prompts.points) == 1
            multimask = single_point and mask_input is None and self.backend.spec.multimask_output
            out = self.backend.decode(emb, geom, prompts.points if len(prompts.points) else None, prompts.labels,
                                      prompts.box, mask_input, multimask, features_key=self._key(ref))
            mask = out.logits > 0.0
            if self.fill_holes or self.largest_component:
                from .postprocess import postprocess

                mask = postprocess(mask, fill_holes=self.fill_holes, largest_component=self.largest_component)
            return Prediction(ref, mask, out.score, out.low_res_logits, out.logits, prompts)

        # a cached slice is decoded on the decode lane, so the decode never waits for an encoder
        # call running (or queued ahead of it) on the worker; a slice to encode first goes to the worker
        lane = self.decoder_lane if self.is_cached(ref) else self.worker
        pred = lane.call(run, priority)
        if record:
            with self._lock:
                self._history.setdefault(ref, []).append(pred)
        return pred

    def predict(self, ref: SliceRef, prompts: Prompts, refine: bool = True) -> Prediction:
        """Mask for the user's current prompts on ``ref``.

        ``prompts`` is the full current set on that slice (all clicks so far and the box). When
        the slice already has a prediction and ``refine`` is on, its low-res logits go in as the
        mask prompt, so a corrective click edits the mask instead of starting over. The box gets
        the session's ``box_margin`` (models that learnt from loose boxes under-segment from a tight
        one); propagation composes its own boxes and calls ``decode``, which takes boxes as given.
        """
        check_slice_ref(self.shape, ref)
        if self.backend.spec.needs_box and prompts.box is None and len(prompts.points):
            self._check_prompts(ref, prompts)  # a point outside the slice is reported as such first
            raise PromptError(f"{self.backend.spec.name} segments from a box; points alone give no reliable mask",
                              "drag a box around the structure first (points then refine it), "
                              "or choose a SAM model for click-only prompts")
        if prompts.box is not None and self.box_margin > 0.0:
            checked = self._check_prompts(ref, prompts)  # a zero-area or outside box is refused as drawn
            prompts = Prompts(checked.points, checked.labels, self.user_box(ref, checked.box))
        mask_input = None
        with self._lock:
            history = self._history.get(ref)
            previous = history[-1] if history else None
        if refine and self.refine_with_logits and previous is not None and len(prompts.points):
            mask_input = previous.low_res_logits
        return self.decode(ref, prompts, mask_input=mask_input, record=True)

    def user_box(self, ref: SliceRef, box: np.ndarray) -> np.ndarray:
        """The box ``predict`` decodes for ``box`` drawn by the user on ``ref`` (widened by
        ``box_margin``); anything that reasons about the user's box decodes this one too."""
        if self.box_margin <= 0.0:
            return np.asarray(box, dtype=np.float64)
        return widen_box(box, self.geometry(ref), self.box_margin, self.backend.spec.box_margin_min_px)

    def current(self, ref: SliceRef) -> Prediction | None:
        with self._lock:
            history = self._history.get(ref)
            return history[-1] if history else None

    def undo(self, ref: SliceRef) -> Prediction | None:
        """Drop the last prediction on ``ref``; returns the one now current (None if none is left)."""
        with self._lock:
            history = self._history.get(ref)
            if not history:
                raise SAMSegmentError(f"Nothing to undo on slice {ref.index} (axis {ref.axis})",
                                      "place a prompt first")
            history.pop()
            return history[-1] if history else None

    def reset(self, ref: SliceRef | None = None) -> None:
        """Forget the prompt history of one slice (or all); cached embeddings stay."""
        with self._lock:
            if ref is None:
                self._history.clear()
            else:
                self._history.pop(ref, None)

    def low_res_from_mask(self, ref: SliceRef, mask: np.ndarray):
        """A slice mask as decoder mask-input logits, for prompting from a mask the user drew."""
        return self.geometry(ref).mask_to_low_res(mask, LOW_RES_SIZE)
