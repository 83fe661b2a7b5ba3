"""Adaptation to accepted slices (``SAMSegmentLib.adaptation``): the signed adapter file, the
held-back check, the session's use of the adapter on every decode path, and a real gain on the
sample CT. Real LiteMedSAM throughout."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from SAMSegmentLib.adaptation import (MAGIC, AdaptationReport, AdaptSettings, DecoderAdapter, adapt, augmented_box,
                                      augmented_points, checked_accepted, load_trained, signing_key,
                                      trained_parameters)
from SAMSegmentLib.errors import CancelledError, CheckpointError, SAMSegmentError
from SAMSegmentLib.metrics import dice
from SAMSegmentLib.preprocessing import mask_bbox
from SAMSegmentLib.prompts import Prompts
from SAMSegmentLib.volume import SliceRef
from SAMSegmentLib.worker import CancelToken

QUICK = AdaptSettings(check_steps=2, final_steps=1, min_gain=-1.0, mirror_min_gain=-1.0)  # always kept: for the plumbing tests


@pytest.fixture(autouse=True)
def adapter_key(tmp_path, monkeypatch):
    """Every test signs with a key of its own, never the user's."""
    path = tmp_path / "keys" / "adapter.key"
    monkeypatch.setenv("SAMSEGMENT_ADAPTER_KEY", str(path))
    return path


class _Phantom:
    def __init__(self, pair):
        self.volume, self.mask = pair


@pytest.fixture
def ph(phantom):
    """The phantom CT as (volume, mask) attributes."""
    return _Phantom(phantom)


@pytest.fixture
def phantom_session(session, ph):
    session.set_volume(ph.volume)
    return session


def _accepted(phantom, slices):
    return {k: phantom.mask[k] for k in slices}


def _phantom_slices(phantom, n=3):
    present = np.nonzero(phantom.mask.any(axis=(1, 2)))[0]
    return [int(present[int(round(f * (len(present) - 1)))]) for f in np.linspace(0.25, 0.75, n)]


def _box_mask(session, ref, mask):
    return session.decode(ref, Prompts(box=mask_bbox(mask))).mask


# ------------------------------------------------------------------------------------- file + key
def _fake_adapter(backend, scale=0.0):
    tensors = {name: p.detach().cpu().numpy() + scale for name, p in trained_parameters(backend.net.mask_decoder).items()}
    return DecoderAdapter(backend.spec.id, backend.model_sha256, tensors, "liver", {"kept": True})


def test_signed_file_round_trip_and_refusals(backend, tmp_path):
    adapter = _fake_adapter(backend, 0.01)
    key = signing_key()
    path = adapter.save(tmp_path / "liver.samadapter")
    loaded = DecoderAdapter.load(path)
    assert loaded.model_id == adapter.model_id and loaded.model_sha256 == adapter.model_sha256
    assert loaded.structure == "liver" and loaded.report == {"kept": True}
    assert set(loaded.tensors) == set(adapter.tensors)
    assert all(np.array_equal(loaded.tensors[n], adapter.tensors[n].astype(np.float32)) for n in adapter.tensors)
    data = path.read_bytes()
    header_end = len(MAGIC) + 8 + int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")

    def refused(blob, words):
        with pytest.raises(CheckpointError) as err:
            DecoderAdapter.from_bytes(blob, key, "the file")
        assert words in str(err.value) and err.value.remedy
        return err.value

    refused(data[:-1] + bytes([data[-1] ^ 1]), "do not match its signed digest")  # one payload bit
    tampered_header = data.replace(b'"structure":"liver"', b'"structure":"lives"')
    assert tampered_header != data
    refused(tampered_header, "not signed with this machine's adapter key")
    with pytest.raises(CheckpointError, match="not signed"):
        DecoderAdapter.from_bytes(data, b"another-site-key-of-thirty-two-bytes!!", "the file")
    refused(b"PK\x03\x04 a zip file", "not a SAMSegment adapter file")
    refused(data[:len(MAGIC) + 4], "cut short")
    refused(data[:header_end - 10], "cut short or damaged")
    # a pickle is never read: it is not an adapter file
    import pickle

    refused(pickle.dumps({"a": 1}), "not a SAMSegment adapter file")


def test_signing_key_made_once_private_and_checked(adapter_key):
    assert not adapter_key.exists()
    first = signing_key()
    assert adapter_key.exists() and signing_key() == first and len(first) >= 32
    assert stat.S_IMODE(os.stat(adapter_key).st_mode) == 0o600
    adapter_key.write_bytes(b"short")
    with pytest.raises(CheckpointError, match="at least 32"):
        signing_key()


def test_adapter_of_other_weights_or_model_refused(backend, session):
    other = _fake_adapter(backend)
    other.model_sha256 = "0" * 64
    with pytest.raises(CheckpointError, match="other litemedsam weights"):
        session.use_adapter(other)
    other = _fake_adapter(backend)
    other.model_id = "sam_vit_b"
    with pytest.raises(CheckpointError, match="trained for model 'sam_vit_b'") as err:
        session.use_adapter(other)
    assert "--model sam_vit_b" in err.value.remedy
    assert session.adapter is None


def test_tensors_of_another_layout_refused(backend):
    import copy

    decoder = copy.deepcopy(backend.net.mask_decoder)
    tensors = {n: p.detach().numpy() for n, p in trained_parameters(decoder).items()}
    name = next(iter(tensors))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_trained(decoder, {**tensors, name: np.zeros((3, 3), np.float32)})
    with pytest.raises(CheckpointError, match="lacks"):
        load_trained(decoder, {k: v for k, v in tensors.items() if k != name})


@pytest.mark.parametrize("settings, words", [
    (AdaptSettings(check_steps=0), "check_steps"), (AdaptSettings(final_steps=-1), "final_steps"),
    (AdaptSettings(prompts_per_slice=1.5), "prompts_per_slice"), (AdaptSettings(learning_rate=float("nan")), "learning rate"),
    (AdaptSettings(learning_rate=1.0), "learning rate"), (AdaptSettings(min_gain=float("inf")), "min_gain"),
    (AdaptSettings(mirror_min_gain=2.0), "mirror_min_gain"), (AdaptSettings(click_prompts="yes"), "click_prompts")])
def test_bad_settings_refused(settings, words):
    with pytest.raises(SAMSegmentError, match=words):
        settings.check()


def test_augmented_prompts_lie_where_a_user_would_put_them():
    mask = np.zeros((40, 50), bool)
    mask[10:30, 15:35] = True
    rng = np.random.default_rng(3)
    for _ in range(50):
        box = augmented_box(mask, rng)
        assert 0 <= box[0] < box[2] <= 49 and 0 <= box[1] < box[3] <= 39
        assert box[0] <= 15 + 0.1 * 20 and box[2] >= 34 - 0.1 * 20  # sides move by at most 10 % inwards
        points = augmented_points(mask, box, rng)
        (x, y, label), (nx, ny, nlabel) = points.astype(int)
        assert label == 1 and mask[y, x]
        assert nlabel in (0, 1) and mask[ny, nx] == bool(nlabel)
        assert box[0] - 0.5 <= nx <= box[2] + 0.5 and box[1] - 0.5 <= ny <= box[3] + 0.5
    full = np.ones((8, 8), bool)  # a box with nothing but the structure: two include points
    assert (augmented_points(full, np.array([0.0, 0.0, 7.0, 7.0]), rng)[:, 2] == 1).all()


def test_bad_accepted_masks_refused():
    shape = (5, 8, 9)
    good = np.zeros((8, 9), bool)
    good[2:4, 2:5] = True
    with pytest.raises(SAMSegmentError, match="No accepted slice"):
        checked_accepted(shape, 0, {})
    with pytest.raises(SAMSegmentError, match="outside the volume"):
        checked_accepted(shape, 0, {7: good})
    with pytest.raises(SAMSegmentError, match="has shape"):
        checked_accepted(shape, 1, {1: good})
    with pytest.raises(SAMSegmentError, match="is empty"):
        checked_accepted(shape, 0, {1: np.zeros((8, 9), bool)})
    assert list(checked_accepted(shape, 0, {3: good, 1: good})) == [1, 3]


# ------------------------------------------------------------------------------------- the session
@pytest.mark.slow
def test_kept_adapter_changes_every_decode_path_and_reverts(phantom_session, ph):
    from SAMSegmentLib.automatic import EverythingParams, everything_slice
    from SAMSegmentLib.uncertainty import prompt_uncertainty

    s = phantom_session
    slices = _phantom_slices(ph)
    ref = SliceRef(0, slices[1] + 1)
    box = Prompts(box=mask_bbox(ph.mask[ref.index]))
    params = EverythingParams(points_per_side=4)
    stock = (s.decode(ref, box).logits, prompt_uncertainty(s, ref, box, n=4)[0],
             len(everything_slice(s, ref, params)))
    progress = []
    report = s.adapt(0, _accepted(ph, slices), "ph", QUICK, progress=lambda d, t, m: progress.append((d, t, m)))
    assert report.kept and s.adapter is not None and s.adapter.structure == "ph"
    assert report.held_back == f"slice {slices[1]}" and report.steps == 3 and report.slices == tuple(slices)
    assert report.prompts_per_step == 3 * QUICK.prompts_per_slice and report.seconds > 0
    assert progress[0][0] == 0 and progress[-1][:2] == (3, 3) and progress[-1][2] == report.summary()
    assert report.summary().startswith(f"kept: Dice on held-back slice {slices[1]} ")
    adapted = s.decode(ref, box).logits
    data = s.adapter_file_bytes()
    assert data.startswith(MAGIC)
    assert not np.allclose(adapted, stock[0])
    assert not np.allclose(prompt_uncertainty(s, ref, box, n=4)[0], stock[1])
    regions = everything_slice(s, ref, params)  # runs through the adapter (counts may differ or not)
    assert isinstance(regions, list)
    s.use_stock_model()
    assert np.array_equal(s.decode(ref, box).logits, stock[0])
    assert np.array_equal(prompt_uncertainty(s, ref, box, n=4)[0], stock[1])
    assert len(everything_slice(s, ref, params)) == stock[2]
    # the signed bytes put it back; a new volume reverts to the stock model
    s.load_adapter_file_bytes(data)
    assert np.array_equal(s.decode(ref, box).logits, adapted)
    s.set_volume(ph.volume)
    assert s.adapter is None and s.adapter_file_bytes() is None


@pytest.mark.slow
def test_saved_adapter_gives_the_same_masks_in_a_new_session(phantom_session, ph, backend, tmp_path):
    from SAMSegmentLib.session import SegmentationSession

    s = phantom_session
    slices = _phantom_slices(ph, 2)
    s.adapt(0, _accepted(ph, slices), "ph", QUICK)
    ref = SliceRef(0, slices[0] + 1)
    adapted = _box_mask(s, ref, ph.mask[ref.index])
    path = s.adapter.save(tmp_path / "a.samadapter")
    with SegmentationSession(model=backend) as other:
        other.set_volume(ph.volume)
        other.use_adapter(DecoderAdapter.load(path))
        assert np.array_equal(_box_mask(other, ref, ph.mask[ref.index]), adapted)


@pytest.mark.slow
def test_adapted_decoder_runs_in_onnx_runtime_with_the_eager_masks(ph, eager_backend, onnx_backend, onnx_dir):
    """Where the stock decoder runs in ONNX Runtime, an adapter gets graphs of its own (exported when it
    comes into use, cached under adapters/): the same masks as eager PyTorch, none of the stock graphs'."""
    from SAMSegmentLib.session import SegmentationSession

    slices = _phantom_slices(ph, 2)
    ref = SliceRef(0, slices[0] + 1)
    box = Prompts(box=mask_bbox(ph.mask[ref.index]))
    logits, adapter = [], None
    for backend in (eager_backend, onnx_backend):
        with SegmentationSession(model=backend) as s:
            s.set_volume(ph.volume)
            stock = s.decode(ref, box).logits
            if adapter is None:
                s.adapt(0, _accepted(ph, slices), "ph", QUICK)
                adapter = s.adapter
            else:
                s.use_adapter(adapter)
            logits.append(s.decode(ref, box).logits)
            assert not np.allclose(logits[-1], stock, atol=1e-3)
    assert eager_backend.prepare_adapter(adapter) is None  # eager: nothing to export
    graphs = onnx_backend.prepare_adapter(adapter)
    assert graphs is not None and graphs["decoder"].path.parent.parent == onnx_dir / "adapters"
    assert graphs["decoder"].signature["weights_sha256"] == adapter.digest
    assert np.abs(logits[0] - logits[1]).max() < 1e-2 and np.array_equal(logits[0] > 0, logits[1] > 0)


def test_adapted_graphs_on_disk_are_bounded(tmp_path):
    from SAMSegmentLib.onnx_cache import prune_oldest

    for i in range(5):
        folder = tmp_path / f"litemedsam-decoder-{i}"
        folder.mkdir()
        os.utime(folder, (1000 + i, 1000 + i))
    (tmp_path / ".litemedsam-decoder-tmp").mkdir()  # an export in progress is never touched
    prune_oldest(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".litemedsam-decoder-tmp", "litemedsam-decoder-3",
                                                         "litemedsam-decoder-4"]


@pytest.mark.slow
def test_an_adapter_whose_export_fails_decodes_in_pytorch(ph, onnx_backend, monkeypatch):
    from SAMSegmentLib import onnx_cache
    from SAMSegmentLib.session import SegmentationSession

    def broken(*args, **kwargs):
        raise RuntimeError("no space left for the graph")

    slices = _phantom_slices(ph, 2)
    with SegmentationSession(model=onnx_backend) as s:
        s.set_volume(ph.volume)
        _, adapter = adapt(s, 0, _accepted(ph, slices), "ph", AdaptSettings(check_steps=1, final_steps=0, min_gain=-1.0,
                                                                          seed=5))
        onnx_backend._adapter_graphs.pop(adapter.digest, None)
        monkeypatch.setattr(onnx_cache, "load_or_export", broken)
        s.use_adapter(adapter)
        ref = SliceRef(0, slices[0] + 1)
        mask = _box_mask(s, ref, ph.mask[ref.index])
    assert onnx_backend.prepare_adapter(adapter) is None
    assert any("adapted decoder: RuntimeError" in n for n in onnx_backend.runtime_info()["notes"])
    assert mask.any()


@pytest.mark.slow
def test_not_kept_when_the_held_back_slice_says_no(phantom_session, ph):
    s = phantom_session
    report = s.adapt(0, _accepted(ph, _phantom_slices(ph)), "ph",
                     AdaptSettings(check_steps=1, final_steps=3, min_gain=1.0))  # a gain above 1 cannot happen
    assert not report.kept and s.adapter is None and report.steps == 1  # no final phase
    assert report.summary().startswith("not kept:") and "stock model stays" in report.summary()
    assert AdaptationReport.from_json(report.as_json()) == report


@pytest.mark.slow
def test_one_accepted_slice_is_checked_on_its_mirror_image(phantom_session, ph):
    k = _phantom_slices(ph, 1)[0]
    report = phantom_session.adapt(0, {k: ph.mask[k]}, None, QUICK)
    assert report.held_back == f"slice {k} mirrored" and report.slices == (k,)


def test_cancel_leaves_the_stock_model(phantom_session, ph):
    s = phantom_session
    token = CancelToken()

    def progress(done, total, message):
        if done == 1:
            token.cancel()

    with pytest.raises(CancelledError):
        s.adapt(0, _accepted(ph, _phantom_slices(ph)), None, AdaptSettings(check_steps=5), token, progress)
    assert s.adapter is None


@pytest.mark.slow
def test_adapt_without_session_adapt_returns_the_adapter(phantom_session, ph):
    clicks = AdaptSettings(check_steps=2, final_steps=1, min_gain=-1.0, click_prompts=True)  # boxes with clicks too
    report, adapter = adapt(phantom_session, 0, _accepted(ph, _phantom_slices(ph, 2)), "x", clicks)
    assert report.kept and adapter is not None and phantom_session.adapter is None  # nothing installed
    assert adapter.matches(phantom_session.backend)


@pytest.mark.slow
def test_adaptation_lifts_a_structure_the_stock_model_misses(sample_ct, backend):
    """Colon on the sample CT: three accepted slices; the stock model's propagation is poor, the adapted
    decoder's much better, and the held-back check keeps it (default settings)."""
    from SAMSegmentLib.propagation import propagate
    from SAMSegmentLib.session import SegmentationSession

    vol, labels, values = sample_ct
    ref3 = labels == values["colon"]
    present = np.nonzero(ref3.any(axis=(1, 2)))[0]
    n = len(present) - 1
    slices = sorted({int(ref3.sum(axis=(1, 2)).argmax()), int(present[round(0.25 * n)]), int(present[round(0.75 * n)])})
    anchors = {k: ref3[k] for k in slices}
    with SegmentationSession(model=backend) as s:
        s.set_volume(vol)
        stock = dice(propagate(s, 0, anchors).to_volume(labels.shape, anchors), ref3)
        report = s.adapt(0, anchors, "colon")
        adapted = dice(propagate(s, 0, anchors).to_volume(labels.shape, anchors), ref3)
    assert report.kept and report.held_back_dice_adapted > report.held_back_dice_stock + 0.2
    assert stock < 0.5 and adapted > stock + 0.3, (stock, adapted, report)
