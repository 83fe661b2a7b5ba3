"""What ``samsegment serve`` holds between requests: models, volumes, client sessions and jobs.

* **Models**: one ``SamBackend`` per model id, loaded on first use and shared by every client.
* **Volumes**: stored once under their content address (``wire.volume_id``), least recently used
  dropped past ``Limits.max_volumes``.
* **Sessions**: one engine ``SegmentationSession`` per client session (its prompt history and
  refinement state are that client's), all sessions of one model sharing one embedding cache, whose
  keys hold the volume's content signature, the model and the preprocessing: two clients on the
  same study reuse each other's embeddings.
* **Jobs**: propagation, everything mode, SAMAug, prompt uncertainty and adaptation run on a bounded pool;
  a client polls a job for the slices decided so far and can cancel it. The engine functions run
  unchanged: the server adds transport, never a second copy of the algorithms.
* **Adapters**: a session's adapted decoder (``SegmentationSession.adapt``) lives in its session;
  it travels as a signed adapter file, signed and verified with this server's key
  (``adapter_key``: ``adaptation.signing_key``, ``$SAMSEGMENT_ADAPTER_KEY`` on the server).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import CancelledError, SAMSegmentError
from ..worker import CancelToken


class NotFound(SAMSegmentError):
    """An id the server does not know (or no longer holds)."""


class Overloaded(SAMSegmentError):
    """The server is at its bound for this kind of work; retry after ``retry_after`` seconds."""

    def __init__(self, problem: str, remedy: str, retry_after: int = 2) -> None:
        super().__init__(problem, remedy)
        self.retry_after = retry_after


class TooLarge(SAMSegmentError):
    """A request or volume beyond the server's limits."""


class NoAdapter(NotFound):
    """The session decodes with the stock model: it has no adapter to send."""


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one client from exhausting the server; reported by ``/v1/info``."""

    max_request_bytes: int = 1 << 30
    max_volume_voxels: int = 600_000_000
    max_dimension: int = 4096
    max_volumes: int = 8
    max_sessions: int = 64
    max_running_jobs: int = 2
    max_queued_jobs: int = 8
    max_inflight_predictions: int = 8
    max_prefetch_radius: int = 4  # look-ahead encodes per prompt on each side (0: none, e.g. a busy shared server)
    finished_job_ttl_s: float = 600.0
    max_adapter_bytes: int = 64 << 20  # a signed adapter file (LiteMedSAM's: ~16 MiB)

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ClientSession:
    """One client's engine session on one volume."""

    id: str
    volume_id: str
    session: Any  # SegmentationSession
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Job:
    """Long engine work for one client session, polled by the client."""

    id: str
    kind: str
    session_id: str
    cancel: CancelToken = field(default_factory=CancelToken)
    state: str = "queued"  # queued, running, done, cancelled, failed
    progress: tuple[int, int, str] = (0, 0, "")
    slices: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    finished_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_slice(self, item: dict[str, Any]) -> None:
        with self.lock:
            self.slices.append(item)

    def snapshot(self, after: int = 0) -> dict[str, Any]:
        """The job's state for a poll: slices from number ``after`` on, and the result once finished."""
        with self.lock:
            return {"job_id": self.id, "kind": self.kind, "state": self.state, "progress": list(self.progress),
                    "slices": self.slices[after:], "next": len(self.slices), "result": self.result,
                    "error": self.error}


def new_id() -> str:
    return secrets.token_hex(16)


class ServerState:
    """Models, volumes, sessions and jobs of one server process (thread-safe)."""

    def __init__(self, limits: Limits | None = None, device: str | None = None, runtime: str | None = None,
                 cache_bytes: int = 2 << 30, registry: str | None = None, backends: tuple[Any, ...] = (),
                 checkpoints: dict[str, str] | None = None, encode_workers: int = 1,
                 adapter_key_file: str | None = None) -> None:
        """``backends``: already built ``SamBackend``s to serve (tests, benchmarks); others load on demand.
        ``checkpoints``: model id -> the user's weights file, for models that ship none (SAM, MedSAM).
        ``encode_workers``: look-ahead encoders per client session (``SegmentationSession``).
        ``adapter_key_file``: the key that signs and verifies adapter files (None:
        ``adaptation.default_key_path()``, i.e. ``$SAMSEGMENT_ADAPTER_KEY`` or the user's own)."""
        self.limits = limits or Limits()
        self.device = device
        self.runtime = runtime
        self.cache_bytes = cache_bytes
        self.registry = registry
        self.checkpoints = dict(checkpoints or {})
        self.encode_workers = encode_workers
        self.adapter_key_file = adapter_key_file
        self._lock = threading.RLock()
        self._backends: dict[str, Any] = {backend.model_id: backend for backend in backends}
        self._caches: dict[str, Any] = {}
        self._volumes: OrderedDict[str, np.ndarray] = OrderedDict()
        self._sessions: dict[str, ClientSession] = {}
        self._jobs: dict[str, Job] = {}
        self._pool = ThreadPoolExecutor(max_workers=self.limits.max_running_jobs, thread_name_prefix="samsegment-job")
        self._predictions = threading.BoundedSemaphore(self.limits.max_inflight_predictions)

    # ---------------------------------------------------------------- models
    def backend(self, model_id: str | None):
        """The loaded backend of ``model_id`` (the registry's default for None), loading it once."""
        from ..backends import SamBackend
        from ..model_registry import get_spec

        spec = get_spec(model_id, self.registry)
        with self._lock:
            backend = self._backends.get(spec.id)
            if backend is None:
                backend = SamBackend.from_model_id(spec.id, self.checkpoints.get(spec.id), device=self.device,
                                                   runtime=self.runtime, extra_registry=self.registry)
                self._backends[spec.id] = backend
            return backend

    def clear_caches(self) -> None:
        """Drop every embedding the server holds in memory (benchmarks start from cold caches)."""
        with self._lock:
            caches = list(self._caches.values())
        for cache in caches:
            cache.clear()

    def loaded_devices(self) -> dict[str, str]:
        with self._lock:
            return {model_id: str(backend.device) for model_id, backend in self._backends.items()}

    def adapter_key(self) -> bytes:
        """The key this server signs and verifies adapter files with (made on first use).

        Raises:
            CheckpointError: the key file cannot be read or made.
        """
        from ..adaptation import signing_key

        return signing_key(self.adapter_key_file)

    # ---------------------------------------------------------------- volumes
    def check_volume_shape(self, shape: tuple[int, ...]) -> None:
        limits = self.limits
        if len(shape) != 3 or min(shape) < 1:
            raise TooLarge(f"Volume shape {shape} is not a non-empty (K, J, I) shape", "send a 3D volume")
        if max(shape) > limits.max_dimension or int(np.prod(shape)) > limits.max_volume_voxels:
            raise TooLarge(f"Volume {shape} exceeds this server's limits ({limits.max_dimension} per side, "
                           f"{limits.max_volume_voxels} voxels)", "crop or resample the volume, or ask the "
                           "server's administrator to raise --max-volume-voxels")

    def put_volume(self, volume_id: str, array: np.ndarray, content: str | None = None) -> None:
        """Store ``array`` under its content address; the id must be the array's ``wire.volume_id``
        (``content``: that id, when it was computed as the bytes arrived)."""
        from ..wire import volume_id as content_id

        self.check_volume_shape(array.shape)
        if (content or content_id(array)) != volume_id:
            raise SAMSegmentError("The volume's bytes do not match its id (sha256 of dtype, shape and data)",
                                  "upload with SAMSegmentLib.client, or compute the id with wire.volume_id")
        with self._lock:
            self._volumes[volume_id] = array
            self._volumes.move_to_end(volume_id)
            in_use = {s.volume_id for s in self._sessions.values()}
            for old in list(self._volumes):
                if len(self._volumes) <= self.limits.max_volumes:
                    break
                if old not in in_use:
                    del self._volumes[old]

    def has_volume(self, volume_id: str) -> bool:
        with self._lock:
            return volume_id in self._volumes

    def volume(self, volume_id: str) -> np.ndarray:
        with self._lock:
            array = self._volumes.get(volume_id)
            if array is None:
                raise NotFound(f"Volume {volume_id[:12]} is not on this server", "upload it again (PUT /v1/volumes/<id>)")
            self._volumes.move_to_end(volume_id)
            return array

    # ---------------------------------------------------------------- sessions
    def open_session(self, volume_id: str, model: str | None, window: Any, modality: str,
                     box_margin: float | None) -> ClientSession:
        """A new engine session for one client on a stored volume (its own prompt history)."""
        from ..cache import EmbeddingCache
        from ..session import SegmentationSession

        volume = self.volume(volume_id)
        backend = self.backend(model)
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                self._drop_idle_session()
            cache = self._caches.get(backend.model_id)
            if cache is None:
                cache = self._caches[backend.model_id] = EmbeddingCache(self.cache_bytes)
        session = SegmentationSession(model=backend, box_margin=box_margin, cache=cache,
                                      encode_workers=self.encode_workers)
        session.set_volume(volume, window, modality=modality)
        client = ClientSession(new_id(), volume_id, session)
        with self._lock:
            self._sessions[client.id] = client
        return client

    def session(self, session_id: str) -> ClientSession:
        with self._lock:
            client = self._sessions.get(session_id)
            if client is None:
                raise NotFound(f"Session {session_id[:12]} does not exist on this server (it was closed, or the "
                               "server restarted)", "open a new session (the client does this by itself)")
            client.last_used = time.monotonic()
            return client

    def close_session(self, session_id: str) -> None:
        with self._lock:
            client = self._sessions.pop(session_id, None)
            jobs = [j for j in self._jobs.values() if j.session_id == session_id]
        for job in jobs:
            job.cancel.cancel()
        if client is not None:
            client.session.close()

    def _drop_idle_session(self) -> None:
        busy = {j.session_id for j in self._jobs.values() if j.state in ("queued", "running")}
        idle = [c for c in self._sessions.values() if c.id not in busy]
        if not idle:
            raise Overloaded(f"The server holds {len(self._sessions)} sessions, all busy",
                             "retry later, or close sessions you no longer use", retry_after=10)
        oldest = min(idle, key=lambda c: c.last_used)
        self._sessions.pop(oldest.id)
        oldest.session.close()

    # ---------------------------------------------------------------- interactive calls
    def interactive(self, call: Callable[[], Any]) -> Any:
        """Run a prompt decode, refusing (429) beyond ``max_inflight_predictions`` at once."""
        if not self._predictions.acquire(blocking=False):
            raise Overloaded(f"More than {self.limits.max_inflight_predictions} prompts are being decoded",
                             "retry in a moment", retry_after=1)
        try:
            return call()
        finally:
            self._predictions.release()

    # ---------------------------------------------------------------- jobs
    def start_job(self, session_id: str, kind: str, work: Callable[[Job], dict[str, Any]]) -> Job:
        """Queue ``work(job)`` on the job pool; 503 when ``max_queued_jobs`` are already waiting."""
        self.session(session_id)
        self._expire_jobs()
        with self._lock:
            waiting = sum(1 for j in self._jobs.values() if j.state == "queued")
            if waiting >= self.limits.max_queued_jobs:
                raise Overloaded(f"{waiting} jobs are already waiting on this server", "retry later", retry_after=5)
            job = Job(new_id(), kind, session_id)
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, work)
        return job

    def _run(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        if job.cancel.cancelled:
            self._finish(job, "cancelled", {"cancelled": True})
            return
        job.state = "running"
        try:
            result = work(job)
            self._finish(job, "cancelled" if job.cancel.cancelled else "done", result)
        except CancelledError:
            self._finish(job, "cancelled", {"cancelled": True})
        except SAMSegmentError as exc:
            self._finish(job, "failed", None, {"type": type(exc).__name__, "problem": exc.problem,
                                               "remedy": exc.remedy})
        except Exception as exc:  # noqa: BLE001 - reported to the client, never a dead job
            self._finish(job, "failed", None, {"type": "InternalError", "problem": f"{type(exc).__name__}: {exc}",
                                               "remedy": "report this to the server's administrator"})

    @staticmethod
    def _finish(job: Job, state: str, result: dict[str, Any] | None, error: dict[str, str] | None = None) -> None:
        with job.lock:
            job.state, job.result, job.error = state, result, error
            job.finished_at = time.monotonic()

    def job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"Job {job_id[:12]} does not exist on this server", "start it again")
        return job

    def _expire_jobs(self) -> None:
        now = time.monotonic()
        with self._lock:
            for job_id in [j.id for j in self._jobs.values()
                           if j.finished_at is not None and now - j.finished_at > self.limits.finished_job_ttl_s]:
                del self._jobs[job_id]

    def close(self) -> None:
        with self._lock:
            jobs, sessions = list(self._jobs.values()), list(self._sessions.values())
            self._sessions.clear()
        for job in jobs:
            job.cancel.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in sessions:
            client.session.close()
