"""SAMAug priors and the resumable batch command.

The prior maps are checked against their definitions on regions with known masks, then on the
real model's regions; the batch command against interruption: finished cases are skipped, a case
without its completion marker (killed half-way) is redone.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from phantoms import disks_ct
from SAMSegmentLib.automatic import Region
from SAMSegmentLib.samaug import (case_name, is_finished, marker_path, outer_boundary, output_paths,
                                  priors_from_regions, samaug_maps)
from SAMSegmentLib.volume import SliceRef

TINY = ["--grid", "3", "--box-scales", "0.3"]  # 9 boxes per slice: the batch tests test files, not quality


def _square(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_outer_boundary_is_the_ring_just_outside():
    m = _square((9, 9), 3, 6, 3, 6)
    ring = outer_boundary(m)
    assert not (ring & m).any()
    assert ring.sum() == 12  # 4-neighbours of a 3x3 square: 3 per side
    assert ring[2, 3:6].all() and not ring[2, 2]  # no corners (4-connectivity)


def test_priors_from_known_regions():
    shape = (20, 20)
    a = _square(shape, 2, 8, 2, 8)
    b = _square(shape, 10, 18, 10, 18)
    c = _square(shape, 12, 15, 12, 15)  # inside b
    regions = [Region(a, 0.9, 0.5, np.zeros(2)), Region(b, 0.9, 0.75, np.zeros(2)), Region(c, 0.9, 1.0, np.zeros(2))]
    seg, bnd = priors_from_regions(regions, shape)
    assert seg.dtype == bnd.dtype == np.float32
    assert np.allclose(seg[a], 0.5) and np.allclose(seg[b & ~c], 0.75) and np.allclose(seg[c], 1.75)
    assert (seg[~(a | b)] == 0).all()
    expected = outer_boundary(a) | outer_boundary(b) | outer_boundary(c)
    assert np.array_equal(bnd > 0, expected) and set(np.unique(bnd)) <= {0.0, 1.0}
    assert not (bnd[a] > 0).any() and not (bnd[b & ~outer_boundary(c)] > 0).any()


@pytest.mark.slow  # everything mode on the disks (shared fixture)
def test_samaug_maps_of_real_regions(disks_everything):
    s, _, masks, regions = disks_everything
    seg, bnd = samaug_maps(s, SliceRef(0, 0), regions=regions)
    assert regions
    union = np.any([r.mask for r in regions], axis=0)
    assert np.array_equal(seg > 0, union)  # non-zero exactly where masks are
    boundary = np.any([outer_boundary(r.mask) for r in regions], axis=0)
    assert np.array_equal(bnd > 0, boundary)  # non-zero exactly on the masks' outer boundaries
    for disk in masks:  # the disks are found: the prior is high at their centres, the boundary rings them
        assert seg[disk].mean() > 0.7
        ring = outer_boundary(disk)
        assert (bnd[ring] > 0).mean() > 0.6


def _write(path, array, spacing=(0.8, 0.7, 2.5), origin=(10.0, -20.0, 5.0)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(path))
    return img


@pytest.mark.slow  # everything mode on sample-CT slices
def test_batch_command_writes_channels_and_resumes(tmp_path, sample_ct, capsys):
    from SAMSegmentLib.cli import main

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    disks, _ = disks_ct(shape=(1, 64, 64), disks=((20.0, 20.0, 7.0), (44.0, 40.0, 8.0)))
    ct = sample_ct[0][12:13, 20:84, 30:94]  # one real CT slice, cropped
    ref_img = _write(src / "disks.nii.gz", disks)
    _write(src / "ct.nrrd", np.ascontiguousarray(ct))
    (src / "notes.txt").write_text("not an image")
    args = ["samaug", str(src), "--out", str(out), *TINY]
    assert main(args) == 0
    assert "2 case(s) written, 0 already finished" in capsys.readouterr().out
    for case in ("disks", "ct"):
        assert is_finished(out, case)
        info = json.loads(marker_path(out, case).read_text())
        assert info["case"] == case and len(info["files"]) == 3
    paths = output_paths(out, "disks")
    imgs = [sitk.ReadImage(str(p)) for p in paths]
    for img in imgs:  # every channel has the input's grid
        assert img.GetSize() == ref_img.GetSize() and np.allclose(img.GetSpacing(), ref_img.GetSpacing())
        assert np.allclose(img.GetOrigin(), ref_img.GetOrigin())
        assert np.allclose(img.GetDirection(), ref_img.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(imgs[0]), disks)  # channel 0: the intensities, unchanged
    seg, bnd = (sitk.GetArrayFromImage(i) for i in imgs[1:])
    assert set(np.unique(bnd)) <= {0.0, 1.0} and seg.min() >= 0

    # a second run skips both finished cases and leaves their files untouched
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(args) == 0
    assert "0 case(s) written, 2 already finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # killed half-way through "ct": its marker was never written and one channel is garbage
    marker_path(out, "ct").unlink()
    output_paths(out, "ct")[2].write_bytes(b"truncated")
    assert not is_finished(out, "ct")
    assert main(args) == 0
    assert "1 case(s) written, 1 already finished" in capsys.readouterr().out
    assert is_finished(out, "ct")
    fixed = sitk.ReadImage(str(output_paths(out, "ct")[2]))
    assert fixed.GetSize() == (64, 64, 1)
    assert output_paths(out, "disks")[0].stat().st_mtime_ns == stamps[output_paths(out, "disks")[0]]
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary files left behind


def test_batch_refuses_writing_into_the_input_folder(tmp_path, capsys):
    from SAMSegmentLib.cli import main

    _write(tmp_path / "a.nii.gz", np.zeros((1, 8, 8), np.int16))
    assert main(["samaug", str(tmp_path), "--out", str(tmp_path), *TINY]) == 2
    assert "input folder" in capsys.readouterr().err
    assert case_name("x/case_01.nii.gz") == "case_01" and case_name("y.mha") == "y"
