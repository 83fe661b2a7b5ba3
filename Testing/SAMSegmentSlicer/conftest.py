"""Headless MRML for the Slicer-side tests: real scene, nodes and logics from ``slicer-core``.

The scene is set up the way Slicer's application does it (application logic on the scene, module
logics bound to it); there is no Qt, so the widget and effect classes are not exercised here, only
the Qt-free code under SAMSegment/SAMSegmentSlicer that they forward to. Helpers the tests import
by name live in mrml_fixtures.py; SAMSegment/ is on the import path through pyproject.toml.
"""

from __future__ import annotations

import pytest

slicer = pytest.importorskip("slicer",
                             reason="slicer-core is needed for the Slicer-side tests (pip install slicer-core)")

from SAMSegmentSlicer.selftest import headless_mrml  # noqa: E402


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
def backend(eager_backend):
    """Eager on purpose: keeps these tests independent of the ONNX export, which has its own tests."""
    return eager_backend
