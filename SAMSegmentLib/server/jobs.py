"""The server's long jobs: each turns a JSON request into a call of the engine's own function.

Propagation runs ``propagation.propagate`` with the slices streamed into the job as they are
decided; everything mode, SAMAug and prompt uncertainty run ``automatic``, ``samaug`` and
``uncertainty`` unchanged; adaptation runs ``SegmentationSession.adapt`` (the session then decodes
through the adapter when it is kept). Float and label maps travel as ``.npy`` (no pickle) in base64.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, fields
from typing import Any, Callable

import numpy as np

from ..wire import WireError, array_to_npy, mask_from_json, mask_to_json, prompts_from_json
from .state import Job, ServerState


def prediction_json(prediction: Any) -> dict[str, Any]:
    """A session ``Prediction`` as JSON: the mask (bit-packed), its score and area, and the slice."""
    return {"axis": prediction.ref.axis, "index": prediction.ref.index, "mask": mask_to_json(prediction.mask),
            "score": float(prediction.score), "area": int(prediction.area)}


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars as Python numbers, for JSON."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}


def array_json(array: np.ndarray) -> dict[str, str]:
    return {"npy": base64.b64encode(array_to_npy(array)).decode("ascii")}


def _int(body: dict[str, Any], name: str, default: int | None = None) -> int:
    value = body.get(name, default)
    if value is None or isinstance(value, bool):
        raise WireError(f"'{name}' must be an integer", f"send an integer {name}")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise WireError(f"'{name}' must be an integer, got {value!r}", f"send an integer {name}") from exc


def _dataclass_from(cls: type, data: Any, what: str) -> Any:
    """``cls(**data)`` for the dataclass fields present in ``data``; unknown keys are refused."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise WireError(f"'{what}' must be a JSON object", f"send {what} as {{field: value}}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise WireError(f"Unknown {what} field(s): {', '.join(unknown)}", f"use only: {', '.join(sorted(known))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise WireError(f"Bad {what}: {exc}", f"check the {what} fields") from exc


Work = Callable[[Job], dict[str, Any]]


def _progress(job: Job) -> Callable[[int, int, str], None]:
    def progress(done: int, total: int, message: str) -> None:
        job.progress = (done, total, message)

    return progress


def _propagate(session: Any, body: dict[str, Any]) -> Work:
    from ..propagation import DIRECTIONS, StopRules, propagate
    from ..volume import slice_shape

    axis = _int(body, "axis")
    if axis not in (0, 1, 2):
        raise WireError(f"Axis must be 0, 1 or 2, got {axis}", "send the slice axis of the anchors")
    from ..box3d import Box3D
    from ..wire import finite_array

    plane = slice_shape(session.shape, axis)
    raw, raw_boxes, raw_bounds = body.get("anchors") or {}, body.get("boxes") or {}, body.get("bounds")
    if not isinstance(raw, dict) or not isinstance(raw_boxes, dict) or not (raw or raw_boxes or raw_bounds):
        raise WireError("Propagation needs 'anchors' {slice index: mask}, 'boxes' {slice index: [x0, y0, x1, y1]} "
                        "or 'bounds' {lo: [k, j, i], hi: [k, j, i]}", "send the accepted slices' masks or the boxes")
    anchors = {_int({"index": k}, "index"): mask_from_json(v, plane) for k, v in raw.items()}
    boxes = {_int({"index": k}, "index"): finite_array(v, "a box", 4) for k, v in raw_boxes.items()}
    bounds = None
    if raw_bounds is not None:
        if not isinstance(raw_bounds, dict) or not {"lo", "hi"} <= set(raw_bounds):
            raise WireError("'bounds' must be {\"lo\": [k, j, i], \"hi\": [k, j, i]}", "send the 3D box's two corners")
        bounds = Box3D(tuple(raw_bounds["lo"]), tuple(raw_bounds["hi"]))  # checked now: a bad box is a 4xx
    rules = _dataclass_from(StopRules, body.get("rules"), "rules")
    direction = str(body.get("direction", "both"))
    if direction not in DIRECTIONS:
        raise WireError(f"Unknown propagation direction {direction!r}", f"use one of {', '.join(DIRECTIONS)}")

    def work(job: Job) -> dict[str, Any]:
        def on_slice(ref: Any, mask: np.ndarray, outcome: Any) -> None:
            job.add_slice({"index": ref.index, "mask": mask_to_json(mask), "outcome": _plain(asdict(outcome))})

        result = propagate(session, axis, anchors, direction, rules=rules, on_slice=on_slice,
                           progress=_progress(job), cancel=job.cancel, boxes=boxes or None, bounds=bounds)
        return {"axis": axis, "cancelled": result.cancelled,
                "stops": [{"anchor": s.anchor, "direction": s.direction, "last_index": s.last_index,
                           "reason": s.reason.value, "at_index": s.at_index} for s in result.stops]}

    return work


def _slice_ref(session: Any, body: dict[str, Any]) -> Any:
    """The slice a job names (None when it names none: the whole volume), checked against the volume."""
    from ..volume import SliceRef, check_slice_ref

    axis = _int(body, "axis", 0)
    if body.get("index") is None:
        SliceRef(axis, 0)  # the axis alone is checked
        return None
    ref = SliceRef(axis, _int(body, "index"))
    check_slice_ref(session.shape, ref)
    return ref


def _grid_job(session: Any, body: dict[str, Any],
              on_volume: Callable[[int, Any, Job], dict[str, Any]],
              on_slice: Callable[[Any, Any, Job], dict[str, Any]]) -> Work:
    """A prompt-grid job (everything mode, SAMAug): checks its EverythingParams and slice now, then
    runs ``on_volume(axis, params, job)`` without an ``index``, else ``on_slice(ref, params, job)``."""
    from ..automatic import EverythingParams

    params = _dataclass_from(EverythingParams, body.get("params"), "params")
    ref = _slice_ref(session, body)
    axis = _int(body, "axis", 0)
    return (lambda job: on_volume(axis, params, job)) if ref is None else (lambda job: on_slice(ref, params, job))


def _everything(session: Any, body: dict[str, Any]) -> Work:
    from ..automatic import everything_slice, everything_volume, regions_to_labels

    def volume(axis: int, params: Any, job: Job) -> dict[str, Any]:
        labels = everything_volume(session, axis, params=params, progress=_progress(job), cancel=job.cancel)
        return {"labels": array_json(labels.astype(np.int32))}

    def one_slice(ref: Any, params: Any, job: Job) -> dict[str, Any]:
        regions = everything_slice(session, ref, params, progress=_progress(job), cancel=job.cancel)
        labels = regions_to_labels(regions, session.slice_image(ref).shape)
        return {"labels": array_json(labels.astype(np.int32)),
                "regions": [{"label": r.label, "score": float(r.score), "stability": float(r.stability),
                             "area": r.area} for r in regions]}

    return _grid_job(session, body, volume, one_slice)


def _samaug(session: Any, body: dict[str, Any]) -> Work:
    from ..samaug import samaug_maps, samaug_volume

    def priors(seg: np.ndarray, bnd: np.ndarray) -> dict[str, Any]:
        return {"segmentation_prior": array_json(seg), "boundary_prior": array_json(bnd)}

    return _grid_job(session, body,
                     lambda axis, params, job: priors(*samaug_volume(session, axis, params, progress=_progress(job),
                                                                     cancel=job.cancel)),
                     lambda ref, params, job: priors(*samaug_maps(session, ref, params, cancel=job.cancel)))


def _uncertainty(session: Any, body: dict[str, Any]) -> Work:
    from ..uncertainty import prompt_uncertainty

    ref = _slice_ref(session, {"axis": _int(body, "axis"), "index": _int(body, "index")})
    prompts = prompts_from_json(body.get("prompts"))
    try:
        jitter = float(body.get("jitter", 0.1))
    except (TypeError, ValueError) as exc:
        raise WireError("'jitter' must be a number", "send e.g. 0.1") from exc
    if not np.isfinite(jitter):
        raise WireError("'jitter' must be a finite number", "send e.g. 0.1")
    n, seed, measure = _int(body, "n", 16), _int(body, "seed", 0), str(body.get("measure", "entropy"))

    def work(job: Job) -> dict[str, Any]:
        probability, uncertainty = prompt_uncertainty(session, ref, prompts, n=n, jitter=jitter, seed=seed,
                                                      measure=measure)
        return {"probability": array_json(probability), "uncertainty": array_json(uncertainty)}

    return work


def _adapt(session: Any, body: dict[str, Any]) -> Work:
    """``{"axis", "accepted": {"<index>": mask JSON}, "structure"?, "settings"?}``: the session's
    ``adapt``; the result is ``{"report": AdaptationReport.as_json()}``."""
    from ..adaptation import AdaptSettings, checked_accepted
    from ..volume import slice_shape

    axis = _int(body, "axis")
    if axis not in (0, 1, 2):
        raise WireError(f"Axis must be 0, 1 or 2, got {axis}", "send the slice axis of the accepted masks")
    raw = body.get("accepted")
    if not isinstance(raw, dict) or not raw:
        raise WireError("Adaptation needs 'accepted' {slice index: mask} with at least one slice",
                        "send the masks the user accepted, as mask_to_json(mask)")
    plane = slice_shape(session.shape, axis)
    accepted = {_int({"index": k}, "index"): mask_from_json(v, plane) for k, v in raw.items()}
    structure = body.get("structure")
    if structure is not None and not isinstance(structure, str):
        raise WireError("'structure' must be a string or null", "send the structure's name, or null")
    settings = _dataclass_from(AdaptSettings, body.get("settings"), "settings")
    settings.check()  # a bad setting, an empty mask or a slice outside the volume: a 4xx now, not a failed job
    accepted = checked_accepted(session.shape, axis, accepted)

    def work(job: Job) -> dict[str, Any]:
        report = session.adapt(axis, accepted, structure, settings, cancel=job.cancel, progress=_progress(job))
        return {"report": report.as_json()}

    return work


# Each kind checks its request now (a bad one is a 4xx, not a failed job) and returns the work.
_KINDS: dict[str, Callable[[Any, dict[str, Any]], Work]] = {
    "propagate": _propagate, "everything": _everything, "samaug": _samaug, "uncertainty": _uncertainty,
    "adapt": _adapt}
JOB_KINDS = tuple(_KINDS)


def start_job(state: ServerState, session_id: str, body: dict[str, Any]) -> Job:
    """Check the job ``body["kind"]`` asks for on ``session_id``'s session and queue it."""
    kind = body.get("kind")
    if kind not in _KINDS:
        raise WireError(f"Unknown job kind {kind!r}", f"use one of {', '.join(JOB_KINDS)}")
    work = _KINDS[kind](state.session(session_id).session, body)
    return state.start_job(session_id, kind, work)
