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


def content_hasher(dtype: np.dtype, shape: tuple[int, ...]) -> Any:
    """The sha256 of a volume's content id, started with its dtype and shape; feed it the C-ordered
    bytes (at once, or in pieces as they arrive) and take ``hexdigest()``."""
    return hashlib.sha256(f"{np.dtype(dtype).str}|{tuple(shape)}".encode())


def volume_id(volume: np.ndarray) -> str:
    """Content address of a volume: sha256 over dtype, shape and the C-ordered bytes.

    Two clients holding the same study get the same id, so the server keeps one copy and its
    embeddings serve both.
    """
    arr = np.ascontiguousarray(volume)
    digest = content_hasher(arr.dtype, arr.shape)
    digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


def array_to_npy(array: np.ndarray) -> bytes:
    """``array`` as ``.npy`` bytes (no pickle: object arrays cannot be written)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class VolumeReceiver:
    """A ``.npy`` volume arriving in chunks (a server's upload route), checked and hashed as it arrives.

    The header is read as soon as it is complete: a dtype outside ``VOLUME_DTYPES`` (objects, so no
    pickle is ever read), Fortran order or a non-3D shape is refused before any data is stored, and
    ``check_shape(shape)`` (the server's size limits) runs before the array is allocated. The data
    go straight into the array and into the content hash, so nothing is copied or hashed twice.
    ``finish()`` returns ``(array, volume_id)``; a short or long body is refused.
    """

    def __init__(self, check_shape: Any = None) -> None:
        self._check_shape = check_shape
        self._head = bytearray()
        self._array: np.ndarray | None = None
        self._target: memoryview | None = None
        self._filled = 0
        self._digest: Any = None

    def feed(self, chunk: bytes) -> None:
        if self._array is None:
            self._head += chunk
            if not self._parse_head():
                return
            chunk, self._head = bytes(self._head[self._data_offset:]), bytearray()
        assert self._target is not None
        end = self._filled + len(chunk)
        if end > len(self._target):
            raise WireError(f"The volume upload has more bytes than its .npy header announces ({len(self._target)})",
                            "send np.save(..., allow_pickle=False) bytes of the array only")
        self._target[self._filled:end] = chunk
        self._digest.update(chunk)
        self._filled = end

    def _parse_head(self) -> bool:
        from numpy.lib import format as npy_format

        head = bytes(self._head)
        if len(head) < 10:
            return False
        if head[:6] != b"\x93NUMPY":
            raise WireError("The volume is not a .npy array (bad magic bytes)",
                            "send np.save(..., allow_pickle=False) bytes of a (K, J, I) array")
        major = head[6]
        size_bytes = 2 if major == 1 else 4
        if len(head) < 8 + size_bytes:
            return False
        header_len = int.from_bytes(head[8:8 + size_bytes], "little")
        self._data_offset = 8 + size_bytes + header_len
        if header_len > 1 << 16:
            raise WireError("The volume's .npy header is implausibly long", "send np.save(...) bytes")
        if len(head) < self._data_offset:
            return False
        try:
            stream = io.BytesIO(head)
            version = npy_format.read_magic(stream)
            reader = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, fortran, dtype = reader(stream)
        except (ValueError, OSError) as exc:
            raise WireError(f"The volume's .npy header cannot be read ({exc})",
                            "send np.save(..., allow_pickle=False) bytes of a (K, J, I) array") from exc
        if dtype.name not in VOLUME_DTYPES or dtype.hasobject:
            raise WireError(f"Volume dtype {dtype} is not accepted", f"send one of {', '.join(VOLUME_DTYPES)}")
        if len(shape) != 3:
            raise WireError(f"The volume has {len(shape)} dimensions, not 3", "send a (K, J, I) array")
        if fortran:
            raise WireError("The volume is in Fortran order", "send a C-ordered array (np.ascontiguousarray)")
        if self._check_shape is not None:
            self._check_shape(tuple(int(n) for n in shape))
        self._array = np.empty(shape, dtype=dtype)
        self._target = memoryview(self._array.reshape(-1)).cast("B")
        self._digest = content_hasher(self._array.dtype, self._array.shape)
        return True

    def finish(self) -> tuple[np.ndarray, str]:
        if self._array is None or self._target is None or self._filled != len(self._target):
            got = self._filled if self._array is not None else len(self._head)
            raise WireError(f"The volume upload ended early ({got} bytes of data received)",
                            "send the whole np.save(...) output")
        return self._array, self._digest.hexdigest()


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


def finite_array(values: Any, what: str, size: int | None = None) -> np.ndarray:
    """``values`` as a float64 array (of ``size`` numbers when given); a ``WireError`` naming ``what``
    when they are not that many finite numbers."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise WireError(f"{what} is not a list of numbers", f"send numbers for {what}") from exc
    if size is not None and array.size != size:
        raise WireError(f"{what} has {array.size} numbers, not {size}", f"send {size} numbers for {what}")
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
    points = finite_array(data.get("points") or [], "points").reshape(-1, 2)
    labels = np.asarray(data.get("labels") or [], dtype=np.int64).reshape(-1)
    box = data.get("box")
    return Prompts(points, labels, None if box is None else finite_array(box, "box").reshape(4))
