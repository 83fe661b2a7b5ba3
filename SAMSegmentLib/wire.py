"""What travels between ``samsegment serve`` and its clients: numpy arrays, masks and prompts.

Only plain data crosses the wire, never pickles: volumes as ``.npy`` bytes read with
``allow_pickle=False`` (so an object array is refused, not unpickled), masks as bit-packed base64
inside JSON, prompts and settings as JSON numbers. Numpy only: the client (and so Slicer's Python)
never needs torch to speak to a server.
"""

from __future__ import annotations

import base64
import hashlib
import io
from typing import Any

import numpy as np

from .errors import SAMSegmentError
from .prompts import Prompts

API_VERSION = 1
# Volume dtypes a scanner produces; anything else (objects, strings, complex) is refused.
VOLUME_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


class WireError(SAMSegmentError):
    """A request or response that does not have the agreed shape."""


def volume_id(volume: np.ndarray) -> str:
    """Content address of a volume: sha256 over dtype, shape and the C-ordered bytes.

    Two clients holding the same study get the same id, so the server keeps one copy and its
    embeddings serve both.
    """
    arr = np.ascontiguousarray(volume)
    digest = hashlib.sha256(f"{arr.dtype.str}|{arr.shape}".encode())
    digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


def array_to_npy(array: np.ndarray) -> bytes:
    """``array`` as ``.npy`` bytes (no pickle: object arrays cannot be written)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_to_volume(data: bytes) -> np.ndarray:
    """A 3D volume from ``.npy`` bytes; refuses pickles, other dtypes and other dimensions."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise WireError(f"The volume is not a readable .npy array ({exc})",
                        "send np.save(..., allow_pickle=False) bytes of a (K, J, I) array") from exc
    if array.dtype.name not in VOLUME_DTYPES:
        raise WireError(f"Volume dtype {array.dtype} is not accepted", f"send one of {', '.join(VOLUME_DTYPES)}")
    if array.ndim != 3:
        raise WireError(f"The volume has {array.ndim} dimensions, not 3", "send a (K, J, I) array")
    return array


def mask_to_json(mask: np.ndarray) -> dict[str, Any]:
    """A 2D bool mask as ``{"shape": [h, w], "bits": <base64 of np.packbits>}``."""
    mask = np.asarray(mask, dtype=bool)
    return {"shape": list(mask.shape), "bits": base64.b64encode(np.packbits(mask, axis=None)).decode("ascii")}


def mask_from_json(data: Any, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The inverse of ``mask_to_json``; ``shape`` (when given) must match."""
    try:
        h, w = (int(v) for v in data["shape"])
        bits = np.frombuffer(base64.b64decode(data["bits"], validate=True), dtype=np.uint8)
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError("A mask must be {\"shape\": [h, w], \"bits\": base64}", "send mask_to_json(mask)") from exc
    if h < 0 or w < 0 or bits.size != (h * w + 7) // 8:
        raise WireError(f"Mask bits do not fill a {h} x {w} mask", "send mask_to_json(mask)")
    if shape is not None and (h, w) != tuple(shape):
        raise WireError(f"Mask shape {h} x {w} differs from the slice's {shape[0]} x {shape[1]}",
                        "send a mask of the slice it belongs to")
    return np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool)


def _finite(values: Any, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise WireError(f"{what} contains a non-finite number", f"send finite pixel coordinates for {what}")
    return array


def prompts_to_json(prompts: Prompts) -> dict[str, Any]:
    return {"points": np.asarray(prompts.points, dtype=float).reshape(-1, 2).tolist(),
            "labels": np.asarray(prompts.labels, dtype=int).tolist(),
            "box": None if prompts.box is None else np.asarray(prompts.box, dtype=float).tolist()}


def prompts_from_json(data: Any) -> Prompts:
    """Prompts from ``{"points": [[x, y], ...], "labels": [1|0, ...], "box": [x0, y0, x1, y1] | null}``."""
    if not isinstance(data, dict):
        raise WireError("Prompts must be a JSON object", "send {\"points\": [], \"labels\": [], \"box\": null}")
    points = _finite(data.get("points") or [], "points").reshape(-1, 2)
    labels = np.asarray(data.get("labels") or [], dtype=np.int64).reshape(-1)
    box = data.get("box")
    return Prompts(points, labels, None if box is None else _finite(box, "box").reshape(4))
