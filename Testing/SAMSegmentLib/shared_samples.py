"""The shared sample scans (``../shared/data`` beside the checkout) as the thick-slice tests take them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def needs_sample(name: str) -> pytest.MarkDecorator:
    """Skip the test when the shared sample ``name`` (e.g. "mr-abdomen-3mm") is not beside the checkout."""
    return pytest.mark.skipif(not (SHARED_DATA / name).exists(),
                              reason=f"the shared sample {name} (../shared/data) is not beside the checkout")


def thick_sample(name: str, structure: str, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(volume, reference mask of ``structure``) of the shared sample ``name``, every ``stride``-th
    slice along axis 0 (as ``bench/accuracy.py --stride`` takes them), both C-contiguous."""
    from SAMSegmentLib import io as sio

    folder = SHARED_DATA / name
    vol, _ = sio.read_volume(folder / "image.nii.gz")
    labels, _ = sio.read_volume(folder / "labels.nii.gz")
    value = int({v: k for k, v in json.loads((folder / "labels.json").read_text()).items()}[structure])
    return np.ascontiguousarray(vol[::stride]), np.ascontiguousarray(labels[::stride] == value)
