"""Bad files in, bad disks out (issue 14, the file classes of the bad-input campaign).

One test per case class of ``../shared/reviews/reliability/campaign.md``; the campaign's case IDs are
in the parameter ids and comments. No model is loaded: every case is decided before (or without)
the network.

- Verified writes (D1, O05*, O05c, C00): a writer that leaves a short or empty file and returns
  (SimpleITK on a full disk) or raises (PIL, torch) never replaces the old file and is reported as
  the project's error with a remedy; nothing is left behind.
- Inputs are never overwritten by ``--png`` (O02e, O02f, O03f); ``embed --overwrite`` deletes only
  files it can prove it wrote (C08b).
- Corrupt data is detected (I04, I04d, I10, I10b; C03, C03b, C05, C05b; X01, X01c).
- Geometry is never silently changed (I22, I21, I18b/c).
- OS errors are the project's errors (O04*, C09, C00, D02, I17d), and messages name the real cause
  without raw ITK text before them (I02, I04b, M02, M02c).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMSegmentLib import io as sio
from SAMSegmentLib.cache import CacheKey, CacheMismatchError, DiskTier, EmbeddingCache
from SAMSegmentLib.errors import CheckpointError, ImageIOError, SAMSegmentError, VolumeError
from SAMSegmentLib.files import WriteError

SHAPE = (5, 24, 30)  # (K, J, I)


def geometry(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)) -> sio.ImageGeometry:
    return sio.ImageGeometry((0.8, 0.9, 3.0), (12.5, -40.0, 7.25),
                             tuple(tuple(float(v) for v in direction[r * 3:r * 3 + 3]) for r in range(3)),
                             (SHAPE[2], SHAPE[1], SHAPE[0]))


def ct(dtype=np.int16) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(-1000, 1500, SHAPE).astype(dtype)


def write_image(path: Path, array: np.ndarray, geom: sio.ImageGeometry | None = None) -> Path:
    img = sitk.GetImageFromArray(array)
    (geom or geometry()).apply_to(img)
    sitk.WriteImage(img, str(path))
    return path


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files of atomic writes left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# =========================================================================== 1. verified writes
def _silent_short_writer(real, cut):
    """SimpleITK's WriteImage as it behaves on a full disk: the file ends short (or empty), no error."""

    def write(image, filename, *args, **kwargs):
        real(image, filename, *args, **kwargs)
        size = os.path.getsize(filename)
        with open(filename, "r+b") as f:
            f.truncate(int(size * cut))

    return write


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("cut", [0.0, 0.5], ids=["empty", "half"])  # O05/O05n/O05m (0 bytes), O05b (truncated .nii)
def test_a_short_image_write_never_replaces_the_old_file(tmp_path, monkeypatch, ext, cut):
    geom = geometry()
    mask = np.zeros(SHAPE, np.uint8)
    mask[:, 5:15, 6:20] = 1
    noise = np.random.default_rng(0).integers(0, 255, SHAPE).astype(np.uint8)  # incompressible: a long file
    out = sio.write_array(tmp_path / f"good{ext}", noise, geom)
    before = out.read_bytes()
    monkeypatch.setattr(sitk, "WriteImage", _silent_short_writer(sitk.WriteImage, cut))
    with pytest.raises(WriteError, match="Cannot write") as err:
        sio.write_array(out, mask, geom, overwrite=True)
    assert err.value.remedy and "disk" in err.value.remedy
    assert out.read_bytes() == before and leftovers(tmp_path) == []


def test_a_full_disk_keeps_the_old_file_real_writers(tmp_path):
    """The real writers (no mock): the file size limit of a child process (RLIMIT_FSIZE) makes every
    write past 4 KiB fail like a full disk (D1). SimpleITK reports nothing; the read-back does."""
    resource = pytest.importorskip("resource")
    del resource
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        from SAMSegmentLib import io as sio
        from SAMSegmentLib.files import WriteError
        geom = sio.ImageGeometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), (64, 48, 6))
        old = {{}}
        for ext in (".nii", ".nii.gz", ".nrrd", ".mha"):
            p = sio.write_mask(r"{tmp_path}/good" + ext, np.zeros((6, 48, 64), np.uint8), geom)
            old[ext] = open(p, "rb").read()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        noise = np.random.default_rng(1).integers(0, 255, (6, 48, 64)).astype(np.uint8)
        for ext in old:
            try:
                sio.write_array(r"{tmp_path}/good" + ext, noise, geom, overwrite=True)
                print(ext, "WRITTEN")
            except WriteError as exc:
                print(ext, "REFUSED", open(r"{tmp_path}/good" + ext, "rb").read() == old[ext])
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert sorted(run.stdout.split("\n")[:-1]) == [f"{ext} REFUSED True" for ext in (".mha", ".nii", ".nii.gz", ".nrrd")]
    assert "NWAD" not in run.stderr and "ERROR" not in run.stderr  # no raw NIfTI/ITK messages
    assert leftovers(tmp_path) == []


def test_png_write_is_verified_and_atomic(tmp_path, monkeypatch):
    """O05c: the PNG was written in place (a full disk left a truncated file) and its OSError escaped."""
    from PIL import Image

    tile = sio.overlay_tile(np.full((10, 20), 100, np.uint8), [])
    good = sio.save_montage_png(tmp_path / "o.png", [tile])
    before = good.read_bytes()
    real_save = Image.Image.save

    def short_save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as f:
            f.truncate(100)

    monkeypatch.setattr(Image.Image, "save", short_save)
    with pytest.raises(WriteError, match="does not read back"):
        sio.save_montage_png(good, [tile, tile])
    assert good.read_bytes() == before

    def full_disk(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 4000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(WriteError, match="No space left on device") as err:
        sio.save_montage_png(good, [tile, tile])
    assert "disk is full" in err.value.remedy
    assert good.read_bytes() == before and leftovers(tmp_path) == []


def test_samaug_channel_write_failure_leaves_no_marker(tmp_path, monkeypatch):
    from SAMSegmentLib import samaug

    vol = ct()
    calls = []
    real = sitk.WriteImage

    def second_write_short(image, filename, *args, **kwargs):
        calls.append(filename)
        real(image, filename, *args, **kwargs)
        if len(calls) == 2:
            with open(filename, "r+b") as f:
                f.truncate(0)

    monkeypatch.setattr(sitk, "WriteImage", second_write_short)
    with pytest.raises(WriteError):
        samaug.write_samaug(tmp_path / "out", "case1", vol, np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32),
                            geometry())
    assert not samaug.marker_path(tmp_path / "out", "case1").exists()
    assert not samaug.is_finished(tmp_path / "out", "case1")


# --------------------------------------------------------------------------- embedding disk tier
def key(i: int, sig: str = "vol") -> CacheKey:
    return CacheKey(sig, 0, i, "litemedsam", "prep")


def emb(seed: int) -> torch.Tensor:
    return torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(seed))


def bound_cache(folder: Path, sig: str = "vol") -> EmbeddingCache:
    cache = EmbeddingCache(budget_bytes=8 << 21, disk_dir=folder)
    cache.disk.bind(sig, "litemedsam", "prep")
    return cache


def test_embedding_write_failures_are_reported_and_leave_nothing(tmp_path, monkeypatch):
    """C00: a full disk during embed gave torch's "enforce fail" traceback and a stale temp file."""
    cache = bound_cache(tmp_path / "c")
    cache.put(key(1), emb(1))
    before = (tmp_path / "c" / "axis0_00001.pt").read_bytes()

    def enforce_fail(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 960 vs 854")

    monkeypatch.setattr(torch, "save", enforce_fail)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(WriteError, match="No space left on device") as err:
        cache.put(key(1), emb(2))
    assert "disk" in err.value.remedy
    assert (tmp_path / "c" / "axis0_00001.pt").read_bytes() == before and leftovers(tmp_path / "c") == []


def test_embedding_write_is_read_back(tmp_path, monkeypatch):
    cache = bound_cache(tmp_path / "c")
    real = torch.save

    def short_save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)

    monkeypatch.setattr(torch, "save", short_save)
    with pytest.raises(WriteError, match="incomplete"):
        cache.put(key(3), emb(3))
    assert not (tmp_path / "c" / "axis0_00003.pt").exists() and leftovers(tmp_path / "c") == []


def _flip_bits(data: bytes, count: int, seed: int = 0) -> bytes:
    b = bytearray(data)
    rng = np.random.default_rng(seed)
    for i in rng.choice(np.arange(1000, len(b) - 1000), count, replace=False):
        b[i] ^= 0x40
    return bytes(b)


def _splice_tensor(into: Path, source: Path, tensor_into: torch.Tensor, tensor_source: torch.Tensor) -> None:
    """C05b: the tensor bytes of ``source`` written over those of ``into`` (same offsets); meta kept."""
    raw_into, raw_src = into.read_bytes(), source.read_bytes()
    a = tensor_into.half().numpy().tobytes()
    b = tensor_source.half().numpy().tobytes()
    at = raw_into.find(a)
    assert at > 0 and raw_src.find(b) > 0
    into.write_bytes(raw_into[:at] + b + raw_into[at + len(a):])


@pytest.mark.parametrize("damage", ["xor_200k", "bitflip_20k", "other_slice_file", "spliced_tensor", "truncated",
                                    "garbage", "no_hash_old_format"])
def test_a_damaged_embedding_is_encoded_again_never_used(tmp_path, caplog, damage):
    """C03 (XOR), C03b (bit flips), C05 (another slice's file), C05b (another tensor under this
    slice's meta), C04 (truncated): never used, and not fatal (a miss; the slice is re-encoded)."""
    folder = tmp_path / "c"
    cache = bound_cache(folder)
    cache.put(key(2), emb(2))
    cache.put(key(3), emb(3))
    f2, f3 = folder / "axis0_00002.pt", folder / "axis0_00003.pt"
    if damage == "xor_200k":
        raw = bytearray(f2.read_bytes())
        raw[1000:201000] = bytes(v ^ 0xFF for v in raw[1000:201000])
        f2.write_bytes(bytes(raw))
    elif damage == "bitflip_20k":
        f2.write_bytes(_flip_bits(f2.read_bytes(), 20000))
    elif damage == "other_slice_file":
        f2.write_bytes(f3.read_bytes())
    elif damage == "spliced_tensor":
        _splice_tensor(f2, f3, emb(2), emb(3))
    elif damage == "truncated":
        f2.write_bytes(f2.read_bytes()[:1_000_000])
    elif damage == "garbage":
        f2.write_bytes(b"garbage")
    else:  # a file of an earlier version, without a content hash
        record = torch.load(f2, weights_only=True)
        torch.save({"meta": record["meta"], "embedding": record["embedding"]}, f2)
    fresh = bound_cache(folder)
    with caplog.at_level(logging.WARNING, logger="SAMSegmentLib.cache"):
        assert fresh.get(key(2)) is None  # a miss: the caller encodes the slice again
        assert fresh.get(key(2)) is None  # asked again before it is rewritten: said once, not read again
    assert caplog.text.count("encoding that slice again") == 1 and fresh.disk.rejected == 1
    assert torch.allclose(fresh.get(key(3)), emb(3), atol=2e-3, rtol=1e-3)  # the intact neighbour is used
    fresh.put(key(2), emb(2))  # the re-encoded slice replaces the damaged file
    assert torch.allclose(bound_cache(folder).get(key(2)), emb(2), atol=2e-3, rtol=1e-3)


# --------------------------------------------------------------------------- ONNX cache
@pytest.fixture
def tiny_recipe():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from SAMSegmentLib import onnx_cache

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()

    recipe = onnx_cache.GraphRecipe(build, [torch.randn(3, 16, generator=torch.Generator().manual_seed(1))],
                                    ["x"], ["y"])
    signature = onnx_cache.export_signature("tiny", "tiny", 16, "encoder", "ab" * 32)
    return onnx_cache, recipe, signature


@pytest.mark.parametrize("damage", ["sign_flip_still_parses", "low_bits_still_parses", "replaced_by_other_graph"])
def test_a_changed_onnx_graph_is_exported_again(tmp_path, caplog, tiny_recipe, damage):
    """X01c (sign bits of an initializer), X01 (low bits), X03 (another valid graph): the protobuf
    still parses, so only the file hash recorded in the signature can tell."""
    import onnx

    onnx_cache, recipe, signature = tiny_recipe
    first = onnx_cache.load_or_export("encoder", signature, tmp_path, recipe)
    assert first.exported
    again = onnx_cache.load_or_export("encoder", signature, tmp_path, recipe)
    assert not again.exported  # an intact graph is reused
    path = first.path
    raw = path.read_bytes()
    model = onnx.load_from_string(raw)
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    at = raw.find(weight.raw_data)
    damaged = bytearray(raw)
    if damage == "sign_flip_still_parses":
        for i in range(at + 3, at + len(weight.raw_data) // 4, 4):
            damaged[i] ^= 0x80
    elif damage == "low_bits_still_parses":
        for i in range(at, at + len(weight.raw_data), 4):
            damaged[i] ^= 0x01
    else:
        other = onnx.load_from_string(raw)
        other.graph.initializer[0].raw_data = bytes(len(other.graph.initializer[0].raw_data))
        damaged = bytearray(other.SerializeToString())
    path.write_bytes(bytes(damaged))
    onnx.load_from_string(bytes(damaged))  # still a valid graph
    with caplog.at_level(logging.WARNING, logger="SAMSegmentLib.onnx_cache"):
        third = onnx_cache.load_or_export("encoder", signature, tmp_path, recipe)
    assert third.exported and "exporting it again" in caplog.text
    assert path.read_bytes() == raw  # the export is deterministic: the good graph is back
    stored = json.loads((path.parent / onnx_cache.SIGNATURE_FILE).read_text())
    assert onnx_cache.signature_hash(stored) in path.parent.name and "model.onnx" in stored["files"]


# =========================================================================== 2. inputs never overwritten
def test_png_never_replaces_an_input_or_a_non_png(tmp_path):
    """O02f (a 3D TIFF input given as --png was replaced by the montage), O02e (an input .nii.gz:
    PIL's traceback), O03f (a PNG written into the input DICOM folder)."""
    from SAMSegmentLib.volume import get_slice

    vol = ct(np.uint8)
    tif = tmp_path / "stack.tif"
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tif))
    nii = write_image(tmp_path / "input.nii.gz", ct())
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    before = {p: p.read_bytes() for p in (tif, nii)}
    mask = np.zeros(SHAPE, np.uint8)
    geom = geometry()

    def draw(path, sources=()):
        return sio.write_png_montage(path, lambda ref: get_slice(vol, ref), mask, 0, [2], geom, overwrite=True,
                                     source_paths=sources)

    with pytest.raises(ImageIOError, match="not a .png"):
        draw(tif)
    with pytest.raises(ImageIOError, match="not a .png"):
        draw(nii, [nii])
    with pytest.raises(ImageIOError, match="onto the input"):
        draw(dicom / "overlay.png", [dicom])
    disguised = tmp_path / "scan.png"  # an existing file named .png that is not a PNG picture
    disguised.write_bytes(tif.read_bytes())
    with pytest.raises(ImageIOError, match="not a PNG picture"):
        draw(disguised)
    with pytest.raises(ImageIOError, match="onto the input"):
        draw(disguised, [disguised])
    assert {p: p.read_bytes() for p in (tif, nii)} == before and disguised.read_bytes() == tif.read_bytes()
    assert not (dicom / "overlay.png").exists()
    ok = draw(tmp_path / "overlay.png")
    assert draw(ok) == ok  # an existing PNG overlay may be replaced with overwrite


def test_embed_overwrite_deletes_only_its_own_files(tmp_path):
    """C08b: --overwrite on a folder with the user's manifest.json deleted axis*_*.pt files and
    replaced the manifest. Now a folder that is not a cache is never emptied, and rebuilding a
    real cache deletes only the embedding files it holds."""
    user = tmp_path / "proj_folder"
    user.mkdir()
    (user / "manifest.json").write_text('{"name": "my dataset"}')
    (user / "axis1_notes.pt").write_text("mine")
    (user / "axis0_00001.pt").write_text("mine too")
    with pytest.raises(CacheMismatchError, match="not an embedding cache"):
        DiskTier(user).bind("vol", "litemedsam", "prep", overwrite=True)
    assert sorted(p.name for p in user.iterdir()) == ["axis0_00001.pt", "axis1_notes.pt", "manifest.json"]
    assert (user / "manifest.json").read_text() == '{"name": "my dataset"}'

    cache_dir = tmp_path / "cache"
    old = bound_cache(cache_dir, "vol-a")
    old.put(key(1, "vol-a"), emb(1))
    old.put(key(2, "vol-a"), emb(2))
    (cache_dir / "axis0_00009.pt").write_bytes(b"a file the cache did not write")
    (cache_dir / "notes.txt").write_text("mine")
    with pytest.raises(CacheMismatchError, match="different volume_signature"):
        bound_cache(cache_dir, "vol-b")  # rebinding to another volume needs overwrite
    DiskTier(cache_dir).bind("vol-b", "litemedsam", "prep", overwrite=True)
    assert sorted(p.name for p in cache_dir.iterdir()) == ["axis0_00009.pt", "manifest.json", "notes.txt"]


def test_rebinding_needs_overwrite_and_says_how(tmp_path):
    bound_cache(tmp_path / "c", "vol-a")
    with pytest.raises(CacheMismatchError, match="different volume_signature") as err:
        DiskTier(tmp_path / "c").bind("vol-b", "litemedsam", "prep")
    assert "--overwrite" in err.value.remedy


# =========================================================================== 3. corrupt inputs
def _nifti(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    return write_image(tmp_path / name, array)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_nifti_is_refused(tmp_path, ext, keep):
    """I04 (.nii.gz), I04d (.nii): read without an error, the missing voxels as 0."""
    path = _nifti(tmp_path, f"full{ext}", ct())
    raw = path.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(raw[:int(len(raw) * keep)])
    with pytest.raises(ImageIOError, match="truncated"):
        sio.read_volume(cut)


def test_damaged_gzip_nifti_is_refused(tmp_path):
    path = _nifti(tmp_path, "full.nii.gz", ct())
    raw = bytearray(path.read_bytes())
    raw[-6] ^= 0xFF  # the CRC/length trailer
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ImageIOError, match="corrupt"):
        sio.read_volume(bad)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_nifti_voxels_are_refused(tmp_path, ext, value, dtype):
    """I10, I10b: SimpleITK reads NaN and Inf from NIfTI as 0, so the NaN check never fired."""
    a = ct().astype(dtype)
    a[2, 10, 11] = value
    path = _nifti(tmp_path, f"x{ext}", a)
    with pytest.raises(VolumeError, match="1 NaN or infinite voxel"):
        sio.read_volume(path)
    a[2, 10, 11] = 0
    arr, _ = sio.read_volume(_nifti(tmp_path, f"ok{ext}", a))  # the same file without it is fine
    assert arr.dtype == dtype


# =========================================================================== 4. geometry
def test_sheared_grid_is_never_written_as_nifti(tmp_path):
    """I22: ITK's NIfTI writer made the direction orthogonal, so the mask no longer lay on the image."""
    sheared = tmp_path / "sheared.nrrd"
    write_image(tmp_path / "plain.nrrd", ct())
    text = (tmp_path / "plain.nrrd").read_bytes()
    head, sep, body = text.partition(b"\n\n")
    lines = [b"space directions: (-0.8,0,0) (0.45,-0.9,0) (0,0,3)" if line.startswith(b"space directions") else line
             for line in head.split(b"\n")]
    sheared.write_bytes(b"\n".join(lines) + sep + body)
    arr, geom = sio.read_volume(sheared)
    assert not np.allclose(np.asarray(geom.direction).T @ np.asarray(geom.direction), np.eye(3), atol=1e-3)
    for ext in (".nii.gz", ".nii"):
        with pytest.raises(ImageIOError, match="not perpendicular.*NIfTI") as err:
            sio.write_mask(tmp_path / f"mask{ext}", arr > 0, geom, source_paths=[sheared])
        assert ".nrrd" in err.value.remedy and not (tmp_path / f"mask{ext}").exists()
    for ext in (".nrrd", ".mha"):  # these formats keep the grid exactly
        back = sitk.ReadImage(str(sio.write_mask(tmp_path / f"mask{ext}", arr > 0, geom, source_paths=[sheared])))
        assert np.allclose(back.GetDirection(), np.ravel(geom.direction), atol=1e-6)


def write_series(folder: Path, uid: str, positions_mm, description="test", shift_per_slice=(0.0, 0.0)) -> None:
    """A DICOM series of 24x30 slices at the given z positions (optionally shifted in-plane: gantry tilt)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for n, z in enumerate(positions_mm):
        sl = sitk.GetImageFromArray(ct()[0])
        sl.SetSpacing((0.8, 0.9))
        pos = (12.5 + shift_per_slice[0] * n, -40.0 + shift_per_slice[1] * n, float(z))
        for tag, value in [("0008|0060", "CT"), ("0020|000e", uid), ("0020|000d", uid + ".1"), ("0008|103e", description),
                           ("0020|0013", str(n + 1)), ("0020|0032", "\\".join(map(str, pos))),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|1053", "1"), ("0028|1052", "0")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid[-3:]}_{n:03d}.dcm"))
        writer.Execute(sl)


UID_A, UID_B = "1.2.826.0.1.3680043.2.1125.9.101", "1.2.826.0.1.3680043.2.1125.9.102"


@pytest.mark.parametrize("positions, shift, reason", [
    ([0, 3, 9, 12], (0, 0), "non-uniform slice spacing"),  # I21: one slice missing
    ([0, 3, 6.5, 9, 12], (0, 0), "non-uniform slice spacing"),  # irregular
    ([0, 3, 3, 6, 9], (0, 0), "same position"),  # a duplicate
    ([0, 3, 6, 9, 12], (0.0, 1.5), "sheared"),  # gantry tilt
], ids=["missing_slice", "irregular", "duplicate", "gantry_tilt"])
def test_dicom_series_off_a_regular_grid_is_refused(tmp_path, caplog, positions, shift, reason):
    write_series(tmp_path / "s", UID_A, positions, shift_per_slice=shift)
    with pytest.raises(ImageIOError, match=reason):
        sio.read_volume(tmp_path / "s")


def test_regular_dicom_series_is_read(tmp_path):
    write_series(tmp_path / "s", UID_A, [0, 3, 6, 9, 12])
    arr, geom = sio.read_volume(tmp_path / "s")
    assert arr.shape == SHAPE and np.allclose(geom.spacing, (0.8, 0.9, 3.0))


def test_mixed_dicom_folder_choice_is_deterministic_and_listed(tmp_path, caplog):
    """I18b/I18c: the series are listed (UID, files, description) and a tie goes to the lowest UID."""
    write_series(tmp_path / "mixed", UID_B, [0, 3, 6, 9, 12], "series B")
    write_series(tmp_path / "mixed", UID_A, [0, 3, 6, 9, 12], "series A")
    with caplog.at_level(logging.WARNING, logger="SAMSegmentLib.io"):
        arr, _ = sio.read_volume(tmp_path / "mixed")
    text = caplog.text
    assert f"{UID_A} (5 files, CT series A)" in text and f"{UID_B} (5 files, CT series B)" in text
    assert f"Using {UID_A} (the lowest UID of those with the most files)" in text and "--series-uid" in text
    arr_b, _ = sio.read_volume(tmp_path / "mixed", series_uid=UID_B)
    assert arr_b.shape == arr.shape


# =========================================================================== 5. OS errors, messages
@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES, errno.ENOSPC], ids=["read_only", "permission", "full"])
def test_os_errors_on_outputs_are_the_projects_errors(tmp_path, monkeypatch, err):
    """O04, O04c, O04d: OSError / PermissionError tracebacks from mkstemp (only SimpleITK's
    RuntimeError was caught)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(err, os.strerror(err), kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(WriteError, match=os.strerror(err).split()[0]) as exc:
        sio.write_mask(tmp_path / "m.nii.gz", np.zeros(SHAPE, np.uint8), geometry())
    assert exc.value.remedy
    with pytest.raises(WriteError):
        sio.save_montage_png(tmp_path / "o.png", [np.zeros((4, 4, 3), np.uint8)])


def test_a_file_in_the_way_of_the_output_folder(tmp_path):
    """O04b-like: mkdir of the output's folder failed with a raw OSError."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SAMSegmentError, match="not a folder|Cannot"):
        sio.write_mask(blocker / "sub" / "m.nii.gz", np.zeros(SHAPE, np.uint8), geometry())
    with pytest.raises(SAMSegmentError):
        sio.write_png_montage(blocker / "o.png", lambda ref: np.zeros((24, 30), np.uint8), np.zeros(SHAPE), 0, [0],
                              geometry())


def test_cache_dir_that_is_a_file(tmp_path):
    """C09: NotADirectoryError traceback."""
    f = tmp_path / "ct.nii.gz"
    f.write_text("x")
    with pytest.raises(CacheMismatchError, match="is a file"):
        DiskTier(f).bind("vol", "litemedsam", "prep")


def test_overlay_of_an_absurd_spacing(tmp_path):
    """I17d: spacing 1e300 made PIL's resize raise OverflowError (after the mask was written)."""
    for spacing in [(1e300, 3.0), (3.0, 1e-300), (1.0, 1000.0)]:
        tile = sio.overlay_tile(np.full((101, 122), 50, np.uint8), [], pixel_spacing=spacing)
        assert max(tile.shape[:2]) <= sio.MAX_TILE_SIDE and min(tile.shape[:2]) >= 1


def test_demo_out_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    """D02: FileExistsError traceback."""
    from SAMSegmentLib import demo
    from SAMSegmentLib.backends import SamBackend

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(SamBackend, "from_model_id", no_model)
    f = tmp_path / "existing.nii.gz"
    f.write_text("x")
    with pytest.raises(ImageIOError, match="is a file") as err:
        demo.run_demo(f)
    assert "folder" in err.value.remedy and f.read_text() == "x"


def test_truncated_mha_message_names_the_cause_without_raw_output(tmp_path, capfd):
    """I04b: MetaIO printed "M_ReadElementsData: data not read completely" on stdout and the error
    said "Reason: No such file or directory"."""
    good = write_image(tmp_path / "good.mha", ct())
    cut = tmp_path / "cut.mha"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    capfd.readouterr()
    with pytest.raises(ImageIOError, match="truncated") as err:
        sio.read_volume(cut)
    assert "No such file" not in str(err.value)
    out, errtext = capfd.readouterr()
    assert "M_ReadElementsData" not in out + errtext and "ideal" not in out + errtext


def test_non_dicom_folder_has_no_raw_itk_warnings(tmp_path, capfd):
    """I02: two raw ITK "WARNING: In .../itkGDCMSeriesFileNames.cxx" lines before the error."""
    (tmp_path / "notes.txt").write_text("not DICOM")
    capfd.readouterr()
    with pytest.raises(ImageIOError, match="No DICOM series"):
        sio.read_volume(tmp_path)
    out, errtext = capfd.readouterr()
    assert "WARNING" not in out + errtext


def test_missing_dicom_slice_has_no_raw_itk_warning(tmp_path, capfd):
    write_series(tmp_path / "s", UID_A, [0, 3, 9, 12])
    capfd.readouterr()
    with pytest.raises(ImageIOError):
        sio.read_volume(tmp_path / "s")
    out, errtext = capfd.readouterr()
    assert "Non uniform sampling" not in out + errtext


def test_checkpoint_messages_name_the_real_cause(tmp_path):
    """M02: random bytes were reported as "Python objects other than tensors"; M02c: a folder as
    "does not exist"."""
    from SAMSegmentLib.model_build import load_state_dict
    from SAMSegmentLib.model_registry import get_spec, resolve_weights

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(3).integers(0, 255, 5000).astype(np.uint8).tobytes().replace(b"\x80", b"\x81"))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint: it is neither a zip archive nor a pickle"):
        load_state_dict(garbage)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        resolve_weights(get_spec("sam_vit_b"), tmp_path / "ckpt")


def test_weights_digest_survives_an_unwritable_memo(tmp_path, monkeypatch):
    """X04 (read-only HOME): remembering a checkpoint's digest is optional; its WriteError is not fatal."""
    import hashlib

    from SAMSegmentLib import onnx_cache

    def refuse(*args, **kwargs):
        raise WriteError("Cannot write the memo: Read-only file system", "choose a writable folder")

    monkeypatch.setattr(onnx_cache, "atomic_write_text", refuse)
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights")
    assert onnx_cache.weights_digest(ckpt, tmp_path / "c") == hashlib.sha256(b"weights").hexdigest()


def test_itk_errors_are_named_in_full(tmp_path):
    """I17c: a singular direction matrix was reported as "(0 0 1)", the last line of ITK's message."""
    good = write_image(tmp_path / "good.mha", ct())
    text = good.read_bytes()
    head, sep, body = text.partition(b"ElementDataFile")
    lines = [b"TransformMatrix = 1 0 0 1 0 0 0 0 1" if line.startswith(b"TransformMatrix") else line
             for line in head.split(b"\n")]
    bad = tmp_path / "singular.mha"
    bad.write_bytes(b"\n".join(lines) + sep + body)
    with pytest.raises(ImageIOError, match="determinant is 0"):
        sio.read_volume(bad)


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES], ids=["read_only", "permission"])
def test_unwritable_output_folders_are_refused_up_front(tmp_path, monkeypatch, err):
    """O04, O04c, O04d: the whole segmentation ran before the write failed; the checks the CLI runs
    before any work now find a folder that cannot be written."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(WriteError, match=os.strerror(err)) as exc:
        sio.check_output_path(tmp_path / "m.nii.gz", geometry=geometry())
    assert "choose" in exc.value.remedy
    with pytest.raises(WriteError, match=os.strerror(err)):
        sio.check_png_path(tmp_path / "o.png")
