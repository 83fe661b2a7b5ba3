"""Model loading, checkpoint safety and equivalence with the upstream LiteMedSAM recipe."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SAMSegmentLib.backends import SamBackend
from SAMSegmentLib.errors import CheckpointError, ModelNotFoundError, SAMSegmentError
from SAMSegmentLib.model_build import detect_architecture, load_state_dict
from SAMSegmentLib.model_registry import get_spec, load_registry, resolve_weights
from SAMSegmentLib.preprocessing import IntensityWindow
from SAMSegmentLib.prompts import Prompts
from SAMSegmentLib.volume import SliceRef


# --------------------------------------------------------------------------- upstream recipe
def upstream_litemedsam_logits(net, img_2d_uint8: np.ndarray, box: np.ndarray,
                               embedding_dtype: torch.dtype = torch.float32) -> np.ndarray:
    """The LiteMedSAM CVPR24 inference recipe, written out step by step as published.

    ``embedding_dtype``: the image embedding is rounded to it before decoding (float16: the
    precision the session's embedding cache keeps, for every decode).

    3-channel uint8 image -> cv2 INTER_AREA resize of the longest side to 256 -> min-max to [0, 1]
    -> zero pad to 256x256 -> encoder; box * 256/max(H, W) truncated with int(); single-mask
    decoder; logits cropped to the resized size and bilinearly resized to (H, W).
    """
    import cv2

    H, W = img_2d_uint8.shape
    img_3c = np.repeat(img_2d_uint8[:, :, None], 3, axis=-1)
    scale = 256 * 1.0 / max(H, W)
    newh, neww = int(H * scale + 0.5), int(W * scale + 0.5)
    img_256 = cv2.resize(img_3c, (neww, newh), interpolation=cv2.INTER_AREA)
    img_256 = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
    padded = np.pad(img_256, ((0, 256 - newh), (0, 256 - neww), (0, 0)))
    tensor = torch.tensor(padded).float().permute(2, 0, 1).unsqueeze(0)
    box256 = np.array([int(v * (256 / max(H, W))) for v in box], dtype=np.float64)[None, ...]
    with torch.no_grad():
        embedding = net.image_encoder(tensor).to(embedding_dtype).float()
        box_torch = torch.as_tensor(box256[None, ...], dtype=torch.float)
        sparse, dense = net.prompt_encoder(points=None, boxes=box_torch, masks=None)
        low_res, _ = net.mask_decoder(image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
        low_res = low_res[..., :newh, :neww]
        full = F.interpolate(low_res, size=(H, W), mode="bilinear", align_corners=False)
    return full[0, 0].numpy()


@pytest.mark.slow  # the upstream recipe on full sample-CT slices
@pytest.mark.parametrize("axis", [0, 1])
def test_box_prompt_matches_upstream_recipe(backend, session, sample_ct, axis):
    vol, lab, names = sample_ct
    spleen = lab == names["spleen"]
    counts = np.moveaxis(spleen, axis, 0).reshape(spleen.shape[axis], -1).sum(1)
    index = int(np.argmax(counts))
    ref = SliceRef(axis, index)
    window = IntensityWindow.from_level_width(40, 400)
    session.set_volume(vol, window=window)
    ys, xs = np.nonzero(np.take(spleen, index, axis))
    plane_h, plane_w = np.take(spleen, index, axis).shape
    box = np.array([max(xs.min() - 2.0, 0), max(ys.min() - 2.0, 0), min(xs.max() + 2.0, plane_w - 1),
                    min(ys.max() + 2.0, plane_h - 1)])
    ours = session.decode(ref, Prompts(box=box))  # the box as given (predict adds the model's margin)
    image = np.take(window.apply(vol), index, axis)
    theirs = upstream_litemedsam_logits(backend.net, image, box, torch.float16)
    assert ours.logits.shape == theirs.shape == image.shape
    # PyTorch decodes exactly as the recipe; ONNX Runtime's fused kernels differ in the 4th digit
    np.testing.assert_allclose(ours.logits, theirs, atol=1e-4 if backend.runtime == "eager" else 2e-3, rtol=0)
    assert np.array_equal(ours.mask, theirs > 0)
    # the fp16 embedding (half the cache memory) against the recipe's own fp32 one: same mask but
    # for a few boundary pixels
    fp32 = upstream_litemedsam_logits(backend.net, image, box) > 0
    assert (ours.mask != fp32).sum() <= max(3, 0.005 * fp32.sum())
    # and the mask is a good one: the reference spleen on that slice
    truth = np.take(spleen, index, axis)
    assert 2 * (ours.mask & truth).sum() / (ours.mask.sum() + truth.sum()) > 0.85


# --------------------------------------------------------------------------- registry and weights
def test_registry_is_data_with_default_first():
    reg = load_registry()
    assert {"litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"} <= set(reg)
    assert reg["litemedsam"].weights["source"] == "package"
    with pytest.raises(ModelNotFoundError, match="Unknown model 'nope'.*litemedsam"):
        get_spec("nope")


def test_packaged_weights_are_verified(tmp_path):
    spec = get_spec("litemedsam")
    path = resolve_weights(spec)
    assert path.stat().st_size == spec.weights["size"]
    from dataclasses import replace

    tampered = replace(spec, weights={**spec.weights, "sha256": "0" * 64})
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_weights(tampered)


def test_user_model_without_checkpoint_says_what_to_do():
    with pytest.raises(CheckpointError, match="needs a checkpoint file you supply") as err:
        SamBackend.from_model_id("sam_vit_b", device="cpu")
    assert "--checkpoint" in err.value.remedy


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SamBackend.from_model_id("sam_vit_b", checkpoint=tmp_path / "nope.pth", device="cpu")


def test_truncated_checkpoint(tmp_path):
    src = resolve_weights(get_spec("litemedsam"))
    cut = tmp_path / "lite_truncated.pth"
    with open(src, "rb") as fin, open(cut, "wb") as fout:
        fout.write(fin.read(1_000_000))
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        SamBackend.from_model_id("litemedsam", checkpoint=cut, device="cpu")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_state_dict(empty)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="other than tensors"):
        load_state_dict(evil)
    assert "must never run" not in capsys.readouterr().out
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}))  # a non-zip pickle is not a checkpoint either
    with pytest.raises(CheckpointError):
        load_state_dict(raw)


def test_wrong_architecture_named(tmp_path):
    lite = resolve_weights(get_spec("litemedsam"))
    with pytest.raises(CheckpointError, match="is a litemedsam model.*needs architecture vit_b") as err:
        SamBackend.from_model_id("sam_vit_b", checkpoint=lite, device="cpu")
    assert "--model litemedsam" in err.value.remedy
    # a ViT-L shaped state dict offered as ViT-B (detection reads widths and depth only)
    fake_l = {"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}
    fake_l.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(24)})
    path = tmp_path / "vit_l_like.pth"
    torch.save(fake_l, path)
    with pytest.raises(CheckpointError, match="is a vit_l model") as err:
        SamBackend.from_model_id("sam_vit_b", checkpoint=path, device="cpu")
    assert "sam_vit_l" in err.value.remedy
    unknown = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, unknown)
    with pytest.raises(CheckpointError, match="not a SAM-family model"):
        SamBackend.from_model_id("litemedsam", checkpoint=unknown, device="cpu")


@pytest.fixture(scope="module")
def random_vit_b_checkpoint(tmp_path_factory):
    """A randomly initialised SAM ViT-B saved in the official key layout (as a {'model': ...} wrapper
    and with DataParallel 'module.' prefixes, both seen in the wild)."""
    from segment_anything.build_sam import sam_model_registry

    torch.manual_seed(0)
    net = sam_model_registry["vit_b"](checkpoint=None)
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_random.pth"
    torch.save({"model": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


@pytest.mark.slow  # builds a 375 MB ViT-B, loads it twice, a 1024² encode
def test_vit_b_checkpoint_loads_and_runs_for_sam_and_medsam(random_vit_b_checkpoint):
    assert detect_architecture(load_state_dict(random_vit_b_checkpoint)) == "vit_b"
    # eager: the test is about loading and running; exporting a ViT-B graph would take ~35 s
    sam = SamBackend.from_model_id("sam_vit_b", checkpoint=random_vit_b_checkpoint, device="cpu", runtime="eager")
    image = (np.random.default_rng(0).random((60, 90)) * 255).astype(np.uint8)
    x = sam.prepare_image(image)
    assert x.shape == (1, 3, 1024, 1024)
    assert torch.all(x[..., 683:, :] == 0)  # 60/90*1024 = 682.7 rows kept, the rest is padding
    emb = sam.encode(image)
    assert tuple(emb.shape) == (1, 256, 64, 64)
    out = sam.decode(emb, sam.geometry(60, 90), points=np.array([[45.0, 30.0]]), labels=np.array([1]),
                     multimask=True)
    assert out.logits.shape == (60, 90) and np.isfinite(out.logits).all()
    medsam = SamBackend.from_model_id("medsam_vit_b", checkpoint=random_vit_b_checkpoint, device="cpu",
                                      runtime="eager")
    xm = medsam.prepare_image(image)
    assert float(xm.min()) == 0.0 and float(xm.max()) == 1.0  # stretched to fill 1024x1024, min-max scaled
    with pytest.raises(CheckpointError, match="vit_b model.*needs architecture vit_h"):
        SamBackend.from_model_id("sam_vit_h", checkpoint=random_vit_b_checkpoint, device="cpu")


def test_device_selection():
    from SAMSegmentLib.device import available_devices, select_device

    assert select_device("cpu") == "cpu"
    assert select_device(None) == available_devices()[0]
    with pytest.raises(SAMSegmentError, match="Unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SAMSegmentError, match="not available"):
            select_device("cuda")
