"""Reading and writing with SimpleITK: formats, DICOM series, geometry, and refusal of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from SAMSegmentLib import io as sio
from SAMSegmentLib.errors import ImageIOError, VolumeError


def oblique_image(shape_kji=(6, 20, 24), spacing=(0.7, 0.9, 2.5)) -> sitk.Image:
    arr = (np.arange(np.prod(shape_kji)).reshape(shape_kji) % 1000 - 300).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((12.5, -40.0, 7.25))
    a, b = np.deg2rad(25.0), np.deg2rad(-10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    img.SetDirection(tuple((rz @ rx).ravel()))
    return img


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_keeps_values_and_oblique_geometry(tmp_path, ext):
    img = oblique_image()
    path = tmp_path / f"img{ext}"
    sitk.WriteImage(img, str(path))
    arr, geom = sio.read_volume(path)
    assert np.array_equal(arr, sitk.GetArrayFromImage(img)) and arr.dtype == np.int16
    assert np.allclose(geom.spacing, img.GetSpacing()) and np.allclose(geom.origin, img.GetOrigin(), atol=1e-4)
    assert np.allclose(np.ravel(geom.direction), img.GetDirection(), atol=1e-5)
    mask = arr > 100
    out = sio.write_mask(tmp_path / f"mask{ext}", mask, geom, source_paths=[path])
    back = sitk.ReadImage(str(out))
    assert back.GetSize() == img.GetSize()
    assert np.allclose(back.GetDirection(), img.GetDirection(), atol=1e-5)
    assert np.allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(back) > 0, mask)


def test_physical_and_index_agree_with_simpleitk():
    img = oblique_image()
    geom = sio.ImageGeometry.from_sitk(img)
    for ijk in [(0.0, 0.0, 0.0), (3.5, 7.25, 2.0), (23.0, 19.0, 5.0)]:
        lps = img.TransformContinuousIndexToPhysicalPoint(ijk)
        assert np.allclose(geom.index_to_physical(ijk), lps)
        assert np.allclose(geom.physical_to_index(lps), ijk)
        assert np.allclose(geom.physical_to_array_index(lps), ijk[::-1])
    assert geom.array_spacing() == (2.5, 0.9, 0.7)


def make_dicom_series(folder, img: sitk.Image, uid: str, description: str = "test") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    direction = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, value in [("0008|0060", "CT"), ("0020|000e", uid), ("0020|000d", uid + ".1"),
                           ("0008|103e", description), ("0020|0013", str(k + 1)),
                           ("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0020|0037", "\\".join(map(str, direction[0:9:3] + direction[1:9:3]))),
                           ("0028|1053", "1"), ("0028|1052", "0")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid[-4:]}_{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder(tmp_path, caplog):
    img = oblique_image(shape_kji=(5, 16, 18), spacing=(0.8, 0.8, 2.0))
    make_dicom_series(tmp_path / "dcm", img, "1.2.826.0.1.3680043.2.1125.1.1111")
    arr, geom = sio.read_volume(tmp_path / "dcm")
    assert np.array_equal(arr, sitk.GetArrayFromImage(img))
    assert np.allclose(geom.spacing, img.GetSpacing(), atol=1e-4)
    assert np.allclose(np.ravel(geom.direction), img.GetDirection(), atol=1e-4)
    assert np.allclose(geom.origin, img.GetOrigin(), atol=1e-3)
    # a second, smaller series in the same folder: the larger one is used, with a warning
    make_dicom_series(tmp_path / "dcm", oblique_image(shape_kji=(3, 16, 18)), "1.2.826.0.1.3680043.2.1125.1.2222")
    arr2, _ = sio.read_volume(tmp_path / "dcm")
    assert arr2.shape == (5, 16, 18)
    assert "2 DICOM series" in caplog.text
    arr3, _ = sio.read_volume(tmp_path / "dcm", series_uid="1.2.826.0.1.3680043.2.1125.1.2222")
    assert arr3.shape == (3, 16, 18)
    with pytest.raises(ImageIOError, match="is not in"):
        sio.read_volume(tmp_path / "dcm", series_uid="9.9")


def test_sample_ct_geometry(sample_ct):
    from SAMSegmentLib import sample_data

    arr, geom = sio.read_volume(sample_data.path(sample_data.IMAGE))
    assert arr.shape == (30, 101, 122) and np.allclose(np.diag(geom.direction), (-1, -1, 1))


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ImageIOError, match="does not exist"):
        sio.read_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ImageIOError, match="No DICOM series"):
        sio.read_volume(tmp_path / "empty_dir")
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ImageIOError, match="truncated or corrupt"):
        sio.read_volume(bad)
    good = tmp_path / "ok.nrrd"
    sitk.WriteImage(oblique_image(), str(good))
    half = tmp_path / "half.nrrd"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageIOError):
        sio.read_volume(half)
    two_d = tmp_path / "2d.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(two_d))
    with pytest.raises(VolumeError, match="2D image"):
        sio.read_volume(two_d)
    four_d = tmp_path / "4d.nrrd"
    frames = [sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16)) for _ in range(3)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(four_d))
    with pytest.raises(VolumeError, match="4D"):
        sio.read_volume(four_d)
    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.uint8), isVector=True), str(rgb))
    with pytest.raises(VolumeError, match="3 components"):
        sio.read_volume(rgb)
    nan = tmp_path / "nan.nrrd"
    a = np.zeros((4, 8, 8), np.float32)
    a[1, 1, 1] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(a), str(nan))
    with pytest.raises(VolumeError, match="NaN"):
        sio.read_volume(nan)


def test_writes_never_destroy_inputs_or_existing_files(tmp_path):
    img = oblique_image()
    src = tmp_path / "img.nii.gz"
    sitk.WriteImage(img, str(src))
    arr, geom = sio.read_volume(src)
    before = src.read_bytes()
    with pytest.raises(ImageIOError, match="onto the input"):
        sio.write_mask(src, arr > 0, geom, overwrite=True, source_paths=[src])
    assert src.read_bytes() == before
    out = tmp_path / "m.nii.gz"
    sio.write_mask(out, arr > 0, geom)
    with pytest.raises(ImageIOError, match="already exists"):
        sio.write_mask(out, arr > 5, geom)
    sio.write_mask(out, arr > 5, geom, overwrite=True)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0, arr > 5)
    with pytest.raises(ImageIOError, match="does not match"):
        sio.write_mask(tmp_path / "x.nii.gz", np.zeros((2, 2, 2)), geom)
    with pytest.raises(ImageIOError, match="Unsupported output"):
        sio.write_mask(tmp_path / "x.png", arr > 0, geom)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind
    f = sio.write_volume(tmp_path / "p.nrrd", arr.astype(float) / 7, geom)
    assert sitk.ReadImage(str(f)).GetPixelID() == sitk.sitkFloat32


def test_radiological_view_of_the_sample_axial(sample_ct):
    from SAMSegmentLib import sample_data

    _, geom = sio.read_volume(sample_data.path(sample_data.IMAGE))
    vol, lab, names = sample_ct
    view, transposed = geom.radiological_view(0)
    assert not transposed
    k = 20
    spleen = view(lab[k] == names["spleen"])
    liver = view(lab[k] == names["liver"])
    spine = view(lab[k] == names["vertebrae_L1"]) if (lab[k] == names.get("vertebrae_L1", -1)).any() else None
    # the patient's left (spleen) is on the image right, the liver on the image left
    assert np.nonzero(spleen)[1].mean() > np.nonzero(liver)[1].mean()
    if spine is not None:
        # anterior up: the spine is in the lower half
        assert np.nonzero(spine)[0].mean() > spine.shape[0] / 2


def test_montage_png(tmp_path):
    tile = sio.overlay_tile(np.full((10, 20), 100, np.uint8), [(np.eye(10, 20, dtype=bool), (255, 0, 0))],
                            pixel_spacing=(2.0, 1.0), label="k=1")
    assert tile.shape[0] == tile.shape[1]  # 10 rows of 2 mm vs 20 columns of 1 mm: square in mm
    path = sio.save_montage_png(tmp_path / "m.png", [tile, tile, tile], ncols=2)
    from PIL import Image

    assert Image.open(path).size == (2 * tile.shape[1], 2 * tile.shape[0])


def test_png_montage_of_a_mask(tmp_path):
    """The montage renderer of the CLI and the demo lives here: one tile per slice (thinned out
    to max_tiles), existing files refused unless overwrite, a series UID refused for a file."""
    from PIL import Image

    from SAMSegmentLib.volume import get_slice

    vol = np.zeros((20, 12, 16), np.uint8)
    mask = np.zeros_like(vol)
    mask[:, 4:8, 5:9] = 1
    geom = sio.ImageGeometry.identity(vol.shape)
    path = sio.write_png_montage(tmp_path / "m.png", lambda ref: get_slice(vol, ref), mask, 0, list(range(20)), geom,
                                 max_tiles=8)
    tile = sio.overlay_tile(vol[0], [(mask[0] > 0, (255, 64, 64))], label="k=0")
    assert Image.open(path).size == (4 * tile.shape[1], 2 * tile.shape[0])  # 8 tiles, 4 per row
    with pytest.raises(ImageIOError, match="exists"):
        sio.write_png_montage(path, lambda ref: get_slice(vol, ref), mask, 0, [0], geom)
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "v.nrrd"))
    with pytest.raises(ImageIOError, match="DICOM folder"):
        sio.read_volume(tmp_path / "v.nrrd", series_uid="1.2.3")
