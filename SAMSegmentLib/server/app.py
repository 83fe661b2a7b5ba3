"""The HTTP API of ``samsegment serve`` (FastAPI), version 1.

Every route but ``/v1/info`` and ``/v1/health`` needs ``Authorization: Bearer <token>`` when the
server has a token (compared in constant time). Errors are JSON ``{"type", "problem", "remedy"}``
with a 4xx status for anything the client can fix (never a traceback); overload is 429 (prompts)
or 503 (jobs) with ``Retry-After``.

FastAPI is imported here, at module level (it resolves the routes' annotations from this module's
globals); nothing imports this module unless a server is built.

Routes (all JSON unless noted)::

    GET    /v1/info                         server and API version, models, device, limits
    GET    /v1/health                       {"ok": true}
    HEAD   /v1/volumes/{id}                 200 when the server holds it, else 404
    PUT    /v1/volumes/{id}                 body: .npy bytes (application/octet-stream)
    POST   /v1/sessions                     {volume_id, model?, window?, modality?, box_margin?}
    DELETE /v1/sessions/{sid}
    POST   /v1/sessions/{sid}/predict       {axis, index, prompts, refine?}
    POST   /v1/sessions/{sid}/undo          {axis, index}
    POST   /v1/sessions/{sid}/reset         {axis?, index?}
    POST   /v1/sessions/{sid}/prefetch      {axis, index, radius?, direction?, include_self?}
    POST   /v1/sessions/{sid}/jobs          {kind: propagate|everything|samaug|uncertainty|adapt, ...}
    GET    /v1/sessions/{sid}/adapter       the adapter in use as a signed adapter file (octet-stream);
                                            404 NoAdapter when the stock model is in use
    PUT    /v1/sessions/{sid}/adapter       body: a signed adapter file (octet-stream, at most
                                            Limits.max_adapter_bytes) -> {structure, report}
    DELETE /v1/sessions/{sid}/adapter       the stock model again
    GET    /v1/jobs/{jid}?after=N           state, progress, slices from N on, result
    DELETE /v1/jobs/{jid}                   cancel

Adapter files are signed and verified with the server's key (``ServerState.adapter_key``), never
unpickled; a file signed elsewhere is refused (400, the ``CheckpointError``'s problem and remedy)
unless the machines share the site's key file (``$SAMSEGMENT_ADAPTER_KEY``).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import ModelNotFoundError, SAMSegmentError
from ..wire import API_VERSION, VolumeReceiver, WireError
from .jobs import JOB_KINDS, prediction_json, start_job
from .state import Limits, NoAdapter, NotFound, Overloaded, ServerState, TooLarge

log = logging.getLogger("SAMSegment.server")

PUBLIC_PATHS = ("/v1/info", "/v1/health")


def _status(exc: SAMSegmentError) -> int:
    if isinstance(exc, (NotFound, ModelNotFoundError)):
        return 404
    if isinstance(exc, TooLarge):
        return 413
    if isinstance(exc, Overloaded):
        return 429
    return 400


def error_body(exc: SAMSegmentError) -> dict[str, str]:
    return {"type": type(exc).__name__, "problem": exc.problem, "remedy": exc.remedy}


def create_app(state: ServerState, token: str | None):
    """The FastAPI application serving ``state``; ``token`` None disables authentication (loopback only,
    enforced by ``serve``)."""
    app = FastAPI(title="SAMSegment", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None and request.url.path not in PUBLIC_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"type": "AuthenticationError", "problem": "Missing or wrong API token",
                                     "remedy": "send 'Authorization: Bearer <token>' with the server's token"},
                                    status_code=401)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > state.limits.max_request_bytes:
            return JSONResponse(error_body(TooLarge(f"Request of {int(length)} bytes exceeds the server's limit of "
                                                    f"{state.limits.max_request_bytes}", "send a smaller volume")),
                                status_code=413)
        return await call_next(request)

    @app.exception_handler(SAMSegmentError)
    async def engine_error(request: Request, exc: SAMSegmentError):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
        log.info("%s %s -> %s", request.method, request.url.path, type(exc).__name__)
        return JSONResponse(error_body(exc), status_code=_status(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"type": "BadRequest", "problem": f"Malformed request ({where})",
                             "remedy": "send the fields the API documents (SAMSegmentLib.client does)"},
                            status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"type": "InternalError", "problem": f"{type(exc).__name__} on the server",
                             "remedy": "report this to the server's administrator"}, status_code=500)

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise WireError("The request body is not JSON", "send a JSON object") from exc
        if not isinstance(body, dict):
            raise WireError("The request body is not a JSON object", "send a JSON object")
        return body

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"ok": True}

    from ..device import select_device
    from ..model_registry import default_model_id, load_registry

    # resolved once, before the server listens: the first call imports torch (seconds), which
    # would otherwise make a client's first /v1/info wait
    device_name = str(state.device or select_device(None))
    models, default_model = sorted(load_registry(state.registry)), default_model_id()

    @app.get("/v1/info")
    def info() -> dict[str, Any]:
        return {"server_version": __version__, "api_version": API_VERSION,
                "models": models, "default_model": default_model,
                "device": device_name, "loaded": state.loaded_devices(),
                "job_kinds": list(JOB_KINDS), "limits": state.limits.as_json(), "auth": token is not None}

    @app.head("/v1/volumes/{volume_id}")
    def has_volume(volume_id: str):
        return Response(status_code=200 if state.has_volume(volume_id) else 404)

    @app.put("/v1/volumes/{volume_id}")
    async def put_volume(volume_id: str, request: Request) -> dict[str, Any]:
        receiver, received = VolumeReceiver(state.check_volume_shape), 0
        async for chunk in request.stream():  # checked, stored and hashed as it arrives
            received += len(chunk)
            if received > state.limits.max_request_bytes:
                raise TooLarge(f"Volume upload exceeds the server's limit of {state.limits.max_request_bytes} bytes",
                               "crop or resample the volume")
            receiver.feed(chunk)
        array, content = receiver.finish()
        state.put_volume(volume_id, array, content)
        log.info("volume %s %s stored", volume_id[:12], array.shape)
        return {"volume_id": volume_id, "shape": list(array.shape), "dtype": array.dtype.name}

    @app.post("/v1/sessions")
    async def open_session(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        window = body.get("window")
        if isinstance(window, list):
            window = tuple(float(v) for v in window)
        margin = body.get("box_margin")
        client = state.open_session(str(body.get("volume_id", "")), body.get("model"), window,
                                    str(body.get("modality", "auto")), None if margin is None else float(margin))
        session = client.session
        win = session.window
        return {"session_id": client.id, "volume_id": client.volume_id, "model": session.model_id,
                "shape": list(session.shape), "window": {"low": win.low, "high": win.high, "source": win.source},
                "box_margin": session.box_margin, "needs_box": bool(session.backend.spec.needs_box)}

    @app.delete("/v1/sessions/{session_id}")
    def close_session(session_id: str) -> dict[str, Any]:
        state.close_session(session_id)
        return {"closed": session_id}

    def ref_of(body: dict[str, Any]):
        from ..volume import SliceRef

        try:
            return SliceRef(int(body["axis"]), int(body["index"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError("A slice needs integer 'axis' and 'index'", "send {\"axis\": 0, \"index\": 12}") from exc

    @app.post("/v1/sessions/{session_id}/predict")
    async def predict(session_id: str, request: Request) -> dict[str, Any]:
        from ..wire import prompts_from_json

        body = await json_body(request)
        session = state.session(session_id).session
        ref, prompts = ref_of(body), prompts_from_json(body.get("prompts"))
        refine = bool(body.get("refine", True))
        prediction = await run_in_threadpool(state.interactive, lambda: session.predict(ref, prompts, refine=refine))
        return prediction_json(prediction)

    @app.post("/v1/sessions/{session_id}/undo")
    async def undo(session_id: str, request: Request) -> dict[str, Any]:
        body = await json_body(request)
        previous = state.session(session_id).session.undo(ref_of(body))
        return {"prediction": None if previous is None else prediction_json(previous)}

    @app.post("/v1/sessions/{session_id}/reset")
    async def reset(session_id: str, request: Request) -> dict[str, Any]:
        body = await json_body(request)
        session = state.session(session_id).session
        session.reset(ref_of(body) if "axis" in body else None)
        return {"reset": True}

    @app.post("/v1/sessions/{session_id}/prefetch")
    async def prefetch(session_id: str, request: Request) -> dict[str, Any]:
        body = await json_body(request)
        session = state.session(session_id).session
        ref = ref_of(body)
        warmed = 0
        if body.get("include_self"):  # the slice itself first, at interactive priority (a mouse press)
            from ..worker import PRIORITY_INTERACTIVE

            session.encode_async(ref, PRIORITY_INTERACTIVE)
            warmed = 1
        radius = min(int(body.get("radius", 2)), state.limits.max_prefetch_radius)
        queued = session.prefetch(ref, radius=radius, direction=int(body.get("direction", 0)))
        return {"queued": queued + warmed}

    @app.post("/v1/sessions/{session_id}/jobs")
    async def new_job(session_id: str, request: Request) -> dict[str, Any]:
        body = await json_body(request)
        job = start_job(state, session_id, body)
        return job.snapshot()

    @app.get("/v1/sessions/{session_id}/adapter")
    async def get_adapter(session_id: str) -> Response:
        session = state.session(session_id).session
        data = await run_in_threadpool(lambda: session.adapter_file_bytes(state.adapter_key()))
        if data is None:
            raise NoAdapter("This session decodes with the stock model: it has no adapted decoder to send",
                            "adapt to accepted slices first (an 'adapt' job), or load an adapter file")
        return Response(content=data, media_type="application/octet-stream")

    @app.put("/v1/sessions/{session_id}/adapter")
    async def put_adapter(session_id: str, request: Request, source: str = "The uploaded adapter") -> dict[str, Any]:
        session = state.session(session_id).session
        limit = state.limits.max_adapter_bytes
        too_large = TooLarge(f"The adapter file exceeds this server's limit of {limit} bytes",
                             "send a file written by --save-adapter or the module's Save (tens of MiB at most)")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large  # before reading any of it
        received = bytearray()
        async for chunk in request.stream():
            received += chunk
            if len(received) > limit:
                raise too_large
        source = " ".join(source.split())[:200] or "The uploaded adapter"
        return await run_in_threadpool(session.load_adapter_file_bytes, bytes(received), state.adapter_key(), source)

    @app.delete("/v1/sessions/{session_id}/adapter")
    def delete_adapter(session_id: str) -> dict[str, Any]:
        state.session(session_id).session.use_stock_model()
        return {"adapter": None}

    @app.get("/v1/jobs/{job_id}")
    def poll_job(job_id: str, after: int = 0) -> dict[str, Any]:
        return state.job(job_id).snapshot(max(0, after))

    @app.delete("/v1/jobs/{job_id}")
    def cancel_job(job_id: str) -> dict[str, Any]:
        job = state.job(job_id)
        job.cancel.cancel()
        return job.snapshot(len(job.slices))

    return app


__all__ = ["Limits", "ServerState", "create_app"]
