"""Everything mode: grids, stability, mask NMS, decoder paths, regions and label volumes.

The model tests use the real LiteMedSAM on a small phantom with a small grid (5 x 5 boxes of one
scale, plus the refinement pass), so each everything call costs a few seconds on two cores.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from SAMSegmentLib.automatic import (EverythingParams, Region, _link, everything_slice, everything_volume,
                                     grid_boxes, grid_points, label_volume_from_regions, mask_nms, regions_to_labels,
                                     stability_scores)
from SAMSegmentLib.errors import CancelledError
from SAMSegmentLib.metrics import iou
from SAMSegmentLib.volume import SliceRef

SMALL = EverythingParams(points_per_side=5, box_scales=(0.25,))


@pytest.fixture(scope="module")
def disks(disks_everything):
    return disks_everything[1], disks_everything[2]


@pytest.fixture(scope="module")
def disk_session(disks_everything):
    return disks_everything[0]


@pytest.fixture(scope="module")
def disk_regions(disks_everything):
    return disks_everything[3]


# ------------------------------------------------------------------------------------------ no model
def test_grid_points_are_sams_cell_centres():
    from segment_anything.utils.amg import build_point_grid

    pts = grid_points(40, 60, 4)
    expected = build_point_grid(4) * np.array([60, 40]) - 0.5  # SAM scales by (w, h); we use pixel centres
    assert np.allclose(pts, expected)
    boxes = grid_boxes(40, 60, 4, (0.5, 0.1))
    assert boxes.shape == (32, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 59).all() and (boxes[:, 3] <= 39).all()
    assert np.allclose(boxes[16:, 2] - boxes[16:, 0], 6.0)  # 0.1 * 60, fully inside


def test_stability_score_known_values():
    logits = torch.zeros(2, 10, 10)
    logits[0, :, :5] = 10.0  # a sharp mask: thresholds +-1 give the same 50 pixels
    logits[0, :, 5:] = -10.0
    logits[1] = torch.linspace(-5, 5, 10).repeat(10, 1)  # a ramp: > 1 on 4 columns, > -1 on 6
    s = stability_scores(logits, offset=1.0)
    assert s[0] == pytest.approx(1.0)
    assert s[1] == pytest.approx(4 / 6)


def test_mask_nms_removes_duplicates_but_keeps_nested_regions():
    big = torch.zeros(20, 20, dtype=torch.bool)
    big[2:18, 2:18] = True
    dup = big.clone()
    dup[2, 2:6] = False  # almost the same mask
    small = torch.zeros(20, 20, dtype=torch.bool)
    small[8:11, 8:11] = True  # inside big, IoU 9/256
    keep = mask_nms(torch.stack([dup, big, small]), torch.tensor([0.8, 0.9, 0.7]), 0.7)
    assert keep == [1, 2]


def test_link_follows_overlap_one_to_one():
    prev = np.zeros((10, 10), np.int32)
    prev[1:5, 1:5] = 7
    prev[6:9, 6:9] = 3
    cur = np.zeros((10, 10), np.int32)
    cur[1:5, 2:6] = 1  # overlaps label 7 (IoU 12/20)
    cur[6:9, 0:3] = 2  # overlaps nothing: new label
    out, nxt = _link(prev, cur, next_label=8, min_iou=0.5)
    assert set(np.unique(out[1:5, 2:6])) == {7}
    assert set(np.unique(out[6:9, 0:3])) == {8} and nxt == 9


def test_regions_to_labels_keeps_small_regions_on_top():
    big = np.zeros((8, 8), bool)
    big[1:7, 1:7] = True
    small = np.zeros((8, 8), bool)
    small[3:5, 3:5] = True
    labels = regions_to_labels([Region(small, 0.9, 0.9, np.zeros(2), 2), Region(big, 0.9, 0.9, np.zeros(2), 1)],
                               (8, 8))
    assert (labels[small] == 2).all() and (labels[big & ~small] == 1).all() and (labels[~big] == 0).all()


# ------------------------------------------------------------------------------------------ model
@pytest.mark.slow  # everything mode
def test_grid_decodes_go_through_the_backend_only(disk_session, monkeypatch):
    """Everything mode decodes through ``SamBackend.decode_batch`` (never the network's modules),
    with the path and batch size of its parameters."""
    backend = disk_session.backend
    calls = []
    original = backend.decode_batch

    def spy(*args, **kwargs):
        calls.append((kwargs.get("path"), kwargs.get("eager_batch"), kwargs.get("features_key")))
        return original(*args, **kwargs)

    class Forbidden(torch.nn.Module):
        def forward(self, *args, **kwargs):
            pytest.fail("a SAM module was called outside SamBackend")

    monkeypatch.setattr(backend, "decode_batch", spy)
    for name in ("prompt_encoder", "mask_decoder"):  # (monkeypatch.setattr cannot restore a submodule)
        monkeypatch.setitem(backend.net._modules, name, Forbidden())
    monkeypatch.setattr(backend, "_decode_eager", lambda *a, **k: pytest.fail("eager path not asked for"))
    monkeypatch.setattr(backend, "_graph", lambda part: object())
    monkeypatch.setattr(backend, "_decode_onnx", lambda graph, emb, p, multimask, key: (
        torch.zeros(p.size, 1, 256, 256), torch.zeros(p.size, 1)))
    assert everything_slice(disk_session, SliceRef(0, 0), replace(SMALL, decoder="loop", batch_size=7)) == []
    assert calls and {c[:2] for c in calls} == {("onnx", 7)}
    assert len({id(c[2]) for c in calls}) == 1  # one features key for the whole slice


@pytest.mark.slow  # everything mode
def test_everything_finds_each_separate_disk(disk_regions, disks):
    _, masks = disks
    assert disk_regions, "no region found"
    matched = set()
    for disk in masks:
        best = max(range(len(disk_regions)), key=lambda i: iou(disk_regions[i].mask, disk))
        assert iou(disk_regions[best].mask, disk) > 0.85
        matched.add(best)
    assert len(matched) == len(masks)  # one region per disk, not one region for all
    for r in disk_regions:
        assert r.mask.shape == (96, 96) and r.mask.dtype == bool
        assert 0.0 <= r.stability <= 1.0 and r.area > 0
    areas = [r.area for r in disk_regions]
    assert areas == sorted(areas, reverse=True) and [r.label for r in disk_regions] == list(range(1, len(areas) + 1))
    # no duplicates survive NMS
    for i in range(len(disk_regions)):
        for j in range(i + 1, len(disk_regions)):
            assert iou(disk_regions[i].mask, disk_regions[j].mask) <= SMALL.nms_iou + 1e-6


@pytest.mark.slow  # everything mode
def test_kept_regions_pass_the_quality_and_stability_filters(disk_regions):
    p = SMALL.resolved(needs_box=True)
    assert (p.pred_iou_thresh, p.stability_thresh) == (0.70, 0.80)
    for r in disk_regions:
        assert r.score >= p.pred_iou_thresh and r.stability >= p.stability_thresh


def test_label_volume_linked_or_per_slice():
    a = np.zeros((6, 6), bool)
    a[1:4, 1:4] = True
    b = np.zeros((6, 6), bool)
    b[4:6, 4:6] = True
    regions = {0: [Region(a, 0.9, 0.9, np.zeros(2)), Region(b, 0.9, 0.9, np.zeros(2))],
               1: [Region(a, 0.9, 0.9, np.zeros(2))],
               3: [Region(a, 0.9, 0.9, np.zeros(2))]}  # slice 2 skipped: a gap
    for r in regions[0]:
        r.label = 1 if r.mask is a else 2
    regions[1][0].label = regions[3][0].label = 1
    linked = label_volume_from_regions(regions, (4, 6, 6), axis=0, link=True)
    assert linked[0][a].tolist() == linked[1][a].tolist() == [1] * 9 and (linked[0][b] == 2).all()
    assert (linked[3][a] == 3).all() and not linked[2].any()  # after a gap: a new label
    per_slice = label_volume_from_regions(regions, (4, 6, 6), axis=0, link=False)
    assert sorted(np.unique(per_slice).tolist()) == [0, 1, 2, 3, 4]
    assert (per_slice[1][a] == 3).all() and (per_slice[3][a] == 4).all()
    along_i = label_volume_from_regions({2: regions[0]}, (6, 6, 4), axis=2)
    assert (along_i[:, :, 2][a] == 1).all() and along_i.sum() == 9 + 2 * 4


@pytest.mark.slow  # everything mode
def test_everything_volume_links_labels_and_reports_progress(disk_session, disks):
    _, masks = disks
    calls = []
    labels = everything_volume(disk_session, 0, [1, 0], SMALL, progress=lambda d, t, m: calls.append((d, t)))
    assert labels.shape == disk_session.shape and labels.dtype == np.int32
    assert calls[-1] == (2, 2)
    for disk in masks:  # the same disk on both slices carries one label
        values = [np.bincount(labels[k][disk]).argmax() for k in (0, 1)]
        assert values[0] > 0 and values[0] == values[1]


@pytest.mark.slow  # everything mode
def test_cancel_stops_everything(disk_session):
    from SAMSegmentLib.worker import CancelToken

    token = CancelToken()

    def progress(done: int, total: int, message: str) -> None:
        token.cancel()  # the user presses Cancel after the first batch

    with pytest.raises(CancelledError):
        everything_slice(disk_session, SliceRef(0, 0), SMALL, progress=progress, cancel=token)
    token2 = CancelToken()
    token2.cancel()
    with pytest.raises(CancelledError):
        everything_volume(disk_session, 0, params=SMALL, cancel=token2)


def test_constant_slice_has_no_regions(backend):
    from SAMSegmentLib.session import SegmentationSession

    vol = np.full((2, 32, 32), 50, np.int16)
    vol[1, 8:20, 8:20] = 300
    with SegmentationSession(model=backend) as s:
        s.set_volume(vol, window=(0, 200))
        assert everything_slice(s, SliceRef(0, 0), SMALL) == []


@pytest.mark.slow  # everything mode
def test_batched_and_loop_decoder_paths_find_the_same_regions(disk_session, disk_regions):
    """The eager batches and the one-prompt-per-run loop (ONNX Runtime where the backend has it) find
    the same regions as the default path."""
    loop = everything_slice(disk_session, SliceRef(0, 0), replace(SMALL, decoder="loop"))
    batched = everything_slice(disk_session, SliceRef(0, 0), replace(SMALL, decoder="batched", batch_size=8))
    assert disk_regions and len(disk_regions) == len(loop) == len(batched)
    for a, b, c in zip(disk_regions, loop, batched):
        assert iou(a.mask, b.mask) > 0.95 and a.score == pytest.approx(b.score, abs=0.02)
        assert iou(a.mask, c.mask) > 0.95 and a.score == pytest.approx(c.score, abs=0.02)


@pytest.mark.slow  # everything mode
def test_everything_command_writes_a_label_volume(tmp_path, capsys):
    import SimpleITK as sitk

    from SAMSegmentLib import sample_data
    from SAMSegmentLib.cli import main

    image = str(sample_data.path(sample_data.IMAGE))
    out = tmp_path / "labels.nii.gz"
    assert main(["everything", image, "--slice", "22", "--grid", "4", "--box-scales", "0.25",
                 "--out", str(out)]) == 0
    assert "label(s) on 1 slice(s)" in capsys.readouterr().out
    src, lab = sitk.ReadImage(image), sitk.ReadImage(str(out))
    assert lab.GetSize() == src.GetSize() and np.allclose(lab.GetDirection(), src.GetDirection())
    assert np.allclose(lab.GetOrigin(), src.GetOrigin()) and np.allclose(lab.GetSpacing(), src.GetSpacing())
    arr = sitk.GetArrayFromImage(lab)
    assert not np.delete(arr, 22, axis=0).any()
    assert main(["everything", image, "--slice", "22", "--out", str(out)]) == 2  # exists: refused before work
