"""ONNX Runtime vs eager PyTorch: same outputs on real weights and a real CT slice, the on-disk
graph cache (reuse, refusal of stale files), and the fall-back to eager when ONNX cannot be used."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch

from SAMSegmentLib import runtimes
from SAMSegmentLib.backends import SamBackend
from SAMSegmentLib.errors import SAMSegmentError
from SAMSegmentLib.preprocessing import IntensityWindow
from SAMSegmentLib.prompts import Prompts
from SAMSegmentLib.volume import SliceRef

needs_ort = pytest.mark.skipif(not runtimes.onnxruntime_available(), reason="onnxruntime is not installed")
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def eager_backend():
    torch.set_num_threads(2)
    return SamBackend.from_model_id("litemedsam", device="cpu", runtime="eager")


@pytest.fixture(scope="session")
def onnx_backend(onnx_dir):
    """Exports both graphs once for the whole test session (~10 s on 2 cores)."""
    torch.set_num_threads(2)
    backend = SamBackend.from_model_id("litemedsam", device="cpu", runtime="onnx", onnx_cache_dir=onnx_dir)
    info = backend.prepare_runtime()
    assert info["encoder"] == info["decoder"] == "onnx", info
    return backend


@pytest.fixture(scope="session")
def spleen_slice(sample_ct):
    """(uint8 slice, box around the spleen, an include point inside, an exclude point outside)."""
    vol, lab, names = sample_ct
    spleen = lab == names["spleen"]
    k = int(np.argmax(spleen.reshape(spleen.shape[0], -1).sum(1)))
    image = IntensityWindow.from_level_width(40, 400).apply(vol[k])
    ys, xs = np.nonzero(spleen[k])
    box = np.array([xs.min() - 2.0, ys.min() - 2.0, xs.max() + 2.0, ys.max() + 2.0])
    inside = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    include = np.array([xs[inside], ys[inside]], dtype=float)
    exclude = np.array([max(xs.min() - 6.0, 0.0), max(ys.min() - 6.0, 0.0)])
    return image, box, include, exclude


def _prompt_kwargs(kind: str, box, include, exclude) -> dict:
    if kind == "box":
        return {"box": box}
    if kind == "points":
        return {"points": np.stack([include, exclude]), "labels": np.array([1, 0])}
    return {"box": box, "points": include[None], "labels": np.array([1])}


def _assert_same_decode(a, b) -> None:
    np.testing.assert_allclose(b.logits, a.logits, atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(b.low_res_logits.numpy(), a.low_res_logits.numpy(), atol=LOGIT_ATOL, rtol=0)
    assert abs(a.score - b.score) < LOGIT_ATOL
    clear = np.abs(a.logits) > 10 * LOGIT_ATOL  # a pixel can only flip where the logit is ~0
    assert np.array_equal((a.logits > 0)[clear], (b.logits > 0)[clear])


# --------------------------------------------------------------------------- equivalence
@pytest.fixture(scope="session")
def spleen_embedding(eager_backend, spleen_slice):
    return eager_backend.encode(spleen_slice[0])


@needs_ort
def test_encoder_onnx_matches_eager(eager_backend, onnx_backend, spleen_slice, spleen_embedding):
    image, box = spleen_slice[:2]
    ours = onnx_backend.encode(image)
    assert isinstance(ours, torch.Tensor) and ours.shape == spleen_embedding.shape == (1, 256, 64, 64)
    assert float((ours - spleen_embedding).abs().max()) < 1e-4
    # and the whole chain, ONNX encoder + ONNX decoder vs eager + eager, in fp32
    geom = eager_backend.geometry(*image.shape)
    _assert_same_decode(eager_backend.decode(spleen_embedding, geom, box=box), onnx_backend.decode(ours, geom, box=box))


@needs_ort
@pytest.mark.parametrize("kind", ["box", "points", "box+points"])
def test_decoder_onnx_matches_eager(eager_backend, onnx_backend, spleen_slice, spleen_embedding, kind):
    image, box, include, exclude = spleen_slice
    emb = spleen_embedding
    geom = eager_backend.geometry(*image.shape)
    kwargs = _prompt_kwargs(kind, box, include, exclude)
    first_eager, first_onnx = eager_backend.decode(emb, geom, **kwargs), onnx_backend.decode(emb, geom, **kwargs)
    _assert_same_decode(first_eager, first_onnx)
    # refinement: the previous low-res logits as mask input
    refined = {"mask_input": first_eager.low_res_logits, **kwargs}
    _assert_same_decode(eager_backend.decode(emb, geom, **refined), onnx_backend.decode(emb, geom, **refined))
    # multimask selection (used for SAM ViT single clicks) picks the same output
    _assert_same_decode(eager_backend.decode(emb, geom, multimask=True, **kwargs),
                        onnx_backend.decode(emb, geom, multimask=True, **kwargs))


@needs_ort
def test_session_with_onnx_backend_matches_eager(eager_backend, onnx_backend, sample_ct, spleen_slice):
    """Both graphs chained through SegmentationSession, box then a refining click, give the eager masks.

    The session caches embeddings in fp16, which alone moves logits by ~2e-3 against fp32, and
    two embeddings 2e-6 apart can round to neighbouring fp16 values: hence 2e-3 here (plus 1e-3
    relative: far from the boundary, at logits of -13, the two differ by up to 2.5e-3), 1e-4 above.
    """
    from SAMSegmentLib.session import SegmentationSession

    vol, lab, names = sample_ct
    image, box, include, _ = spleen_slice
    k = int(np.argmax((lab == names["spleen"]).reshape(lab.shape[0], -1).sum(1)))
    preds = []
    for backend in (eager_backend, onnx_backend):
        with SegmentationSession(model=backend) as session:
            session.set_volume(vol, window=IntensityWindow.from_level_width(40, 400))
            first = session.predict(SliceRef(0, k), Prompts(box=box))
            second = session.predict(SliceRef(0, k), Prompts(box=box).with_point(include[0], include[1], 1))
            preds.append((first, second))
    for a, b in zip(*preds):
        np.testing.assert_allclose(b.logits, a.logits, atol=2e-3, rtol=1e-3)
        assert (a.mask ^ b.mask).sum() <= 2
    truth = lab[k] == names["spleen"]
    mask = preds[1][0].mask
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.85


@pytest.mark.parametrize("with_mask", [False, True])
def test_split_first_layer_computes_what_the_decoder_computes(eager_backend, with_mask):
    """The decoder with its first layer fed precomputed slice features (and the mask embedding's
    projection factored through its 16 channels) gives the plain decoder's outputs, for the masks
    asked for in ``mask_index``."""
    pe, md = eager_backend.prompt_encoder, eager_backend.mask_decoder
    assert runtimes.first_layer_split(pe, md)
    plain = runtimes.prompt_decoder_module(pe, md)
    split = runtimes.prompt_decoder_module(pe, md, split_first_layer=True)
    features = runtimes.slice_features_module(pe, md)
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 256, 64, 64, generator=gen)
    coords = torch.tensor([[[30.0, 40.0], [20.0, 25.0], [190.0, 120.0]]])
    labels = torch.tensor([[0.0, 2.0, 3.0]])
    mask = torch.randn(1, 1, 256, 256, generator=gen) * 4 if with_mask else torch.zeros(1, 1, 4, 4)
    has = torch.ones(1) if with_mask else torch.zeros(1)
    with torch.inference_mode():
        want_masks, want_iou = plain(emb, coords, labels, mask, has)
        f = features(emb)
        for index in ([0], [1, 2, 3], [2]):
            masks, iou = split(*f, coords, labels, mask, has, torch.tensor(index))
            torch.testing.assert_close(iou, want_iou, atol=1e-5, rtol=0)
            torch.testing.assert_close(masks, want_masks[:, index], atol=1e-4, rtol=1e-5)


@needs_ort
def test_slice_features_are_computed_once_per_key(onnx_backend, eager_backend, spleen_slice, spleen_embedding):
    """Decodes under one ``features_key`` reuse that slice's features (a small LRU); without the
    features graph the same inputs come from PyTorch, with the same masks."""
    from SAMSegmentLib.backends import FEATURES_CACHE_SLICES

    image, box = spleen_slice[:2]
    geom = onnx_backend.geometry(*image.shape)
    onnx_backend._features.clear()
    first = onnx_backend.decode(spleen_embedding, geom, box=box, features_key="slice-a")
    kept = onnx_backend._features["slice-a"]
    again = onnx_backend.decode(spleen_embedding, geom, box=box + 3, features_key="slice-a")
    assert onnx_backend._features["slice-a"] is kept and len(onnx_backend._features) == 1
    # the key is the caller's promise: another embedding under the same key would reuse these
    assert onnx_backend._slice_features(torch.zeros_like(spleen_embedding), "slice-a") is kept
    for i in range(FEATURES_CACHE_SLICES + 1):
        onnx_backend.decode(spleen_embedding, geom, box=box, features_key=("other", i))
    assert "slice-a" not in onnx_backend._features and len(onnx_backend._features) == FEATURES_CACHE_SLICES
    _assert_same_decode(eager_backend.decode(spleen_embedding, geom, box=box + 3), again)
    graph = onnx_backend._graphs.pop("features")
    try:
        from_torch = onnx_backend.decode(spleen_embedding, geom, box=box)
    finally:
        onnx_backend._graphs["features"] = graph
    _assert_same_decode(first, from_torch)


# --------------------------------------------------------------------------- disk cache
@needs_ort
def test_cached_graphs_are_reused_without_export(onnx_backend, onnx_dir):
    folders = {part: onnx_backend._graphs[part].path.parent for part in ("encoder", "decoder", "features")}
    mtimes = {part: (f / runtimes.MODEL_FILE).stat().st_mtime_ns for part, f in folders.items()}
    before = sum(runtimes.export_counts.values())
    again = SamBackend.from_model_id("litemedsam", device="cpu", runtime="onnx", onnx_cache_dir=onnx_dir)
    info = again.prepare_runtime()
    assert sum(runtimes.export_counts.values()) == before
    assert info["encoder"] == info["decoder"] == "onnx"
    assert not info["encoder_exported_now"] and not info["decoder_exported_now"] and not info["features_exported_now"]
    assert {p: (f / runtimes.MODEL_FILE).stat().st_mtime_ns for p, f in folders.items()} == mtimes
    signature = json.loads((folders["encoder"] / runtimes.SIGNATURE_FILE).read_text())
    assert signature["weights_sha256"] == again.spec.weights["sha256"]
    assert signature["torch"] == torch.__version__ and signature["opset"] == runtimes.ONNX_OPSET
    assert runtimes.signature_hash(signature) in folders["encoder"].name


@needs_ort
@pytest.mark.parametrize("damage", ["signature", "model"])
def test_stale_or_corrupt_graph_is_exported_again(onnx_backend, onnx_dir, caplog, damage):
    folder = onnx_backend._graphs["decoder"].path.parent
    if damage == "signature":  # e.g. a file left by another torch build under the same name
        sig = json.loads((folder / runtimes.SIGNATURE_FILE).read_text())
        (folder / runtimes.SIGNATURE_FILE).write_text(json.dumps({**sig, "torch": "0.0.0"}))
    else:  # truncated by a crash
        data = (folder / runtimes.MODEL_FILE).read_bytes()
        (folder / runtimes.MODEL_FILE).write_bytes(data[: len(data) // 3])
    counts = runtimes.export_counts.copy()
    with caplog.at_level(logging.WARNING, logger="SAMSegmentLib.runtimes"):
        again = SamBackend.from_model_id("litemedsam", device="cpu", runtime="onnx", onnx_cache_dir=onnx_dir)
        info = again.prepare_runtime()
    assert info["decoder"] == "onnx" and info["decoder_exported_now"] and not info["encoder_exported_now"]
    assert runtimes.export_counts[("litemedsam", "decoder")] == counts[("litemedsam", "decoder")] + 1
    assert runtimes.export_counts[("litemedsam", "encoder")] == counts[("litemedsam", "encoder")]
    assert "exporting it again" in caplog.text
    assert json.loads((folder / runtimes.SIGNATURE_FILE).read_text())["torch"] == torch.__version__


def test_signature_names_the_folder(tmp_path):
    pytest.importorskip("onnxruntime")
    base = runtimes.export_signature("litemedsam", "litemedsam", 256, "encoder", "ab" * 32)
    other_weights = runtimes.export_signature("litemedsam", "litemedsam", 256, "encoder", "cd" * 32)
    other_torch = {**base, "torch": "1.0"}
    folders = {runtimes.artifact_dir(tmp_path, s) for s in (base, other_weights, other_torch)}
    assert len(folders) == 3
    assert all(f.name.startswith("litemedsam-encoder-") for f in folders)


def test_user_checkpoint_digest_is_remembered(tmp_path):
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights")
    import hashlib

    assert runtimes.weights_digest(ckpt, tmp_path / "c") == hashlib.sha256(b"weights").hexdigest()
    assert (tmp_path / "c" / "weights-sha256.json").exists()
    ckpt.write_bytes(b"other weights")  # new size and mtime: hashed again
    assert runtimes.weights_digest(ckpt, tmp_path / "c") == hashlib.sha256(b"other weights").hexdigest()
    assert runtimes.weights_digest(ckpt, tmp_path / "c", known_sha256="f" * 64) == "f" * 64


# --------------------------------------------------------------------------- selection and fall-back
def test_runtime_selection(monkeypatch):
    monkeypatch.delenv(runtimes.RUNTIME_ENV, raising=False)
    assert runtimes.requested_runtime(None) == "auto"
    for device in ("cuda", "cuda:1", "mps"):
        assert runtimes.resolve_runtime("auto", device) == "eager"
        assert runtimes.resolve_runtime("onnx", device) == "eager"
    assert runtimes.resolve_runtime("eager", "cpu") == "eager"
    expected = "onnx" if runtimes.onnxruntime_available() else "eager"
    assert runtimes.resolve_runtime("auto", "cpu") == expected
    if expected == "onnx":  # "auto" keeps the big ViT encoders eager (no faster in ONNX Runtime here)
        assert runtimes.part_runtimes("auto", "cpu", "vit_h") == {"encoder": "eager", "decoder": "onnx"}
        assert runtimes.part_runtimes("auto", "cpu", "vit_b") == {"encoder": "onnx", "decoder": "onnx"}
        assert runtimes.part_runtimes("onnx", "cpu", "vit_h") == {"encoder": "onnx", "decoder": "onnx"}
    assert runtimes.part_runtimes("auto", "cuda", "litemedsam") == {"encoder": "eager", "decoder": "eager"}
    monkeypatch.setenv(runtimes.RUNTIME_ENV, "eager")
    assert runtimes.requested_runtime(None) == "eager" and runtimes.resolve_runtime(None, "cpu") == "eager"
    assert runtimes.requested_runtime("onnx") == "onnx"
    with pytest.raises(SAMSegmentError, match="Unknown runtime 'tensorrt'"):
        runtimes.requested_runtime("tensorrt")


def test_falls_back_to_eager_without_onnxruntime(monkeypatch, tmp_path, caplog, eager_backend, spleen_slice):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    assert not runtimes.onnxruntime_available()
    with caplog.at_level(logging.WARNING):
        backend = SamBackend.from_model_id("litemedsam", device="cpu", runtime="onnx", onnx_cache_dir=tmp_path)
    assert "onnxruntime is not installed" in caplog.text
    assert SamBackend.from_model_id("litemedsam", device="cpu", runtime="auto").runtime == "eager"
    info = backend.prepare_runtime()
    assert backend.runtime == info["encoder"] == info["decoder"] == "eager"
    image, box, _, _ = spleen_slice
    emb = backend.encode(image)
    out = backend.decode(emb, backend.geometry(*image.shape), box=box)
    ref = eager_backend.decode(eager_backend.encode(image), eager_backend.geometry(*image.shape), box=box)
    np.testing.assert_array_equal(out.logits, ref.logits)
    assert not any(tmp_path.iterdir())


@needs_ort
def test_falls_back_to_eager_when_export_fails(monkeypatch, tmp_path, caplog, spleen_slice):
    def broken_export(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::something")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    backend = SamBackend.from_model_id("litemedsam", device="cpu", runtime="onnx", onnx_cache_dir=tmp_path)
    assert backend.runtime == "onnx"  # planned; the export happens on first use
    image, box, _, _ = spleen_slice
    with caplog.at_level(logging.WARNING, logger="SAMSegmentLib.backends"):
        out = backend.decode(backend.encode(image), backend.geometry(*image.shape), box=box)
    assert out.logits.shape == image.shape and (out.logits > 0).any()
    info = backend.runtime_info()
    assert backend.runtime == info["encoder"] == info["decoder"] == "eager"
    assert "unsupported operator" in caplog.text and len(info["notes"]) == 2
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # no half-written graph is left


def test_runtime_reaches_the_backend_from_cli_and_session(monkeypatch, tmp_path):
    from SAMSegmentLib import cli

    monkeypatch.delenv(runtimes.RUNTIME_ENV, raising=False)
    base = ["segment", "ct.nii.gz", "--slice", "3", "--box", "1", "2", "30", "40", "--out", str(tmp_path / "m.nii.gz")]
    parser = cli.build_parser()
    args = parser.parse_args(base + ["--runtime", "eager"])
    with cli._session(args) as session:  # the session-building code path of segment/propagate/embed
        assert session.backend.runtime_requested == "eager"
        assert session.backend.runtime_info()["encoder"] == "eager"
    assert parser.parse_args(base).runtime is None  # unset: the backend reads $SAMSEGMENT_RUNTIME or "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--runtime", "tensorrt"])
    for command in (["embed", "ct.nii.gz"], ["propagate", "ct.nii.gz", "--out", "x.nii.gz"], ["demo", "--out", "d"]):
        assert parser.parse_args(command + ["--runtime", "onnx"]).runtime == "onnx"
