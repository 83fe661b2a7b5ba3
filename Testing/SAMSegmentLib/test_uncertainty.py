"""Prompt-jitter uncertainty: jitter statistics, the uncertainty measures, a phantom with one sharp
and one blurred edge, and the bundled CT through the command line."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from phantoms import half_blurred_square
from SAMSegmentLib.errors import PromptError, SAMSegmentError
from SAMSegmentLib.prompts import Prompts
from SAMSegmentLib.uncertainty import jitter_prompts, prompt_uncertainty, uncertainty_from_probabilities
from SAMSegmentLib.volume import SliceRef


def test_jitter_is_seeded_inside_the_slice_and_scaled_by_the_box():
    p = Prompts(points=[[50, 40]], labels=[1], box=[20, 30, 79, 49])  # 60 x 20 box
    a = jitter_prompts(p, 400, 0.1, seed=3, height=100, width=120)
    b = jitter_prompts(p, 400, 0.1, seed=3, height=100, width=120)
    assert all(np.array_equal(x.box, y.box) and np.array_equal(x.points, y.points) for x, y in zip(a, b))
    boxes = np.stack([x.box for x in a])
    assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
    assert boxes.min() >= 0 and boxes[:, [0, 2]].max() <= 119 and boxes[:, [1, 3]].max() <= 99
    sd = boxes.std(axis=0)
    assert sd[0] == pytest.approx(6.0, rel=0.2) and sd[1] == pytest.approx(2.0, rel=0.2)  # 0.1 x width / height
    pts = np.stack([x.points[0] for x in a])
    assert pts.std(axis=0) == pytest.approx([6.0, 2.0], rel=0.2)
    assert all((x.labels == 1).all() for x in a)
    c = jitter_prompts(p, 5, 0.1, seed=4, height=100, width=120)
    assert not np.array_equal(c[0].box, a[0].box)
    assert np.array_equal(jitter_prompts(p, 2, 0.0, 0, 100, 120)[1].box, p.box)


def test_measures_known_values():
    agree = np.stack([np.ones((2, 2)), np.ones((2, 2))])
    mean, ent = uncertainty_from_probabilities(agree, "entropy")
    assert (mean == 1).all() and (ent == 0).all()
    split = np.stack([np.zeros((2, 2)), np.ones((2, 2))])
    mean, ent = uncertainty_from_probabilities(split, "entropy")
    assert np.allclose(mean, 0.5) and np.allclose(ent, 1.0)
    _, var = uncertainty_from_probabilities(split, "variance")
    assert np.allclose(var, 0.25)
    with pytest.raises(SAMSegmentError):
        uncertainty_from_probabilities(split, "mutual_information")


@pytest.fixture(scope="module")
def edge_session(backend):
    from SAMSegmentLib.session import SegmentationSession

    vol, square = half_blurred_square()
    s = SegmentationSession(model=backend)
    s.set_volume(vol, window=(-200, 300))
    yield s, square
    s.close()


def test_blurred_edge_is_more_uncertain_than_sharp_edge(edge_session):
    s, square = edge_session
    mean, unc = prompt_uncertainty(s, SliceRef(0, 0), Prompts(box=[27, 27, 68, 68]), n=12, jitter=0.1, seed=0)
    assert mean.shape == unc.shape == square.shape and mean.dtype == np.float32
    assert 0 <= unc.min() and unc.max() <= 1.0
    assert mean[40:56, 40:56].min() > 0.9 and mean[:10, :10].max() < 0.1  # inside sure, far outside sure
    sharp_band = unc[32:64, 22:34].mean()  # around the left (sharp) edge at column 28
    blurred_band = unc[32:64, 62:74].mean()  # around the right (blurred) edge at column 68
    assert blurred_band > 1.2 * sharp_band
    assert unc[40:56, 40:56].mean() < 0.05 and unc[40:56, 40:56].mean() < sharp_band
    again, unc2 = prompt_uncertainty(s, SliceRef(0, 0), Prompts(box=[27, 27, 68, 68]), n=12, jitter=0.1, seed=0)
    # seeded: the same jitter (the cached fp16 embedding differs from the first fp32 one by rounding only)
    assert np.abs(unc - unc2).mean() < 1e-3
    _, var = prompt_uncertainty(s, SliceRef(0, 0), Prompts(box=[27, 27, 68, 68]), n=12, jitter=0.1, seed=0,
                                measure="variance")
    assert var.max() <= 0.25 + 1e-6 and var[32:64, 62:74].mean() > var[32:64, 22:34].mean()


def test_jitter_is_around_the_box_predict_decodes(edge_session):
    """The maps describe the mask the user sees: with the model's box margin on, the jitter centres
    on the widened box, so the mean map changes when the margin is switched off."""
    s, _ = edge_session
    ref, box = SliceRef(0, 0), Prompts(box=[27, 27, 68, 68])
    assert s.box_margin > 0
    widened, _ = prompt_uncertainty(s, ref, box, n=4, jitter=0.05, seed=0)
    s.box_margin = 0.0
    try:
        drawn, _ = prompt_uncertainty(s, ref, box, n=4, jitter=0.05, seed=0)
    finally:
        s.box_margin = s.backend.spec.box_margin
    assert np.abs(widened - drawn).max() > 0.05
    shown = s.predict(ref, box, refine=False).mask
    assert ((widened > 0.5) == shown).mean() > ((drawn > 0.5) == shown).mean() - 1e-9


def test_jittered_prompts_are_one_batched_decode(edge_session, monkeypatch):
    """All n jittered boxes go to the backend's batched decode in one call (it picks the path)."""
    s, _ = edge_session
    calls = []
    original = s.backend.decode_batch

    def spy(emb, geom, points=None, labels=None, boxes=None, *args, **kwargs):
        calls.append((points, boxes))
        return original(emb, geom, points, labels, boxes, *args, **kwargs)

    monkeypatch.setattr(s.backend, "decode_batch", spy)
    prompt_uncertainty(s, SliceRef(0, 0), Prompts(box=[27, 27, 68, 68]).with_point(48, 48, 1), n=5, seed=0)
    assert len(calls) == 1
    points, boxes = calls[0]
    assert boxes.shape == (5, 4) and points.shape == (5, 1, 2)


def test_box_model_refuses_points_only(edge_session):
    s, _ = edge_session
    with pytest.raises(PromptError):
        prompt_uncertainty(s, SliceRef(0, 0), Prompts.from_lists([(48, 48)]), n=4)


@pytest.mark.slow  # a CLI run on the sample CT
def test_uncertainty_command_on_sample_ct(tmp_path, sample_ct, capsys):
    from SAMSegmentLib import sample_data
    from SAMSegmentLib.cli import main

    vol, lab, names = sample_ct
    spleen = lab == names["spleen"]
    k = int(spleen.sum(axis=(1, 2)).argmax())
    ys, xs = np.nonzero(spleen[k])
    box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    image = str(sample_data.path(sample_data.IMAGE))
    unc_path, prob_path = tmp_path / "unc.nii.gz", tmp_path / "prob.nrrd"
    assert main(["uncertainty", image, "--slice", str(k), "--box", *map(str, box), "--out", str(unc_path),
                 "--prob-out", str(prob_path), "--samples", "8", "--jitter", "0.1"]) == 0
    assert "jittered prompts" in capsys.readouterr().out
    src = sitk.ReadImage(image)
    unc_img, prob_img = sitk.ReadImage(str(unc_path)), sitk.ReadImage(str(prob_path))
    for img in (unc_img, prob_img):
        assert img.GetSize() == src.GetSize() and np.allclose(img.GetDirection(), src.GetDirection())
        assert np.allclose(img.GetOrigin(), src.GetOrigin()) and np.allclose(img.GetSpacing(), src.GetSpacing())
    unc, prob = sitk.GetArrayFromImage(unc_img), sitk.GetArrayFromImage(prob_img)
    assert not np.delete(unc, k, axis=0).any() and not np.delete(prob, k, axis=0).any()
    mean_mask = prob[k] > 0.5
    dice = 2 * (mean_mask & spleen[k]).sum() / (mean_mask.sum() + spleen[k].sum())
    assert dice > 0.85
    from scipy import ndimage

    edge = spleen[k] ^ ndimage.binary_erosion(spleen[k], iterations=2)
    interior = ndimage.binary_erosion(spleen[k], iterations=4)
    assert unc[k][edge].mean() > 3 * unc[k][interior].mean()  # uncertain at the boundary, not inside
    # same seed, same file; existing output refused
    assert main(["uncertainty", image, "--slice", str(k), "--box", *map(str, box), "--out", str(unc_path)]) == 2
