"""Shared fixtures: the real LiteMedSAM backend (loaded once), sample data, phantoms."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Exported ONNX graphs go to the (git-ignored) pytest cache of this checkout, not the user's
# ~/.cache: tests never touch a user's real cache, and reruns still reuse the graphs.
os.environ.setdefault("SAMSEGMENT_CACHE", str(HERE.parents[1] / ".pytest_cache" / "samsegment"))
warnings.filterwarnings("ignore", category=FutureWarning, module="timm")


def shared_data_dir() -> Path:
    return Path(os.environ.get("SAMSEGMENT_DATA", HERE.parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def backend():
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from SAMSegmentLib.backends import SamBackend

    return SamBackend.from_model_id("litemedsam", device="cpu")


@pytest.fixture
def session(backend):
    from SAMSegmentLib.session import SegmentationSession

    s = SegmentationSession(model=backend)
    yield s
    s.close()


@pytest.fixture(scope="session")
def sample_ct():
    """(volume, labels, label values by name) of the bundled sample CT."""
    import SimpleITK as sitk

    from SAMSegmentLib import sample_data

    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.path(sample_data.IMAGE))))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.path(sample_data.LABELS))))
    return vol, lab, sample_data.label_values()


@pytest.fixture(scope="session")
def phantom():
    from phantoms import ellipsoid_ct

    return ellipsoid_ct()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def disks_everything(backend):
    """(session, volume, disk masks, regions of slice 0) of the three-disk phantom, everything mode
    with a 5 x 5 box grid: computed once for the automatic and SAMAug tests."""
    from phantoms import disks_ct

    from SAMSegmentLib.automatic import EverythingParams, everything_slice
    from SAMSegmentLib.session import SegmentationSession
    from SAMSegmentLib.volume import SliceRef

    vol, masks = disks_ct()
    s = SegmentationSession(model=backend)
    s.set_volume(vol)
    regions = everything_slice(s, SliceRef(0, 0), EverythingParams(points_per_side=5, box_scales=(0.25,)))
    yield s, vol, masks, regions
    s.close()
