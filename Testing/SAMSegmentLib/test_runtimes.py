"""ONNX Runtime vs eager PyTorch vs the stock segment-anything decoder: same outputs on real weights
and a real CT slice; the on-disk graph cache (reuse, refusal of stale files); the fall-back to eager
when ONNX cannot be used."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch

from SAMSegmentLib import onnx_cache, runtimes, sam_graphs
from SAMSegmentLib.backends import SamBackend
from SAMSegmentLib.errors import SAMSegmentError
from SAMSegmentLib.preprocessing import IntensityWindow
from SAMSegmentLib.prompts import Prompts
from SAMSegmentLib.volume import SliceRef

# The whole module is slow: a fresh ONNX export (~10 s), eager/ONNX/stock comparisons on real weights.
pytestmark = pytest.mark.slow
needs_ort = pytest.mark.skipif(not runtimes.onnxruntime_available(), reason="onnxruntime is not installed")
LOGIT_ATOL = 1e-4


# eager_backend, onnx_backend (with its fresh export) and onnx_dir: Testing/conftest.py


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


# --------------------------------------------------------------------------- the batched decode API
def _batch_prompts(spleen_slice):
    """Three boxes and three (include, exclude) point pairs around the spleen."""
    _, box, include, exclude = spleen_slice
    boxes = np.stack([box, box + [3, -2, 5, 1], [5.0, 5.0, 60.0, 60.0]])
    points = np.stack([[include, exclude], [include + 3, box[2:] + 2], [include - 3, [1.0, 1.0]]])
    return boxes, points, np.tile([1, 0], (3, 1))


@pytest.mark.parametrize("runtime, path", [("eager", "auto"), pytest.param("onnx", "auto", marks=needs_ort),
                                           pytest.param("onnx", "eager", marks=needs_ort)])
def test_decode_batch_decodes_each_prompt_set(request, spleen_slice, spleen_embedding, runtime, path):
    """B prompt sets in one call give what B one-set calls give, on either decoder path."""
    backend = request.getfixturevalue(f"{runtime}_backend")
    geom = backend.geometry(*spleen_slice[0].shape)
    boxes, points, labels = _batch_prompts(spleen_slice)
    key = object()
    emb = spleen_embedding
    low, iou = backend.decode_batch(emb, geom, points, labels, boxes, features_key=key, path=path, eager_batch=3)
    assert low.shape == (3, 1, 256, 256) and iou.shape == (3, 1)
    for b in range(3):
        one, _ = backend.decode_batch(emb, geom, points[b:b + 1], labels[b:b + 1], boxes[b:b + 1], features_key=key,
                                      path=path)
        torch.testing.assert_close(low[b:b + 1], one, atol=LOGIT_ATOL, rtol=0)  # batched GEMMs round differently
    multi, multi_iou = backend.decode_batch(emb, geom, points[:, :1], labels[:, :1], multimask=True, path=path)
    assert multi.shape == (3, 3, 256, 256) and multi_iou.shape == (3, 3)
    refined, _ = backend.decode_batch(emb, geom, boxes=boxes, mask_input=low, path=path)
    assert refined.shape == (3, 1, 256, 256) and not torch.equal(refined, low)


def test_decode_is_the_one_prompt_wrapper(eager_backend, spleen_slice, spleen_embedding):
    image, _, include, _ = spleen_slice
    geom = eager_backend.geometry(*image.shape)
    multi, multi_iou = eager_backend.decode_batch(spleen_embedding, geom, include[None, None], np.ones((1, 1)),
                                                  multimask=True)
    out = eager_backend.decode(spleen_embedding, geom, include[None], np.ones(1), multimask=True)
    best = int(torch.argmax(multi_iou[0]))
    assert out.score == pytest.approx(float(multi_iou[0, best]))
    torch.testing.assert_close(out.low_res_logits, multi[:, best:best + 1], atol=1e-6, rtol=0)
    with torch.inference_mode():
        full = geom.low_res_to_slice(out.low_res_logits, 256)[0, 0].numpy()
    assert out.logits.shape == image.shape
    np.testing.assert_allclose(out.logits, full, atol=1e-6, rtol=0)


def test_decode_batch_refuses_mismatched_prompts(eager_backend, spleen_slice, spleen_embedding):
    geom = eager_backend.geometry(*spleen_slice[0].shape)
    boxes, points, _ = _batch_prompts(spleen_slice)
    emb = spleen_embedding
    with pytest.raises(SAMSegmentError, match="different sizes"):
        eager_backend.decode_batch(emb, geom, points[:2], None, boxes)
    with pytest.raises(SAMSegmentError, match=r"\(B, N, 2\)"):
        eager_backend.decode_batch(emb, geom, points[0], None)
    with pytest.raises(SAMSegmentError, match=r"\(B, 4\)"):
        eager_backend.decode_batch(emb, geom, boxes=boxes[0])
    with pytest.raises(SAMSegmentError, match="Unknown decode path"):
        eager_backend.decode_batch(emb, geom, boxes=boxes, path="gpu")


# --------------------------------------------------------------------------- against stock segment-anything
@pytest.fixture(scope="session")
def stock_decoder():
    """segment-anything's own PromptEncoder and MaskDecoder (unpatched), in LiteMedSAM's configuration,
    loaded from the same LiteMedSAM weights."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    from SAMSegmentLib.model_build import load_state_dict
    from SAMSegmentLib.model_registry import get_spec, resolve_weights

    state = load_state_dict(resolve_weights(get_spec("litemedsam")))
    pe = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16)
    md = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                                                                            num_heads=8),
                     transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    for module, prefix in ((pe, "prompt_encoder."), (md, "mask_decoder.")):
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    assert type(md.output_upscaling) is torch.nn.Sequential  # the stock layer, not ours
    return pe.eval(), md.eval()


def _stock_decode(stock, emb, geom, rounding, points=None, labels=None, boxes=None, mask_input=None, multimask=False):
    """SamPredictor.predict_torch's two calls, on prompts mapped into the model frame as the backend maps them."""
    pe, md = stock
    point_arg = None
    if points is not None:
        coords = geom.points_to_model(points.reshape(-1, 2)).reshape(points.shape)
        point_arg = (torch.as_tensor(coords, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64))
    box_arg = None
    if boxes is not None:
        box_arg = torch.as_tensor(np.stack([geom.box_to_model(b, rounding) for b in boxes]), dtype=torch.float32)
    with torch.inference_mode():
        sparse, dense = pe(points=point_arg, boxes=box_arg, masks=mask_input)
        return md(image_embeddings=emb.float(), image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                  dense_prompt_embeddings=dense, multimask_output=multimask)


STOCK_CASES = ["box", "points", "box+points", "box+mask", "points+mask", "points-multimask", "three-boxes"]


def _stock_case(kind, box, include, exclude, first_low):
    """decode_batch keyword arguments of one comparison with the stock decoder."""
    if kind == "three-boxes":
        return {"boxes": _batch_prompts((None, box, include, exclude))[0]}
    kwargs = {}
    if "box" in kind:
        kwargs["boxes"] = box[None]
    if "points" in kind:
        kwargs.update(points=np.stack([include, exclude])[None], labels=np.array([[1, 0]]))
    if kind.endswith("mask"):
        kwargs["mask_input"] = first_low
    kwargs["multimask"] = kind.endswith("multimask")
    return kwargs


@pytest.mark.parametrize("runtime", ["eager", pytest.param("onnx", marks=needs_ort)])
@pytest.mark.parametrize("kind", STOCK_CASES)
def test_decoder_matches_stock_segment_anything(request, stock_decoder, spleen_slice, spleen_embedding, runtime, kind):
    """The patched eager network and the ONNX graphs give segment-anything's own decoder outputs.

    Tolerance: fp32 rounding. The stock decoder itself is ~3e-5 away from an fp64 run at logits of
    ~30 on this slice, and ONNX Runtime orders its sums differently again."""
    backend = request.getfixturevalue(f"{runtime}_backend")
    image, box, include, exclude = spleen_slice
    geom = backend.geometry(*image.shape)
    rounding = backend.spec.box_rounding
    first_low, _ = _stock_decode(stock_decoder, spleen_embedding, geom, rounding, boxes=box[None])
    kwargs = _stock_case(kind, box, include, exclude, first_low)
    want_low, want_iou = _stock_decode(stock_decoder, spleen_embedding, geom, rounding, **kwargs)
    low, iou = backend.decode_batch(spleen_embedding, geom, features_key=object(), **kwargs)
    torch.testing.assert_close(low, want_low, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(iou, want_iou, atol=1e-5, rtol=0)
    clear = want_low.abs() > 10 * LOGIT_ATOL  # a pixel can only flip where the logit is ~0
    assert torch.equal((low > 0)[clear], (want_low > 0)[clear])


def test_channels_last_upscaling_is_the_stock_layer(stock_decoder):
    """The upscaling rewrite (NCHW forward and the graph's channels-last mask product) against the
    stock ConvTranspose2d / LayerNorm2d / GELU sequence, with the stock decoder's weights."""
    _, md = stock_decoder
    stock = md.output_upscaling
    ours = sam_graphs.ChannelsLastUpscaling(*stock)
    assert set(dict(ours.named_parameters())) == set(dict(stock.named_parameters()))  # same state-dict keys
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(1, 64 * 64, 256, generator=gen)
    x = tokens.transpose(1, 2).view(1, 256, 64, 64)  # the decoder's own (strided) view
    hyper_in = torch.randn(4, 32, generator=gen)
    with torch.inference_mode():
        want = stock(x)
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=0)
        want_masks = (hyper_in @ want.view(1, 32, -1)).view(1, 4, 256, 256)
        torch.testing.assert_close(ours.masks(tokens[0], hyper_in, 64, 64), want_masks, atol=1e-4, rtol=0)


@pytest.mark.parametrize("with_mask", [False, True])
def test_graph_modules_compute_what_the_stock_decoder_computes(stock_decoder, eager_backend, with_mask):
    """The exported modules in PyTorch, plain and with the first layer fed precomputed slice features
    (the mask embedding's projection factored through its 16 channels), against the stock
    ``PromptEncoder`` + ``MaskDecoder.predict_masks`` on the same tokens, for the masks asked for."""
    pe, md = eager_backend.net.prompt_encoder, eager_backend.net.mask_decoder
    assert sam_graphs.first_layer_split(pe, md)
    plain = sam_graphs.prompt_decoder_module(pe, md)
    split = sam_graphs.prompt_decoder_module(pe, md, split_first_layer=True)
    features = sam_graphs.slice_features_module(pe, md)
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 256, 64, 64, generator=gen)
    coords = torch.tensor([[[30.0, 40.0], [20.0, 25.0], [190.0, 120.0]]])  # an exclude point and a box
    labels = torch.tensor([[0.0, 2.0, 3.0]])
    mask = torch.randn(1, 1, 256, 256, generator=gen) * 4 if with_mask else torch.zeros(1, 1, 4, 4)
    has = torch.ones(1) if with_mask else torch.zeros(1)
    stock_pe, stock_md = stock_decoder
    with torch.inference_mode():
        sparse, dense = stock_pe(points=(coords[:, :1], labels[:, :1].long()), boxes=coords[:, 1:].reshape(1, 4),
                                 masks=mask if with_mask else None)
        want_masks, want_iou = stock_md.predict_masks(image_embeddings=emb, image_pe=stock_pe.get_dense_pe(),
                                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        masks, iou = plain(emb, coords, labels, mask, has)
        torch.testing.assert_close(iou, want_iou, atol=1e-5, rtol=0)
        torch.testing.assert_close(masks, want_masks, atol=1e-4, rtol=1e-5)
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
def test_cached_graphs_are_reused_without_export(onnx_backend, onnx_dir, monkeypatch):
    folders = {part: onnx_backend._graphs[part].path.parent for part in ("encoder", "decoder", "features")}
    mtimes = {part: (f / onnx_cache.MODEL_FILE).stat().st_mtime_ns for part, f in folders.items()}

    def no_export(*args, **kwargs):
        raise AssertionError("a cached graph was exported again")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    again = SamBackend.from_model_id("litemedsam", device="cpu", runtime="onnx", onnx_cache_dir=onnx_dir)
    info = again.prepare_runtime()
    assert info["encoder"] == info["decoder"] == "onnx" and "notes" not in info
    assert not info["encoder_exported_now"] and not info["decoder_exported_now"] and not info["features_exported_now"]
    assert {p: (f / onnx_cache.MODEL_FILE).stat().st_mtime_ns for p, f in folders.items()} == mtimes
    signature = json.loads((folders["encoder"] / onnx_cache.SIGNATURE_FILE).read_text())
    assert signature["weights_sha256"] == again.spec.weights["sha256"]
    assert signature["torch"] == torch.__version__ and signature["opset"] == onnx_cache.ONNX_OPSET
    assert onnx_cache.signature_hash(signature) in folders["encoder"].name


@needs_ort
@pytest.mark.parametrize("damage", ["signature", "model"])
def test_stale_or_corrupt_graph_is_exported_again(onnx_backend, onnx_dir, caplog, damage):
    folder = onnx_backend._graphs["decoder"].path.parent
    encoder_file = onnx_backend._graphs["encoder"].path
    encoder_mtime = encoder_file.stat().st_mtime_ns
    if damage == "signature":  # e.g. a file left by another torch build under the same name
        sig = json.loads((folder / onnx_cache.SIGNATURE_FILE).read_text())
        (folder / onnx_cache.SIGNATURE_FILE).write_text(json.dumps({**sig, "torch": "0.0.0"}))
    else:  # truncated by a crash
        data = (folder / onnx_cache.MODEL_FILE).read_bytes()
        (folder / onnx_cache.MODEL_FILE).write_bytes(data[: len(data) // 3])
    with caplog.at_level(logging.WARNING, logger="SAMSegmentLib.onnx_cache"):
        again = SamBackend.from_model_id("litemedsam", device="cpu", runtime="onnx", onnx_cache_dir=onnx_dir)
        info = again.prepare_runtime()
    assert info["decoder"] == "onnx" and info["decoder_exported_now"] and not info["encoder_exported_now"]
    assert encoder_file.stat().st_mtime_ns == encoder_mtime  # the valid encoder graph was not touched
    assert "exporting it again" in caplog.text
    assert json.loads((folder / onnx_cache.SIGNATURE_FILE).read_text())["torch"] == torch.__version__


def test_signature_names_the_folder(tmp_path):
    pytest.importorskip("onnxruntime")
    base = onnx_cache.export_signature("litemedsam", "litemedsam", 256, "encoder", "ab" * 32)
    other_weights = onnx_cache.export_signature("litemedsam", "litemedsam", 256, "encoder", "cd" * 32)
    other_torch = {**base, "torch": "1.0"}
    folders = {onnx_cache.artifact_dir(tmp_path, s) for s in (base, other_weights, other_torch)}
    assert len(folders) == 3
    assert all(f.name.startswith("litemedsam-encoder-") for f in folders)


def test_user_checkpoint_digest_is_remembered(tmp_path):
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights")
    import hashlib

    assert onnx_cache.weights_digest(ckpt, tmp_path / "c") == hashlib.sha256(b"weights").hexdigest()
    assert (tmp_path / "c" / "weights-sha256.json").exists()
    ckpt.write_bytes(b"other weights")  # new size and mtime: hashed again
    assert onnx_cache.weights_digest(ckpt, tmp_path / "c") == hashlib.sha256(b"other weights").hexdigest()
    assert onnx_cache.weights_digest(ckpt, tmp_path / "c", known_sha256="f" * 64) == "f" * 64


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
