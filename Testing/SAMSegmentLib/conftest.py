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


@pytest.fixture(scope="module")
def moving(backend):
    """A session holding a phantom whose cross-section moves 0.5 px per slice (embeddings shared by a
    module's tests); yields (session, volume, mask)."""
    from phantoms import ellipsoid_ct

    from SAMSegmentLib.session import SegmentationSession

    vol, mask = ellipsoid_ct(drift=0.5, seed=3)
    s = SegmentationSession(model=backend)
    s.set_volume(vol)
    yield s, vol, mask
    s.close()


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    """Slices 20..24 of the sample CT with its geometry (the bad-input campaign's crop5; the spleen box
    on its slice 2 is 10 22 39 51)."""
    import SimpleITK as sitk

    from SAMSegmentLib import sample_data

    path = tmp_path_factory.mktemp("crop") / "crop5.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(sample_data.path(sample_data.IMAGE)))[:, :, 20:25], str(path))
    return str(path)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model (or reaching a server) fails the test: a command's error must come before that."""
    from SAMSegmentLib import cli

    def refuse(args):
        raise AssertionError("the command got as far as loading the model")

    monkeypatch.setattr(cli, "_session", refuse)
