"""Fixtures shared by both test folders: one LiteMedSAM backend per runtime for the whole session.

Each backend is built once (sha256 of the weights, load, and for ONNX the export) and shared by
every test that asks for it; a folder picks the runtime its tests run on by aliasing ``backend``
(Testing/SAMSegmentLib: ``auto``; Testing/SAMSegmentSlicer: ``eager``). Import paths come from
pyproject.toml's ``[tool.pytest.ini_options] pythonpath``, not from ``sys.path`` edits here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Exported ONNX graphs go to the (git-ignored) pytest cache of this checkout, not the user's
# ~/.cache: tests never touch a user's real cache, and reruns still reuse the graphs.
os.environ.setdefault("SAMSEGMENT_CACHE", str(REPO / ".pytest_cache" / "samsegment"))
warnings.filterwarnings("ignore", category=FutureWarning, module="timm")


def _litemedsam(**kwargs):
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from SAMSegmentLib.backends import SamBackend

    return SamBackend.from_model_id("litemedsam", device="cpu", **kwargs)


@pytest.fixture(scope="session")
def auto_backend():
    """LiteMedSAM on the default runtime ("auto": ONNX Runtime when installed, else eager)."""
    return _litemedsam()


@pytest.fixture(scope="session")
def eager_backend():
    """LiteMedSAM on eager PyTorch: independent of the ONNX export, which has its own tests."""
    return _litemedsam(runtime="eager")


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def onnx_backend(onnx_dir):
    """LiteMedSAM on ONNX Runtime, both graphs exported once into a fresh folder (~10 s on 2 cores)."""
    backend = _litemedsam(runtime="onnx", onnx_cache_dir=onnx_dir)
    info = backend.prepare_runtime()
    assert info["encoder"] == info["decoder"] == "onnx", info
    return backend


@pytest.fixture(scope="session")
def backend(auto_backend):
    """The backend most tests use: the default runtime (the Slicer folder overrides it with eager)."""
    return auto_backend
