"""A client of ``samsegment serve`` with the shape of the in-process session (numpy + the standard library).

``RemoteSession`` offers what callers use of ``SegmentationSession`` (``set_volume``, ``predict``,
``undo``, ``reset``, ``prefetch``, ``shape``, ``window``) and runs the long work on the server:
``propagate`` (slices arrive as the server decides them), ``everything``, ``samaug``,
``prompt_uncertainty``, with the engine's own result types. It imports neither torch nor the model code, so it runs in Slicer's own
Python. Every failure is a ``SAMSegmentError`` that names the cause: unreachable, authentication,
version mismatch, timeout, overload, or the server's own error and remedy.

A server that restarted has lost the volume and the session: the client uploads the volume again
and reopens its session by itself (prompt history on the server starts afresh).
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from . import errors
from .errors import SAMSegmentError
from .preprocessing import IntensityWindow
from .prompts import Prompts
from .propagation import PropagationResult, RunStop, SliceOutcome, StopReason
from .volume import SliceRef
from .wire import API_VERSION, array_to_npy, mask_from_json, mask_to_json, prompts_to_json, volume_id


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


@dataclass
class RemotePrediction:
    """A mask decided by the server (the low-res logits for refinement stay there)."""

    ref: SliceRef
    mask: np.ndarray
    score: float
    area: int


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
    cls = getattr(errors, str(name or ""), None)
    if isinstance(cls, type) and issubclass(cls, SAMSegmentError) and cls is not SAMSegmentError:
        try:
            return cls(problem, remedy)
        except TypeError:  # an error class with a richer constructor
            pass
    return ServerError(problem, remedy)


def _npy(data: Mapping[str, str]) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(data["npy"])), allow_pickle=False)


class RemoteSession:
    """One engine session on a server, for one volume at a time.

    Args:
        url: the server's base URL (``http://127.0.0.1:8765``).
        token: its API token (None for a server started with ``--no-auth``).
        model: the model id (None: the server's default).
        timeout: seconds for one HTTP call (a prompt on CPU takes ~1 s the first time on a slice).
        verify: TLS certificate check (a path to a CA bundle for a self-signed certificate).
        box_margin: as for ``SegmentationSession`` (None: the model's own).
    """

    def __init__(self, url: str, token: str | None = None, model: str | None = None, timeout: float = 120.0,
                 verify: bool | str = True, box_margin: float | None = None) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.box_margin = box_margin
        self._ssl = _ssl_context(verify) if self.url.startswith("https:") else None
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._volume: np.ndarray | None = None
        self._volume_args: tuple[Any, str] = (None, "auto")
        self.session_id: str | None = None
        self.window: IntensityWindow | None = None
        self.model_id: str | None = None
        self.needs_box = False
        self.info = self._check_server()

    # ---------------------------------------------------------------- HTTP
    def _request(self, method: str, path: str, timeout: float | None = None, accept: tuple[int, ...] = (),
                 json: Any = None, data: bytes | None = None, params: Mapping[str, Any] | None = None) -> Any:
        """One HTTP call; a status >= 400 (other than those in ``accept``) raises the matching error."""
        import json as jsonlib
        from urllib.parse import urlencode

        from .http_transport import TimedOut, TransportError, Unreachable, request

        headers = dict(self._headers)
        if json is not None:
            data = jsonlib.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            headers["Content-Type"] = "application/octet-stream"
        url = self.url + path + (f"?{urlencode(params)}" if params else "")
        try:
            response = request(url, method, data, headers, timeout or self.timeout, self._ssl)
        except TimedOut as exc:
            raise ServerTimeout(f"The server at {self.url} did not answer within {timeout or self.timeout:g} s",
                                "check that it is running and not overloaded, or raise the timeout") from exc
        except Unreachable as exc:
            raise ServerUnreachable(f"Cannot reach the SAMSegment server at {self.url}",
                                    "start it (samsegment serve) or check the URL and network") from exc
        except TransportError as exc:
            raise ServerError(exc.problem, exc.remedy) from exc
        if response.status < 400 or response.status in accept:
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
        raise _engine_error(body.get("type"), problem, remedy)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _check_server(self) -> dict[str, Any]:
        info = self._json("GET", "/v1/info", timeout=min(self.timeout, 10.0))
        if info.get("api_version") != API_VERSION:
            raise VersionMismatch(f"The server speaks API v{info.get('api_version')}, this client v{API_VERSION} "
                                  f"(server {info.get('server_version')})",
                                  "use a client and server of the same SAMSegment release")
        if self.model is not None and self.model not in info.get("models", []):
            raise errors.ModelNotFoundError(f"The server has no model {self.model!r}",
                                            f"use one of {', '.join(info.get('models', []))}")
        return info

    # ---------------------------------------------------------------- volume and session
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

    def set_volume(self, volume: np.ndarray, window: IntensityWindow | str | tuple[float, float] | None = None,
                   modality: str = "auto") -> IntensityWindow:
        """Send ``volume`` (only when the server does not hold it yet) and open a session on it.

        Returns the intensity window the server applies."""
        array = np.ascontiguousarray(volume)
        if isinstance(window, IntensityWindow):
            window = (window.low, window.high)
        self._close_session()
        self._volume, self._volume_args = array, (window, modality)
        self._vid = volume_id(array)
        self._open()
        assert self.window is not None
        return self.window

    def _upload(self) -> None:
        if self._request("HEAD", f"/v1/volumes/{self._vid}", accept=(404,)).status == 200:
            return
        self._request("PUT", f"/v1/volumes/{self._vid}", data=array_to_npy(self.volume))

    def _open(self) -> None:
        window, modality = self._volume_args
        self._upload()
        body = {"volume_id": self._vid, "model": self.model, "modality": modality, "box_margin": self.box_margin,
                "window": list(window) if isinstance(window, tuple) else window}
        try:
            opened = self._json("POST", "/v1/sessions", json=body)
        except errors.SAMSegmentError as exc:
            if "is not on this server" not in exc.problem:
                raise
            self._request("PUT", f"/v1/volumes/{self._vid}", data=array_to_npy(self.volume))
            opened = self._json("POST", "/v1/sessions", json=body)
        self.session_id = opened["session_id"]
        self.model_id = opened["model"]
        self.needs_box = bool(opened["needs_box"])
        win = opened["window"]
        self.window = IntensityWindow(float(win["low"]), float(win["high"]), source=win["source"])

    def _session_call(self, method: str, suffix: str, **kwargs: Any) -> Any:
        """A call on this client's session; reopens it once when the server lost it (restart)."""
        if self.session_id is None:
            raise SAMSegmentError("No volume is loaded in the session", "call set_volume(array) first")
        try:
            return self._json(method, f"/v1/sessions/{self.session_id}{suffix}", **kwargs)
        except SAMSegmentError as exc:
            if type(exc) is not ServerError or "does not exist on this server" not in exc.problem:
                raise
        self._open()
        return self._json(method, f"/v1/sessions/{self.session_id}{suffix}", **kwargs)

    def close(self) -> None:
        self._close_session()

    def _close_session(self) -> None:
        if self.session_id is not None:
            try:
                self._request("DELETE", f"/v1/sessions/{self.session_id}", timeout=5.0)
            except ServerError:
                pass  # a server that is gone has no session to close
            self.session_id = None

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- prompts
    @staticmethod
    def _prediction(data: Mapping[str, Any]) -> RemotePrediction:
        return RemotePrediction(SliceRef(int(data["axis"]), int(data["index"])), mask_from_json(data["mask"]),
                                float(data["score"]), int(data["area"]))

    def predict(self, ref: SliceRef, prompts: Prompts, refine: bool = True) -> RemotePrediction:
        """The mask for the current prompts on ``ref`` (as ``SegmentationSession.predict``)."""
        body = {"axis": ref.axis, "index": ref.index, "prompts": prompts_to_json(prompts), "refine": refine}
        return self._prediction(self._session_call("POST", "/predict", json=body))

    def undo(self, ref: SliceRef) -> RemotePrediction | None:
        data = self._session_call("POST", "/undo", json={"axis": ref.axis, "index": ref.index})["prediction"]
        return None if data is None else self._prediction(data)

    def reset(self, ref: SliceRef | None = None) -> None:
        self._session_call("POST", "/reset", json={} if ref is None else {"axis": ref.axis, "index": ref.index})

    def prefetch(self, around: SliceRef, radius: int = 2, direction: int = 0) -> int:
        body = {"axis": around.axis, "index": around.index, "radius": radius, "direction": direction}
        return int(self._session_call("POST", "/prefetch", json=body)["queued"])

    # ---------------------------------------------------------------- jobs
    def start_job(self, kind: str, **params: Any) -> "RemoteJob":
        """Start a server job (``propagate``, ``everything``, ``samaug``, ``uncertainty``); poll it."""
        data = self._session_call("POST", "/jobs", json={"kind": kind, **params})
        return RemoteJob(self, data["job_id"])

    def _run_job(self, kind: str, progress: Callable[[int, int, str], None] | None = None, cancel: Any = None,
                 on_slice: Callable[[dict[str, Any]], None] | None = None, **params: Any) -> dict[str, Any]:
        job = self.start_job(kind, **params)
        while True:
            if cancel is not None and cancel.cancelled:
                job.cancel()
            state = job.poll()
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
            time.sleep(0.02)

    def propagate(self, axis: int, anchors: Mapping[int, np.ndarray], direction: str = "both", rules: Any = None,
                  on_slice: Callable[[SliceRef, np.ndarray, SliceOutcome], None] | None = None,
                  progress: Callable[[int, int, str], None] | None = None, cancel: Any = None) -> PropagationResult:
        """The engine's ``propagate`` run on the server: the same ``PropagationResult``, and each slice
        handed to ``on_slice`` as the server decides it.

        ``rules`` is a ``StopRules`` (or a dict of its fields); ``cancel`` a ``CancelToken``."""
        from dataclasses import asdict, is_dataclass

        result = PropagationResult(axis)

        def got(item: dict[str, Any]) -> None:
            index, mask, outcome = int(item["index"]), mask_from_json(item["mask"]), SliceOutcome(**item["outcome"])
            result.masks[index], result.outcomes[index] = mask, outcome
            if on_slice is not None:
                on_slice(SliceRef(axis, index), mask, outcome)

        rules_json = asdict(rules) if is_dataclass(rules) else rules
        done = self._run_job("propagate", progress, cancel, got, axis=axis, direction=direction, rules=rules_json,
                             anchors={str(int(i)): mask_to_json(m) for i, m in anchors.items()})
        result.cancelled = bool(done.get("cancelled"))
        result.stops = [RunStop(s["anchor"], s["direction"], s["last_index"], StopReason(s["reason"]), s["at_index"])
                        for s in done.get("stops", [])]
        return result

    def everything(self, axis: int = 0, index: int | None = None, params: Mapping[str, Any] | None = None,
                   progress: Callable[[int, int, str], None] | None = None, cancel: Any = None) -> np.ndarray:
        """Everything-mode labels of one slice (``index``) or of the whole volume along ``axis`` (int32)."""
        done = self._run_job("everything", progress, cancel, axis=axis, index=index, params=params)
        return _npy(done["labels"])

    def samaug(self, axis: int = 0, index: int | None = None, params: Mapping[str, Any] | None = None,
               progress: Callable[[int, int, str], None] | None = None,
               cancel: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """SAMAug (segmentation prior, boundary prior) of one slice or the whole volume, float32."""
        done = self._run_job("samaug", progress, cancel, axis=axis, index=index, params=params)
        return _npy(done["segmentation_prior"]), _npy(done["boundary_prior"])

    def prompt_uncertainty(self, ref: SliceRef, prompts: Prompts, n: int = 16, jitter: float = 0.1, seed: int = 0,
                           measure: str = "entropy") -> tuple[np.ndarray, np.ndarray]:
        """(mean probability, uncertainty) maps over ``n`` jittered prompts, float32 (H, W)."""
        done = self._run_job("uncertainty", axis=ref.axis, index=ref.index, prompts=prompts_to_json(prompts), n=n,
                             jitter=jitter, seed=seed, measure=measure)
        return _npy(done["probability"]), _npy(done["uncertainty"])


class RemoteJob:
    """A job on the server: ``poll()`` returns what is new since the last poll; ``cancel()`` stops it."""

    def __init__(self, session: RemoteSession, job_id: str) -> None:
        self.session, self.id, self.next = session, job_id, 0

    def poll(self, timeout: float = 10.0) -> dict[str, Any]:
        state = self.session._json("GET", f"/v1/jobs/{self.id}", params={"after": self.next}, timeout=timeout)
        self.next = int(state["next"])
        return state

    def cancel(self) -> None:
        self.session._request("DELETE", f"/v1/jobs/{self.id}", timeout=10.0)
