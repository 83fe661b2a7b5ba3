"""Which runtime runs each part of a model: eager PyTorch, or ONNX Runtime graphs exported once.

``runtime="auto"`` (default; also settable with ``$SAMSEGMENT_RUNTIME``) picks ONNX Runtime on a
CPU device when ``onnxruntime`` imports, and eager PyTorch on CUDA/MPS (the CPU execution provider
would move every tensor off the GPU); on CPU it keeps the ViT-L/H image encoders eager
(``AUTO_ONNX_ENCODERS``). ``"eager"`` and ``"onnx"`` force one for both parts. The graphs
themselves are in ``sam_graphs``, their export and disk cache in ``onnx_cache``; ``SamBackend``
falls back to eager PyTorch for any part ONNX Runtime cannot run.
"""

from __future__ import annotations

import logging
import os

from .errors import SAMSegmentError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "eager", "onnx")
RUNTIME_ENV = "SAMSEGMENT_RUNTIME"

# Encoders that "auto" runs in ONNX Runtime on a CPU (bench/runtimes.py measures the others as no
# faster there, for a long, memory-hungry export). Every decoder is the same small graph.
AUTO_ONNX_ENCODERS = ("litemedsam", "vit_b")


def requested_runtime(runtime: str | None = None) -> str:
    """The runtime asked for: ``runtime``, else ``$SAMSEGMENT_RUNTIME``, else "auto".

    Args:
        runtime: "auto", "eager", "onnx" (any case), or None / "" for the default.

    Returns:
        One of ``RUNTIMES``.

    Raises:
        SAMSegmentError: for any other value.
    """
    value = runtime if runtime not in (None, "") else os.environ.get(RUNTIME_ENV, "") or "auto"
    value = str(value).strip().lower()
    if value not in RUNTIMES:
        raise SAMSegmentError(f"Unknown runtime {value!r}", f"use one of {', '.join(RUNTIMES)}")
    return value


def onnxruntime_available() -> bool:
    """True when ``import onnxruntime`` works (it can be missing, or broken by a bad wheel)."""
    try:
        import onnxruntime  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or an OSError from a missing shared library
        log.debug("onnxruntime is not usable: %s", exc)
        return False
    return True


def resolve_runtime(runtime: str | None, device: str) -> str:
    """What a requested runtime means on a device.

    Args:
        runtime: as for ``requested_runtime``.
        device: "cpu", "cuda:0", "mps", ...

    Returns:
        "onnx" or "eager".
    """
    requested = requested_runtime(runtime)
    if requested == "eager":
        return "eager"
    kind = str(device).split(":")[0]
    if kind != "cpu":
        if requested == "onnx":
            log.warning("ONNX Runtime is used on CPU only; the %s device runs eager PyTorch", device)
        return "eager"
    if not onnxruntime_available():
        if requested == "onnx":
            log.warning("onnxruntime is not installed (pip install onnxruntime); running eager PyTorch")
        return "eager"
    return "onnx"


def part_runtimes(runtime: str | None, device: str, architecture: str) -> dict[str, str]:
    """The planned runtime of each part of one model.

    Args:
        runtime: as for ``requested_runtime``.
        device: as for ``resolve_runtime``.
        architecture: the model's architecture ("litemedsam", "vit_b", "vit_l", "vit_h").

    Returns:
        {"encoder": "onnx" | "eager", "decoder": "onnx" | "eager"}.
    """
    resolved = resolve_runtime(runtime, device)
    parts = {"encoder": resolved, "decoder": resolved}
    if resolved == "onnx" and requested_runtime(runtime) == "auto" and architecture not in AUTO_ONNX_ENCODERS:
        parts["encoder"] = "eager"
    return parts
