"""Headless MRML for the Slicer-side tests: real scene, nodes and logics from ``slicer-core``.

The scene is set up the way Slicer's application does it (application logic on the scene, module
logics bound to it); there is no Qt, so the widget and effect classes are not exercised here, only
the Qt-free code under SAMSegment/SAMSegmentSlicer that they forward to.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "SAMSegment"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

slicer = pytest.importorskip("slicer", reason="slicer-core is needed for the Slicer-side tests (pip install slicer-core)")


from SAMSegmentSlicer.selftest import (ANISOTROPIC_SPACING, OBLIQUE_DIRECTIONS, ORIGIN,  # noqa: E402,F401
                                       add_volume, box_phantom, headless_mrml, slice_node_through)


@pytest.fixture
def mrml():
    """A fresh scene with the application logic and the module logics bound to it."""
    previous = getattr(slicer, "mrmlScene", None)
    scene, app, logics = headless_mrml()
    yield scene, app
    slicer.mrmlScene = previous
    scene.Clear(True)
    del logics


@pytest.fixture(scope="session")
def backend():
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from SAMSegmentLib.backends import SamBackend

    # Eager keeps these tests independent of the ONNX export, which has its own tests.
    return SamBackend.from_model_id("litemedsam", device="cpu", runtime="eager")
