"""SAMSegmentLib: Segment-Anything segmentation of medical volumes, without any GUI.

Volumes are numpy arrays in (K, J, I) order, prompts are in slice pixel coordinates, masks come
back as numpy arrays. Nothing here imports slicer, qt, vtk or ctk, and torch is imported only
when a model is built, so the package is cheap to import from Slicer's start-up or a CLI --help.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SegmentationSession": "session",
    "Prediction": "session",
    "Prompts": "prompts",
    "SliceRef": "volume",
    "IntensityWindow": "preprocessing",
    "EmbeddingCache": "cache",
    "propagate": "propagation",
    "PromptPolicy": "propagation",
    "StopRules": "propagation",
    "StopReason": "propagation",
    "CancelToken": "worker",
    "SAMSegmentError": "errors",
    "load_registry": "model_registry",
    "EverythingParams": "automatic",
    "Region": "automatic",
    "everything_slice": "automatic",
    "everything_volume": "automatic",
    "samaug_maps": "samaug",
    "samaug_volume": "samaug",
    "samaug_batch": "samaug",
    "prompt_uncertainty": "uncertainty",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
