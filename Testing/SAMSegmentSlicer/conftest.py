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


SERVER_TOKEN = "slicer-side-tests-token-0123456789"


@pytest.fixture(scope="session")
def engine_server(backend):
    """A real SAMSegment server on 127.0.0.1 (uvicorn in a thread of this process), serving the
    eager LiteMedSAM backend: the Slicer logic under test reaches the engine only through it.
    Look-ahead encodes are off (no test reads a neighbour; they would only compete for the CPU)."""
    from SAMSegmentLib.server.serve import ServerHandle
    from SAMSegmentLib.server.state import Limits, ServerState

    handle = ServerHandle(ServerState(Limits(max_prefetch_radius=0), backends=(backend,)), SERVER_TOKEN).start()
    yield handle
    handle.stop()


@pytest.fixture
def link(engine_server):
    """The logic's link to ``engine_server``, as the module's "remote server" option makes it."""
    from SAMSegmentSlicer.server_link import RemoteServer

    return RemoteServer(engine_server.url, SERVER_TOKEN)
