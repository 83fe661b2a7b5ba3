"""A client of ``samsegment serve`` with the shape of the in-process session (numpy + the standard library).

``RemoteSession`` offers what callers use of ``SegmentationSession`` (``set_volume``, ``predict``,
``undo``, ``reset``, ``prefetch``, ``shape``, ``window``, and adaptation: ``adapt``,
``use_stock_model``, ``adapter_file_bytes``, ``load_adapter_file_bytes``) and runs the long work on
the server: ``propagate`` (slices arrive as the server decides them), ``everything``, ``samaug``,
``prompt_uncertainty``, ``adapt``, with the engine's own result types. It imports neither torch nor the model
code, so it runs in Slicer's own Python. Every failure is a ``SAMSegmentError`` that names the
cause: unreachable, authentication, version mismatch, timeout, overload, or the server's own error
and remedy.

Blocking or not, one code path: each call is a *flow*, a generator that yields the HTTP requests
(``Call``) and pauses (``Pause``) it needs and receives their responses. ``Operation`` drives a
flow: ``poll()`` never blocks (Slicer's 40 ms timer: at most ~20 ms of socket work per request and
step), ``wait()`` blocks (the CLI, scripts, tests). The plain methods (``predict`` ...) are
``wait()`` on their flow; the ``*_op`` methods return the ``Operation`` for the caller to poll.
Copying and hashing a volume for upload also runs in steps of a few MiB, so even a 200 x 512 x 512
volume never holds the caller for long.

A server that restarted has lost the volume and the session: the client uploads the volume again
and reopens its session by itself (prompt history on the server starts afresh). A propagation
interrupted by a lost server raises ``PropagationInterrupted`` carrying the slices received so far;
passing them back as ``resume=`` re-sends the request and delivers only the slices not yet seen.
An adapted decoder in use (``adapt`` kept it, or ``load_adapter_file_bytes``) is held here as its
signed file and put back into the reopened session, so a restart does not silently fall back to
the stock model; if the new server refuses it (another key or model), ``AdapterNotRestored`` says
so once and the stock model is in use from then on.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Callable, Mapping

import numpy as np

from . import errors
from .errors import CancelledError, SAMSegmentError
from .preprocessing import IntensityWindow
from .prompts import Prompts
from .propagation import PropagationResult, RunStop, SliceOutcome, StopReason
from .volume import SliceRef
from .wire import API_VERSION, content_hasher, mask_from_json, mask_to_json, prompts_to_json

# Sent with every request once a volume is set: a router in front of several replicas (Ray Serve's
# model multiplexing) can send a volume's requests to the replica that holds its embeddings.
ROUTING_HEADER = "serve_multiplexed_model_id"
# Bytes copied or hashed per step of a volume upload (a few ms each).
_UPLOAD_STEP = 8 << 20
JOB_POLL_S = 0.05


class ServerError(SAMSegmentError):
    """The server could not be used; the message names why."""


class ServerUnreachable(ServerError):
    pass


class AuthenticationFailed(ServerError):
    pass


class VersionMismatch(ServerError):
    pass


class ServerTimeout(ServerError):
    pass


class ServerOverloaded(ServerError):
    def __init__(self, problem: str, remedy: str, retry_after: float = 1.0) -> None:
        super().__init__(problem, remedy)
        self.retry_after = retry_after


class ServerLost(ServerError):
    """The request died with the process that served it (a replica killed behind a router answers
    a bare 5xx): like a restarted server, the client re-sends what it holds and retries once."""


class NoAdapter(ServerError):
    """The server's session decodes with the stock model (``GET .../adapter`` answered 404)."""


class AdapterNotRestored(ServerError):
    """A reopened session (the server restarted) refused the adapted decoder this client held: the
    stock model is in use from now on; the message says why (another signing key, another model)."""


class PropagationInterrupted(ServerError):
    """The server went away (or lost the job) during a propagation; ``partial`` holds every slice
    received before that. ``propagate(..., resume=partial)`` continues once a server is back."""

    def __init__(self, problem: str, remedy: str, partial: PropagationResult) -> None:
        super().__init__(problem, remedy)
        self.partial = partial


@dataclass
class RemotePrediction:
    """A mask decided by the server (the low-res logits for refinement stay there)."""

    ref: SliceRef
    mask: np.ndarray
    score: float
    area: int


@dataclass(frozen=True)
class Call:
    """One HTTP request of a flow; the flow receives the ``HttpResponse`` (or the mapped error)."""

    method: str
    path: str
    json: Any = None
    data: Any = None
    params: Mapping[str, Any] | None = None
    timeout: float | None = None
    accept: tuple[int, ...] = ()


@dataclass(frozen=True)
class Pause:
    """A pause of a flow (0: just hand control back to the caller, as between upload steps)."""

    seconds: float = 0.0


Flow = Generator[Any, Any, Any]


def _ssl_context(verify: bool | str) -> Any:
    """The TLS context for ``verify``: True = the system's CAs, a path = that CA bundle, False = no check."""
    import ssl

    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=verify) if isinstance(verify, str) else None


def _engine_error(name: Any, problem: str, remedy: str) -> SAMSegmentError:
    """The engine's own error class for a server error of type ``name`` (e.g. PromptError), so
    callers handle a remote error exactly as a local one; ServerError for anything else."""
    if name == "NoAdapter":
        return NoAdapter(problem, remedy)
    cls = getattr(errors, str(name or ""), None)
    if isinstance(cls, type) and issubclass(cls, SAMSegmentError) and cls is not SAMSegmentError:
        try:
            return cls(problem, remedy)
        except TypeError:  # an error class with a richer constructor
            pass
    return ServerError(problem, remedy)


def _npy(data: Mapping[str, str]) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(data["npy"])), allow_pickle=False)


def _lost(exc: SAMSegmentError) -> bool:
    """Whether ``exc`` says the server no longer holds this client's volume or session (a restart,
    another replica, an expiry, a replica that died mid-request): then the client re-sends them."""
    return isinstance(exc, ServerLost) or (type(exc) is ServerError and (
        "does not exist on this server" in exc.problem or "is not on this server" in exc.problem))


def upload_steps(volume: np.ndarray) -> Flow:
    """``.npy`` bytes of ``volume`` and its content id (as ``wire.volume_id``), built a few MiB per
    step (yields ``Pause(0)`` between steps). Returns ``(payload, volume_view, volume_id)``, where
    ``volume_view`` is a read-only array over the payload's data (the client's copy of the volume)."""
    from numpy.lib import format as npy_format

    array = np.asarray(volume)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, npy_format.header_data_from_array_1_0(array))
    head = header.getvalue()
    payload = bytearray(len(head) + array.nbytes)
    payload[:len(head)] = head
    digest = content_hasher(array.dtype, array.shape)
    source = memoryview(array.reshape(-1)).cast("B")
    target = memoryview(payload)
    for start in range(0, array.nbytes, _UPLOAD_STEP):
        part = source[start:start + _UPLOAD_STEP]
        target[len(head) + start:len(head) + start + len(part)] = part
        digest.update(part)
        yield Pause(0.0)
    view = np.frombuffer(payload, dtype=array.dtype, offset=len(head)).reshape(array.shape)
    view.flags.writeable = False
    return payload, view, digest.hexdigest()


class Operation:
    """A flow in progress: ``poll()`` advances it without blocking, ``wait()`` runs it to the end.

    ``result()`` returns the flow's value or raises its error; ``cancel()`` abandons it (its
    request's socket is closed; ``result()`` then raises ``CancelledError``)."""

    def __init__(self, session: "RemoteSession", flow: Flow) -> None:
        self._session, self._flow = session, flow
        self._call: Call | None = None
        self._pending: Any = None
        self._wake = 0.0
        self.done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._step(lambda: next(self._flow))

    def _step(self, advance: Callable[[], Any]) -> None:
        try:
            item = advance()
        except StopIteration as stop:
            self.done, self._value = True, stop.value
            return
        except BaseException as exc:  # noqa: BLE001 - the flow's outcome, raised by result()
            self.done, self._error = True, exc
            return
        if isinstance(item, Call):
            self._call = item
            try:
                self._pending = self._session._start(item)
            except SAMSegmentError as exc:
                self._pending = None
                self._step(lambda exc=exc: self._flow.throw(exc))
        elif isinstance(item, Pause):
            self._call, self._pending = None, None
            self._wake = time.monotonic() + item.seconds
        else:
            self._step(lambda: self._flow.throw(TypeError(f"a flow yielded {item!r}")))

    def poll(self, wait: float = 0.0) -> bool:
        """Advance as far as possible, blocking at most ``wait`` seconds; returns ``done``."""
        end = time.monotonic() + max(0.0, wait)
        budget = time.monotonic() + 0.03
        while not self.done:
            if self._pending is not None:
                if not self._pending.poll(wait=max(0.0, end - time.monotonic())):
                    return False
                call, pending = self._call, self._pending
                self._pending = None
                try:
                    response = self._session._finish(call, pending)
                except SAMSegmentError as exc:
                    self._step(lambda exc=exc: self._flow.throw(exc))
                else:
                    self._step(lambda response=response: self._flow.send(response))
            else:
                now = time.monotonic()
                if now < self._wake:
                    if now >= end:
                        return False
                    time.sleep(min(self._wake, end) - now)
                    continue
                self._step(lambda: self._flow.send(None))
            if wait <= 0 and time.monotonic() > budget:
                return self.done
        return True

    def wait(self, timeout: float | None = None) -> Any:
        """Block until done (at most ``timeout`` seconds: then ``ServerTimeout``); the result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll(wait=0.5):
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise ServerTimeout(f"The server did not finish within {timeout:g} s", "retry, or raise the timeout")
        return self.result()

    def result(self) -> Any:
        if not self.done:
            raise RuntimeError("the operation is still in progress: poll() until done")
        if self._error is not None:
            raise self._error
        return self._value

    @property
    def failed(self) -> bool:
        return self.done and self._error is not None

    def cancel(self) -> None:
        if self.done:
            return
        if self._pending is not None:
            self._pending.cancel()
        self._flow.close()
        self.done, self._error = True, CancelledError("The request was cancelled")


class PropagationCollector:
    """The slices of a propagation job as they stream in, assembled into a ``PropagationResult``.

    ``resume``: the partial result of an interrupted run of the same request; its slices are kept as
    they were and not handed to ``on_slice`` again when the re-sent job decides them anew."""

    def __init__(self, axis: int, on_slice: Callable[[SliceRef, np.ndarray, SliceOutcome], None] | None = None,
                 resume: PropagationResult | None = None) -> None:
        if resume is not None and resume.axis != axis:
            raise SAMSegmentError(f"The propagation to resume ran along axis {resume.axis}, not {axis}",
                                  "resume it along its own axis")
        self.result = PropagationResult(axis)
        if resume is not None:
            self.result.masks.update(resume.masks)
            self.result.outcomes.update(resume.outcomes)
        self.on_slice = on_slice

    def add(self, item: dict[str, Any]) -> None:
        index = int(item["index"])
        if index in self.result.masks:
            return  # delivered before an interruption: kept as it was
        mask, outcome = mask_from_json(item["mask"]), SliceOutcome(**item["outcome"])
        self.result.masks[index], self.result.outcomes[index] = mask, outcome
        if self.on_slice is not None:
            self.on_slice(SliceRef(self.result.axis, index), mask, outcome)

    def interrupted(self, exc: ServerError) -> ServerError:
        """The error to raise for ``exc``: unreachable, timed out, or a server that no longer knows
        the job (restarted, another replica) become ``PropagationInterrupted`` with the slices so
        far; refusals (auth, version, overload, a bad request) stay as they are."""
        if isinstance(exc, PropagationInterrupted) or not (
                isinstance(exc, (ServerUnreachable, ServerTimeout, ServerLost)) or _lost(exc)):
            return exc  # a refusal (auth, version, overload, a bad request) stays what it is
        return PropagationInterrupted(
            f"{exc.problem} during propagation; {len(self.result.masks)} slices were received and are kept",
            "start the server again (Slicer restarts its local one), then resume the propagation", self.result)

    def finish(self, done: Mapping[str, Any]) -> PropagationResult:
        result = self.result
        result.cancelled = bool(done.get("cancelled"))
        result.stops = [RunStop(s["anchor"], s["direction"], s["last_index"], StopReason(s["reason"]), s["at_index"])
                        for s in done.get("stops", [])]
        return result


class RemoteSession:
    """One engine session on a server, for one volume at a time.

    Args:
        url: the server's base URL (``http://127.0.0.1:8765``).
        token: its API token (None for a server started with ``--no-auth``).
        model: the model id (None: the server's default).
        timeout: seconds for one HTTP call (a prompt on CPU takes ~1 s the first time on a slice).
        verify: TLS certificate check (a path to a CA bundle for a self-signed certificate).
        box_margin: as for ``SegmentationSession`` (None: the model's own).
        connect: check the server now (blocking ``GET /v1/info``); False leaves it to the caller
            (``connect_op()``, polled), as Slicer's main thread must not wait.
    """

    def __init__(self, url: str, token: str | None = None, model: str | None = None, timeout: float = 120.0,
                 verify: bool | str = True, box_margin: float | None = None, connect: bool = True) -> None:
        self.model = model
        self.timeout = timeout
        self.box_margin = box_margin
        self._verify = verify
        self.retarget(url, token)
        self._volume: np.ndarray | None = None
        self._payload: bytearray | None = None
        self._vid: str | None = None
        self._volume_args: tuple[Any, str] = (None, "auto")
        self.session_id: str | None = None
        self._adapter_bytes: bytes | None = None  # the signed adapter in use on the server; None: stock
        self.window: IntensityWindow | None = None
        self.model_id: str | None = None
        self.needs_box = False
        self.info: dict[str, Any] = {}
        if connect:
            self.connect_op().wait()

    def retarget(self, url: str, token: str | None) -> None:
        """Point at another server (a restarted local server listens on a new port). Its volume and
        session are re-sent on the next call that finds them missing."""
        self.url = url.rstrip("/")
        self._ssl = _ssl_context(self._verify) if self.url.startswith("https:") else None
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def routing_key(self) -> str | None:
        """What the client sends as ``ROUTING_HEADER`` (the volume's content id, shortened), or None."""
        return None if self._vid is None else self._vid[:32]

    # ---------------------------------------------------------------- HTTP
    def _start(self, call: Call) -> Any:
        """Start ``call`` as a non-blocking ``PendingRequest``."""
        import json as jsonlib
        from urllib.parse import urlencode

        from .http_transport import PendingRequest, TransportError

        headers = dict(self._headers)
        if self.routing_key is not None:
            headers[ROUTING_HEADER] = self.routing_key
        data = call.data
        if call.json is not None:
            data = jsonlib.dumps(call.json).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            headers["Content-Type"] = "application/octet-stream"
        url = self.url + call.path + (f"?{urlencode(call.params)}" if call.params else "")
        try:
            return PendingRequest(url, call.method, data, headers, call.timeout or self.timeout, self._ssl)
        except TransportError as exc:
            raise ServerError(exc.problem, exc.remedy) from exc

    def _finish(self, call: Call, pending: Any) -> Any:
        """The response of a finished request; a status >= 400 (other than those in
        ``call.accept``) or a transport failure raises the matching error."""
        from .http_transport import TimedOut, TransportError, Unreachable

        timeout = call.timeout or self.timeout
        try:
            response = pending.response()
        except TimedOut as exc:
            raise ServerTimeout(f"The server at {self.url} did not answer within {timeout:g} s",
                                "check that it is running and not overloaded, or raise the timeout") from exc
        except Unreachable as exc:
            raise ServerUnreachable(f"Cannot reach the SAMSegment server at {self.url}",
                                    "start it (samsegment serve) or check the URL and network") from exc
        except TransportError as exc:
            raise ServerError(exc.problem, exc.remedy) from exc
        if response.status < 400 or response.status in call.accept:
            return response
        try:
            body = response.json()
        except SAMSegmentError:
            body = {}
        problem = body.get("problem") or f"HTTP {response.status} from the server"
        remedy = body.get("remedy", "")
        if response.status == 401:
            raise AuthenticationFailed(problem, remedy or "give the server's token")
        if response.status in (429, 503):
            raise ServerOverloaded(problem, remedy or "retry in a moment",
                                   float(response.headers.get("retry-after", 1)))
        if response.status >= 500 and not body.get("problem"):
            # not our server's JSON error: a router whose replica died while serving the request
            raise ServerLost(f"The SAMSegment server at {self.url} lost the request (HTTP {response.status})",
                             "retry; the client re-sends the volume and reopens its session")
        raise _engine_error(body.get("type"), problem, remedy)

    def operation(self, flow: Flow) -> Operation:
        """Start ``flow``; poll or wait the returned ``Operation``."""
        return Operation(self, flow)

    def _run(self, flow: Flow) -> Any:
        return Operation(self, flow).wait()

    # ---------------------------------------------------------------- server check
    def connect_flow(self) -> Flow:
        """``GET /v1/info``: the API version must match and the model (if named) must exist."""
        info = (yield Call("GET", "/v1/info", timeout=min(self.timeout, 10.0))).json()
        if info.get("api_version") != API_VERSION:
            raise VersionMismatch(f"The server speaks API v{info.get('api_version')}, this client v{API_VERSION} "
                                  f"(server {info.get('server_version')})",
                                  "use a client and server of the same SAMSegment release")
        if self.model is not None and self.model not in info.get("models", []):
            raise errors.ModelNotFoundError(f"The server has no model {self.model!r}",
                                            f"use one of {', '.join(info.get('models', []))}")
        self.info = info
        return info

    def connect_op(self) -> Operation:
        return self.operation(self.connect_flow())

    # ---------------------------------------------------------------- volume and session
    @property
    def has_volume(self) -> bool:
        return self._volume is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        if self._volume is None:
            raise SAMSegmentError("No volume is loaded in the session", "call set_volume(array) first")
        return tuple(self._volume.shape)  # type: ignore[return-value]

    @property
    def volume(self) -> np.ndarray:
        if self._volume is None:
            raise SAMSegmentError("No volume is loaded in the session", "call set_volume(array) first")
        return self._volume

    def slice_image(self, ref: SliceRef) -> np.ndarray:
        """The windowed uint8 slice the model sees (the server's window applied here)."""
        from .volume import get_slice

        if self.window is None:
            raise SAMSegmentError("No volume is loaded in the session", "call set_volume(array) first")
        return self.window.apply(get_slice(self.volume, ref))

    def set_volume_flow(self, volume: np.ndarray, window: IntensityWindow | str | tuple[float, float] | None = None,
                        modality: str = "auto") -> Flow:
        if isinstance(window, IntensityWindow):
            window = (window.low, window.high)
        yield from self._close_flow()
        self._volume = self._payload = self._vid = None
        self._adapter_bytes = None  # an adapter belongs to its volume (the engine reverts too)
        self.window = None
        payload, view, vid = yield from upload_steps(volume)
        self._payload, self._volume, self._vid, self._volume_args = payload, view, vid, (window, modality)
        yield from self._open_flow()
        return self.window

    def set_volume(self, volume: np.ndarray, window: IntensityWindow | str | tuple[float, float] | None = None,
                   modality: str = "auto") -> IntensityWindow:
        """Send ``volume`` (only when the server does not hold it yet) and open a session on it.

        Returns the intensity window the server applies."""
        return self._run(self.set_volume_flow(volume, window, modality))

    def set_volume_op(self, volume: np.ndarray, window: Any = None, modality: str = "auto") -> Operation:
        return self.operation(self.set_volume_flow(volume, window, modality))

    def _upload_flow(self, force: bool = False) -> Flow:
        if not force and (yield Call("HEAD", f"/v1/volumes/{self._vid}", accept=(404,))).status == 200:
            return
        yield Call("PUT", f"/v1/volumes/{self._vid}", data=self._payload)

    def _open_flow(self) -> Flow:
        window, modality = self._volume_args
        yield from self._upload_flow()
        body = {"volume_id": self._vid, "model": self.model, "modality": modality, "box_margin": self.box_margin,
                "window": list(window) if isinstance(window, tuple) else window}
        try:
            opened = (yield Call("POST", "/v1/sessions", json=body)).json()
        except SAMSegmentError as exc:
            if not _lost(exc):
                raise
            yield from self._upload_flow(force=True)
            opened = (yield Call("POST", "/v1/sessions", json=body)).json()
        session_id = opened["session_id"]
        refused = None
        if self._adapter_bytes is not None:  # a reopened session: the adapted decoder goes back in
            try:
                yield Call("PUT", f"/v1/sessions/{session_id}/adapter", data=self._adapter_bytes,
                           params={"source": "The adapter this client held"})
            except SAMSegmentError as exc:
                if _lost(exc) or isinstance(exc, (ServerUnreachable, ServerTimeout, ServerOverloaded,
                                                  AuthenticationFailed)):
                    raise  # no session is taken without its adapter: the next call reopens and tries again
                self._adapter_bytes, refused = None, exc
        self.session_id = session_id
        self.model_id = opened["model"]
        self.needs_box = bool(opened["needs_box"])
        win = opened["window"]
        self.window = IntensityWindow(float(win["low"]), float(win["high"]), source=win["source"])
        if refused is not None:
            raise AdapterNotRestored(f"The server's new session refused the adapted decoder ({refused.problem}); "
                                     "the stock model is in use now",
                                     f"adapt again, or load an adapter file signed for this server "
                                     f"({refused.remedy})") from refused

    def _session_call_flow(self, method: str, suffix: str, body: Any = None, data: Any = None,
                           params: Mapping[str, Any] | None = None) -> Flow:
        """A call on this client's session (JSON or bytes in, the ``HttpResponse`` out); reopens the
        session once when the server lost it."""
        if self._vid is None:
            raise SAMSegmentError("No volume is loaded in the session", "call set_volume(array) first")
        if self.session_id is None:
            yield from self._open_flow()
        try:
            return (yield Call(method, f"/v1/sessions/{self.session_id}{suffix}", json=body, data=data, params=params))
        except SAMSegmentError as exc:
            if not _lost(exc):
                raise
            if isinstance(exc, ServerLost):
                yield Pause(0.25)  # the router learns that the replica is gone
        yield from self._open_flow()
        return (yield Call(method, f"/v1/sessions/{self.session_id}{suffix}", json=body, data=data, params=params))

    def _session_flow(self, method: str, suffix: str, body: Any = None) -> Flow:
        """A call on this client's session (JSON in and out); reopens it once when the server lost it."""
        return (yield from self._session_call_flow(method, suffix, body)).json()

    def _close_flow(self) -> Flow:
        session_id, self.session_id = self.session_id, None
        if session_id is not None:
            try:
                yield Call("DELETE", f"/v1/sessions/{session_id}", timeout=5.0)
            except ServerError:
                pass  # a server that is gone has no session to close

    def close(self) -> None:
        self._run(self._close_flow())

    def close_op(self) -> Operation:
        return self.operation(self._close_flow())

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- prompts
    @staticmethod
    def _prediction(data: Mapping[str, Any]) -> RemotePrediction:
        return RemotePrediction(SliceRef(int(data["axis"]), int(data["index"])), mask_from_json(data["mask"]),
                                float(data["score"]), int(data["area"]))

    def predict_flow(self, ref: SliceRef, prompts: Prompts, refine: bool = True) -> Flow:
        body = {"axis": ref.axis, "index": ref.index, "prompts": prompts_to_json(prompts), "refine": refine}
        return self._prediction((yield from self._session_flow("POST", "/predict", body)))

    def predict(self, ref: SliceRef, prompts: Prompts, refine: bool = True) -> RemotePrediction:
        """The mask for the current prompts on ``ref`` (as ``SegmentationSession.predict``)."""
        return self._run(self.predict_flow(ref, prompts, refine))

    def undo_flow(self, ref: SliceRef) -> Flow:
        data = (yield from self._session_flow("POST", "/undo", {"axis": ref.axis, "index": ref.index}))["prediction"]
        return None if data is None else self._prediction(data)

    def undo(self, ref: SliceRef) -> RemotePrediction | None:
        return self._run(self.undo_flow(ref))

    def reset_flow(self, ref: SliceRef | None = None) -> Flow:
        yield from self._session_flow("POST", "/reset", {} if ref is None else {"axis": ref.axis, "index": ref.index})

    def reset(self, ref: SliceRef | None = None) -> None:
        self._run(self.reset_flow(ref))

    def prefetch_flow(self, around: SliceRef, radius: int = 2, direction: int = 0, include_self: bool = False) -> Flow:
        body = {"axis": around.axis, "index": around.index, "radius": radius, "direction": direction,
                "include_self": include_self}
        return int((yield from self._session_flow("POST", "/prefetch", body))["queued"])

    def prefetch(self, around: SliceRef, radius: int = 2, direction: int = 0, include_self: bool = False) -> int:
        """Queue encodes on the server: the neighbours of ``around`` (and ``around`` itself first,
        at interactive priority, with ``include_self``); returns how many were queued."""
        return self._run(self.prefetch_flow(around, radius, direction, include_self))

    # ---------------------------------------------------------------- jobs
    def start_job_flow(self, kind: str, **params: Any) -> Flow:
        """Start a server job (``propagate``, ``everything``, ``samaug``, ``uncertainty``); its id."""
        return (yield from self._session_flow("POST", "/jobs", {"kind": kind, **params}))["job_id"]

    def follow_job_flow(self, job_id: str, progress: Callable[[int, int, str], None] | None = None,
                        cancel: Any = None, on_slice: Callable[[dict[str, Any]], None] | None = None) -> Flow:
        """Follow a job to its end: ``on_slice`` gets each streamed slice, ``progress`` the job's
        progress; ``cancel`` (a ``CancelToken``) cancels it on the server. Returns the job's result
        (``{"cancelled": True}`` for a cancelled job without one)."""
        after, cancelled = 0, False
        while True:
            if cancel is not None and cancel.cancelled and not cancelled:
                yield Call("DELETE", f"/v1/jobs/{job_id}", timeout=10.0)
                cancelled = True
            state = (yield Call("GET", f"/v1/jobs/{job_id}", params={"after": after}, timeout=10.0)).json()
            after = int(state["next"])
            for item in state["slices"]:
                if on_slice is not None:
                    on_slice(item)
            if progress is not None and state["progress"][1]:
                progress(*state["progress"])
            if state["state"] in ("done", "cancelled"):
                return state.get("result") or {"cancelled": True}
            if state["state"] == "failed":
                error = state["error"] or {}
                raise _engine_error(error.get("type"), error.get("problem", "The server's job failed"),
                                    error.get("remedy", ""))
            yield Pause(JOB_POLL_S)

    def job_flow(self, kind: str, progress: Callable[[int, int, str], None] | None = None, cancel: Any = None,
                 on_slice: Callable[[dict[str, Any]], None] | None = None, **params: Any) -> Flow:
        """``start_job_flow`` then ``follow_job_flow``: the job's result."""
        job_id = yield from self.start_job_flow(kind, **params)
        return (yield from self.follow_job_flow(job_id, progress, cancel, on_slice))

    @staticmethod
    def propagation_params(axis: int, anchors: Mapping[int, np.ndarray] | None, direction: str = "both",
                           rules: Any = None, boxes: Mapping[int, Any] | None = None,
                           bounds: Any = None) -> dict[str, Any]:
        """The ``propagate`` job's parameters: ``rules`` a ``StopRules`` (or a dict of its fields),
        ``boxes`` {slice: (x0, y0, x1, y1)} box anchors, ``bounds`` a ``Box3D`` (or {lo, hi}) 3D box."""
        params: dict[str, Any] = {"axis": axis, "direction": direction,
                                  "rules": asdict(rules) if is_dataclass(rules) else rules,
                                  "anchors": {str(int(i)): mask_to_json(m) for i, m in (anchors or {}).items()}}
        if boxes:
            params["boxes"] = {str(int(i)): [float(v) for v in box] for i, box in boxes.items()}
        if bounds is not None:
            lo, hi = (bounds["lo"], bounds["hi"]) if isinstance(bounds, Mapping) else (bounds.lo, bounds.hi)
            params["bounds"] = {"lo": [int(v) for v in lo], "hi": [int(v) for v in hi]}
        return params

    def propagate_flow(self, axis: int, anchors: Mapping[int, np.ndarray] | None, direction: str = "both",
                       rules: Any = None, on_slice: Callable[[SliceRef, np.ndarray, SliceOutcome], None] | None = None,
                       progress: Callable[[int, int, str], None] | None = None, cancel: Any = None,
                       resume: PropagationResult | None = None, boxes: Mapping[int, Any] | None = None,
                       bounds: Any = None) -> Flow:
        collector = PropagationCollector(axis, on_slice, resume)
        params = self.propagation_params(axis, anchors, direction, rules, boxes, bounds)
        try:
            job_id = yield from self.start_job_flow("propagate", **params)
            done = yield from self.follow_job_flow(job_id, progress, cancel, collector.add)
        except ServerError as exc:
            raise collector.interrupted(exc) from exc
        return collector.finish(done)

    def propagate(self, axis: int, anchors: Mapping[int, np.ndarray] | None, direction: str = "both",
                  rules: Any = None, on_slice: Callable[[SliceRef, np.ndarray, SliceOutcome], None] | None = None,
                  progress: Callable[[int, int, str], None] | None = None, cancel: Any = None,
                  resume: PropagationResult | None = None, auto_resume: int = 1, boxes: Mapping[int, Any] | None = None,
                  bounds: Any = None) -> PropagationResult:
        """The engine's ``propagate`` run on the server: the same ``PropagationResult``, and each slice
        handed to ``on_slice`` as the server decides it.

        ``rules`` is a ``StopRules`` (or a dict of its fields); ``cancel`` a ``CancelToken``;
        ``resume`` the ``partial`` of a ``PropagationInterrupted`` (its slices are not delivered again);
        ``boxes`` and ``bounds`` as for the engine's ``propagate`` (box anchors, a 3D box).
        A server that is up but lost the job (restarted, a replica that died) gets it again, up to
        ``auto_resume`` times; an unreachable one raises ``PropagationInterrupted``."""
        for attempt in range(auto_resume + 1):
            try:
                return self._run(self.propagate_flow(axis, anchors, direction, rules, on_slice, progress, cancel,
                                                     resume, boxes, bounds))
            except PropagationInterrupted as exc:
                if attempt == auto_resume or isinstance(exc.__cause__, (ServerUnreachable, ServerTimeout)) \
                        or (cancel is not None and cancel.cancelled):
                    raise
                resume = exc.partial
        raise AssertionError("unreachable")

    def everything_flow(self, axis: int = 0, index: int | None = None, params: Any = None,
                        progress: Callable[[int, int, str], None] | None = None, cancel: Any = None) -> Flow:
        params = asdict(params) if is_dataclass(params) else params
        done = yield from self.job_flow("everything", progress, cancel, axis=axis, index=index, params=params)
        if done.get("cancelled") and "labels" not in done:
            raise CancelledError("Everything mode was cancelled")
        return _npy(done["labels"])

    def everything(self, axis: int = 0, index: int | None = None, params: Any = None,
                   progress: Callable[[int, int, str], None] | None = None, cancel: Any = None) -> np.ndarray:
        """Everything-mode labels of one slice (``index``) or of the whole volume along ``axis`` (int32)."""
        return self._run(self.everything_flow(axis, index, params, progress, cancel))

    def samaug_flow(self, axis: int = 0, index: int | None = None, params: Any = None,
                    progress: Callable[[int, int, str], None] | None = None, cancel: Any = None) -> Flow:
        params = asdict(params) if is_dataclass(params) else params
        done = yield from self.job_flow("samaug", progress, cancel, axis=axis, index=index, params=params)
        if done.get("cancelled") and "segmentation_prior" not in done:
            raise CancelledError("SAMAug was cancelled")
        return _npy(done["segmentation_prior"]), _npy(done["boundary_prior"])

    def samaug(self, axis: int = 0, index: int | None = None, params: Any = None,
               progress: Callable[[int, int, str], None] | None = None,
               cancel: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """SAMAug (segmentation prior, boundary prior) of one slice or the whole volume, float32."""
        return self._run(self.samaug_flow(axis, index, params, progress, cancel))

    def uncertainty_flow(self, ref: SliceRef, prompts: Prompts, n: int = 16, jitter: float = 0.1, seed: int = 0,
                         measure: str = "entropy") -> Flow:
        done = yield from self.job_flow("uncertainty", axis=ref.axis, index=ref.index,
                                        prompts=prompts_to_json(prompts), n=n, jitter=jitter, seed=seed,
                                        measure=measure)
        return _npy(done["probability"]), _npy(done["uncertainty"])

    def prompt_uncertainty(self, ref: SliceRef, prompts: Prompts, n: int = 16, jitter: float = 0.1, seed: int = 0,
                           measure: str = "entropy") -> tuple[np.ndarray, np.ndarray]:
        """(mean probability, uncertainty) maps over ``n`` jittered prompts, float32 (H, W)."""
        return self._run(self.uncertainty_flow(ref, prompts, n, jitter, seed, measure))

    # ---------------------------------------------------------------- adaptation
    @property
    def adapter_in_use(self) -> bool:
        """Whether the server's session decodes through an adapted decoder this client holds (kept by
        ``adapt`` or loaded with ``load_adapter_file_bytes``); False: the stock model."""
        return self._adapter_bytes is not None

    @property
    def held_adapter_bytes(self) -> bytes | None:
        """The signed adapter file this client holds for its session (fetched when ``adapt`` kept one,
        or sent with ``load_adapter_file_bytes``), without asking the server again; None: stock."""
        return self._adapter_bytes

    @staticmethod
    def adaptation_params(axis: int, accepted: Mapping[int, np.ndarray], structure: str | None = None,
                          settings: Any = None) -> dict[str, Any]:
        """The ``adapt`` job's parameters: ``accepted`` {slice: mask}, ``settings`` an ``AdaptSettings``
        (or a dict of its fields, or None for the defaults)."""
        return {"axis": int(axis), "accepted": {str(int(i)): mask_to_json(m) for i, m in accepted.items()},
                "structure": structure, "settings": asdict(settings) if is_dataclass(settings) else settings}

    def adapt_flow(self, axis: int, accepted: Mapping[int, np.ndarray], structure: str | None = None,
                   settings: Any = None, progress: Callable[[int, int, str], None] | None = None,
                   cancel: Any = None) -> Flow:
        from .adaptation import AdaptationReport

        params = self.adaptation_params(axis, accepted, structure, settings)
        done = yield from self.job_flow("adapt", progress, cancel, **params)
        if "report" not in done:
            raise CancelledError("The adaptation was cancelled; the model in use did not change")
        report = AdaptationReport.from_json(done["report"])
        if report.kept:
            data = yield from self.adapter_file_bytes_flow()
            if data is None:
                raise ServerError("The server lost the adapted decoder before this client could fetch it (its "
                                  "session was reopened)", "adapt again")
            self._adapter_bytes = data
        return report

    def adapt(self, axis: int, accepted: Mapping[int, np.ndarray], structure: str | None = None, settings: Any = None,
              progress: Callable[[int, int, str], None] | None = None, cancel: Any = None):
        """The engine's ``SegmentationSession.adapt`` run on the server (a job: ``progress`` gets its
        steps, ``cancel`` a ``CancelToken`` stops it, then ``CancelledError``).

        When the held-back check keeps the adapted decoder, the server's session decodes through it
        from then on and this client fetches and holds its signed file (``adapter_in_use``), to put
        it back into a session reopened after a server restart.

        Args:
            axis: the slice axis of the accepted masks.
            accepted: {slice index: bool mask} of one structure, as accepted by the user.
            structure: the structure's name, kept with the adapter.
            settings: an ``AdaptSettings`` (or a dict of its fields; None: the defaults).

        Returns:
            The ``AdaptationReport`` (``kept``: the adapter is now in use).
        """
        return self._run(self.adapt_flow(axis, accepted, structure, settings, progress, cancel))

    def adapt_op(self, axis: int, accepted: Mapping[int, np.ndarray], structure: str | None = None,
                 settings: Any = None, progress: Callable[[int, int, str], None] | None = None,
                 cancel: Any = None) -> Operation:
        return self.operation(self.adapt_flow(axis, accepted, structure, settings, progress, cancel))

    def use_stock_model_flow(self) -> Flow:
        self._adapter_bytes = None  # first: a session reopened on the way gets no adapter back
        yield from self._session_flow("DELETE", "/adapter")

    def use_stock_model(self) -> None:
        """Decode with the stock model again (the server drops the adapter; this client forgets it)."""
        self._run(self.use_stock_model_flow())

    def adapter_file_bytes_flow(self) -> Flow:
        try:
            response = yield from self._session_call_flow("GET", "/adapter")
        except NoAdapter:
            return None
        return bytes(response.body)

    def adapter_file_bytes(self) -> bytes | None:
        """The adapter in use on the server as a signed adapter file's content (signed with the
        server's key), or None when the stock model is in use."""
        return self._run(self.adapter_file_bytes_flow())

    def load_adapter_file_bytes_flow(self, data: bytes, source: str = "the adapter") -> Flow:
        data = bytes(data)
        response = yield from self._session_call_flow("PUT", "/adapter", data=data, params={"source": source})
        self._adapter_bytes = data
        return response.json()

    def load_adapter_file_bytes(self, data: bytes, source: str = "the adapter") -> dict[str, Any]:
        """Send a signed adapter file to the server, which verifies it (its key, its model) and
        decodes through it from then on; this client holds it (``adapter_in_use``).

        Args:
            data: the file's content.
            source: what ``data`` is, for the server's messages (a file name).

        Returns:
            {"structure": ..., "report": ...} of the adapter now in use.

        Raises:
            CheckpointError: not an adapter, damaged, not signed with the server's key, or of another model.
        """
        return self._run(self.load_adapter_file_bytes_flow(data, source))
