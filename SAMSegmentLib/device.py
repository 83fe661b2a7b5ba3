"""Pick the compute device: CUDA, then Apple MPS, then CPU, unless the user says otherwise."""

from __future__ import annotations

from .errors import SAMSegmentError


def available_devices() -> list[str]:
    import torch

    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


def select_device(requested: str | None = None) -> str:
    """``requested`` may be None/"auto", "cpu", "cuda", "cuda:N" or "mps"."""
    available = available_devices()
    if requested in (None, "", "auto"):
        return available[0]
    kind = requested.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise SAMSegmentError(f"Unknown device {requested!r}", "use auto, cpu, cuda, cuda:N or mps")
    if kind not in available:
        raise SAMSegmentError(f"Device {requested!r} is not available on this machine (available: {', '.join(available)})",
                              "use --device auto or cpu")
    return requested
