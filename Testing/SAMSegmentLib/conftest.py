"""Fixtures of the engine tests: sessions, sample data, phantoms.

The LiteMedSAM backends (``backend`` = the default runtime, ``eager_backend``, ``onnx_backend``)
are in Testing/conftest.py, shared with the Slicer-side tests.
"""

from __future__ import annotations

import numpy as np
import pytest


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
