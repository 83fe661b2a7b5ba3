"""The predictor boundary: ``encode`` a slice once, then decode any number of prompts on it.

``SamBackend`` is to this engine what ``SamPredictor`` is to segment-anything: it takes a model
built by ``model_build.build_model`` and is the only code that runs the image encoder, the prompt
encoder and the mask decoder. ``decode_batch`` is the one decode primitive (B prompt sets on one
embedding, SAM's ``predict_torch``); ``decode`` is its one-prompt wrapper with full-resolution
logits. Everything mode, prompt uncertainty and SAMAug decode through ``decode_batch``.

Each part runs in eager PyTorch or as an ONNX Runtime graph (``runtime="auto"|"eager"|"onnx"``,
see ``runtimes``); ``encode`` and the decodes take and return the same things either way. The
decoder graph takes one prompt set per run, so ``decode_batch`` loops over the prompts there and
sends them through eager PyTorch in batches otherwise.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable

import numpy as np

from .device import select_device
from .model_build import build_model
from .model_registry import ModelSpec, get_spec
from .preprocessing import SliceGeometry
from .runtimes import part_runtimes, requested_runtime

if TYPE_CHECKING:
    from .adaptation import DecoderAdapter

log = logging.getLogger(__name__)

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
LOW_RES_SIZE = 256
EMBEDDING_SHAPE = (256, 64, 64)
# Slices whose decoder features (10 MiB each for SAM's decoder) stay ready: the slice being
# prompted and the one before it.
FEATURES_CACHE_SLICES = 2
# Prompt sets per eager decoder call by default: one call per batch pays on a GPU; on a CPU larger
# batches were slower per prompt (bench/everything.py).
EAGER_BATCH_GPU, EAGER_BATCH_CPU = 64, 1
DECODE_PATHS = ("auto", "onnx", "eager")
# Adapted decoders: their ONNX graphs live in this sub-folder of the graph cache; this many adapters'
# graphs stay loaded, and this many graph folders stay on disk (the oldest go).
ADAPTER_GRAPH_FOLDER = "adapters"
ADAPTER_GRAPHS_KEPT = 2
ADAPTER_GRAPHS_ON_DISK = 8


@dataclass
class DecodeResult:
    """Decoder output for one prompt set: full-resolution logits, score and the low-res logits for refinement."""

    logits: np.ndarray  # (H, W) float32, > 0 means inside
    score: float  # the decoder's predicted IoU
    low_res_logits: Any  # torch.Tensor (1, 1, 256, 256), model frame, on the CPU


@dataclass(frozen=True)
class _ModelPrompts:
    """A batch of prompt sets in the model's input frame."""

    size: int
    coords: np.ndarray | None  # (B, N, 2) float64
    labels: np.ndarray | None  # (B, N) int64
    boxes: np.ndarray | None  # (B, 4) float64
    mask_input: Any  # torch.Tensor (B, 1, L, L) or None


class SamBackend:
    """One loaded model: preprocessing, image encoder, prompt encoder and mask decoder."""

    def __init__(self, spec: ModelSpec, checkpoint: str | Path | None = None, device: str | None = None,
                 runtime: str | None = None, onnx_cache_dir: str | Path | None = None) -> None:
        """Build the model of ``spec`` (``model_build.build_model``) and plan its runtimes.

        Args:
            spec: the registry entry.
            checkpoint: a user checkpoint; None for the registry's weights.
            device: "cpu", "cuda", "cuda:N", "mps" or None (the best available).
            runtime: "auto" (default, or ``$SAMSEGMENT_RUNTIME``), "eager" or "onnx". ONNX graphs are
                exported on first use (or ``prepare_runtime()``) and reused from ``onnx_cache_dir``.
            onnx_cache_dir: the graph cache (default ``onnx_cache.default_cache_dir()``).
        """
        import torch

        from .sam_graphs import first_layer_split

        device = select_device(device)
        self.runtime_requested = requested_runtime(runtime)
        model = build_model(spec, checkpoint, device)
        self.spec = spec
        self.device = model.device
        self.net = model.net
        self.weights_path = model.weights_path
        self._weights_sha256 = model.weights_sha256
        self.eager_batch_size = EAGER_BATCH_CPU if str(self.device).startswith("cpu") else EAGER_BATCH_GPU
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
        # ONNX decoding of SAM-layout decoders: per-slice features (sam_graphs.slice_features_module),
        # kept for the last few slices decoded, so repeated prompts on a slice skip that work
        self._decoder_split = first_layer_split(self.net.prompt_encoder, self.net.mask_decoder)
        self._features_eager: Any = None
        self._features: OrderedDict[Hashable, tuple[np.ndarray, ...]] = OrderedDict()
        self._features_lock = threading.Lock()
        # ONNX graphs of adapted decoders (``prepare_adapter``), by adapter digest; None: that adapter
        # decodes in eager PyTorch (no decoder graph, or its export failed)
        self._adapter_graphs: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self._adapter_export_lock = threading.Lock()

    @classmethod
    def from_model_id(cls, model_id: str, checkpoint: str | Path | None = None, device: str | None = None,
                      extra_registry: str | Path | None = None, runtime: str | None = None,
                      onnx_cache_dir: str | Path | None = None) -> "SamBackend":
        """The backend of a registry model id; ``extra_registry`` is a user models.json to search
        as well. The other arguments are those of ``SamBackend``."""
        return cls(get_spec(model_id, extra_registry), checkpoint, device, runtime, onnx_cache_dir)

    @property
    def model_id(self) -> str:
        return self.spec.id

    @property
    def model_sha256(self) -> str:
        """sha256 of the loaded weights file (the registry's verified digest, else hashed once and
        remembered beside the ONNX graphs): what an adapter is tied to."""
        if self._weights_sha256 is None:
            from . import onnx_cache

            self._weights_sha256 = onnx_cache.weights_digest(self.weights_path, self.onnx_cache_dir
                                                             or onnx_cache.default_cache_dir())
        return self._weights_sha256

    # ----------------------------------------------------------------------------- runtime
    @property
    def decoder_runtime(self) -> str:
        """"onnx" or "eager": what runs the prompt encoder + mask decoder (loads the graphs if not yet done)."""
        self.prepare_runtime()
        return self._part_runtime["decoder"]

    def prepare_runtime(self) -> dict[str, Any]:
        """Load the ONNX graphs now, exporting them if the cache has no valid copy.

        Otherwise the first ``encode``/decode does it. Never raises: a part that cannot run in ONNX
        Runtime stays on eager PyTorch with a warning.

        Returns:
            ``runtime_info()``.
        """
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
        """What runs where, for logs, the GUI and benchmarks (does not load anything).

        Returns:
            "requested", "runtime", "ready", "encoder" and "decoder" ("onnx" | "eager"); per loaded
            graph ``<part>_graph`` (its path) and ``<part>_exported_now``; "notes" on fall-backs.
        """
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
        from . import onnx_cache
        from .sam_graphs import export_recipe

        if self._part_runtime.get(part, self._part_runtime["decoder"]) != "onnx":
            return
        try:
            cache_dir = self.onnx_cache_dir or onnx_cache.default_cache_dir()
            digest = onnx_cache.weights_digest(self.weights_path, cache_dir, self._weights_sha256)
            signature = onnx_cache.export_signature(self.spec.id, self.spec.architecture, self.spec.image_size, part,
                                                    digest)
            recipe = export_recipe(part, self.net, self.spec.image_size, self._decoder_split)
            self._graphs[part] = onnx_cache.load_or_export(part, signature, cache_dir, recipe)
        except Exception as exc:  # noqa: BLE001 - any failure means eager, never a crash
            first = str(exc).splitlines()[0] if str(exc) else ""
            if part == "features":  # the decoder graph still runs; its inputs come from PyTorch
                log.warning("%s slice features: ONNX Runtime not used (%s); computing them in PyTorch", self.spec.id,
                            f"{exc.__class__.__name__}: {first}")
                self._runtime_notes.append(f"features: {exc.__class__.__name__}: {first}")
                return
            self._fall_back(part, f"{exc.__class__.__name__}: {first}")

    def _graph(self, part: str) -> Any:
        """The loaded ONNX graph of ``part``, or None when that part runs eager."""
        if not self._runtime_ready:
            self.prepare_runtime()
        return self._graphs.get(part) if self._part_runtime[part] == "onnx" else None

    def geometry(self, height: int, width: int) -> SliceGeometry:
        """How a (height, width) slice maps into this model's input and back."""
        return SliceGeometry(height, width, self.spec.image_size, self.spec.resize)

    # ----------------------------------------------------------------------------- preprocessing
    def prepare_image(self, image: np.ndarray) -> Any:
        """The encoder input of a slice, exactly as the model was trained.

        Args:
            image: uint8 (H, W) slice.

        Returns:
            (1, 3, S, S) float32 tensor, resized (``spec.resize``, ``spec.interpolation``),
            normalised (``spec.normalization``) and zero-padded bottom/right.
        """
        import torch
        import torch.nn.functional as F

        geom = self.geometry(*image.shape)
        new_h, new_w = geom.scaled_size
        rgb = np.repeat(np.asarray(image)[:, :, None], 3, axis=2)
        if self.spec.interpolation == "area":
            import cv2

            resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA).astype(np.float64)
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
    def encode(self, image: np.ndarray) -> Any:
        """The image embedding of a slice.

        Args:
            image: uint8 (H, W) slice.

        Returns:
            (1, 256, 64, 64) float32 tensor on the model device.

        Raises:
            MemoryBudgetError: the device ran out of memory.
        """
        import torch

        from .errors import MemoryBudgetError

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
                return self.net.image_encoder(tensor)
        except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU
            raise MemoryBudgetError(f"The {self.device} ran out of memory encoding a {image.shape} slice",
                                    "close other GPU programs, use a smaller model, or --device cpu") from exc

    def decode_batch(self, embedding: Any, geom: SliceGeometry, points: np.ndarray | None = None,
                     labels: np.ndarray | None = None, boxes: np.ndarray | None = None, mask_input: Any = None,
                     multimask: bool = False, features_key: Hashable | None = None, *, path: str = "auto",
                     eager_batch: int = 0, adapter: DecoderAdapter | None = None) -> tuple[Any, Any]:
        """Decode B prompt sets on one embedding (SAM's ``predict_torch``).

        The decoder's ONNX Runtime graph runs one prompt set at a time; eager PyTorch takes
        ``eager_batch`` of them per call (the decoder repeats the embedding per prompt set).

        Args:
            embedding: (1, 256, 64, 64) image embedding (``encode``; any float dtype).
            geom: the slice's geometry (``geometry``); prompts are in its slice pixels.
            points: (B, N, 2) points (x, y), or None.
            labels: (B, N) labels of ``points``: 1 include, 0 exclude; None: all include.
            boxes: (B, 4) boxes (x0, y0, x1, y1), or None. Boxes are used as given (no margin).
            mask_input: (B, 1, 256, 256) low-res logits of earlier masks, or None.
            multimask: return SAM's three multimask outputs instead of the single-mask output.
            features_key: names ``embedding``: the same key must always mean the same embedding (the
                embedding cache's key, or an ``object()`` held while one embedding is decoded many
                times), so that the slice's prompt-independent decoder features are computed once.
            path: "auto" (ONNX Runtime when the decoder runs there, else eager), or "onnx" / "eager"
                to ask for one (benchmarks, tests); "onnx" without a decoder graph runs eager.
            eager_batch: prompt sets per eager decoder call; 0: ``eager_batch_size`` (64 on a GPU,
                1 on a CPU).
            adapter: decode with this adapted decoder (``adaptation``) instead of the stock one:
                through its own ONNX graphs where the decoder runs in ONNX Runtime (``prepare_adapter``),
                else (and with ``path`` "eager") in PyTorch.

        Returns:
            (low-res logits (B, C, 256, 256), predicted IoU (B, C)), float32 tensors on the model
            device, C = 3 with ``multimask`` else 1.

        Raises:
            SAMSegmentError: prompt arrays of the wrong shape or different batch sizes.
        """
        if path not in DECODE_PATHS:
            from .errors import SAMSegmentError

            raise SAMSegmentError(f"Unknown decode path {path!r}", f"use one of {', '.join(DECODE_PATHS)}")
        prompts = self._model_prompts(geom, points, labels, boxes, mask_input)
        if adapter is not None:
            graphs = None if path == "eager" else self.prepare_adapter(adapter)
            if graphs is not None:
                key = None if features_key is None else (adapter.digest, features_key)
                out = self._decode_onnx(graphs["decoder"], embedding, prompts, multimask, key, graphs["features"])
                if out is not None:
                    return out
            return self._decode_eager(embedding, prompts, multimask, eager_batch or self.eager_batch_size,
                                      adapter.modules(self))
        graph = None if path == "eager" else self._graph("decoder")
        if graph is not None:
            out = self._decode_onnx(graph, embedding, prompts, multimask, features_key)
            if out is not None:
                return out
        return self._decode_eager(embedding, prompts, multimask, eager_batch or self.eager_batch_size)

    def prepare_adapter(self, adapter: DecoderAdapter) -> dict[str, Any] | None:
        """The ONNX graphs of an adapted decoder, exported (once per adapter, kept in the graph cache's
        ``adapters`` folder) when the stock decoder runs in ONNX Runtime.

        Sessions call this when an adapter comes into use, so the first decode does not wait for the
        export. Never raises: without a decoder graph, or when the export fails (a warning), the
        adapter decodes in eager PyTorch.

        Returns:
            {"features": graph, "decoder": graph} ("features" None for decoders without the split), or None.
        """
        digest = adapter.digest
        with self._runtime_lock:
            if digest in self._adapter_graphs:
                self._adapter_graphs.move_to_end(digest)
                return self._adapter_graphs[digest]
        with self._adapter_export_lock:  # one export at a time; a second caller finds its result
            with self._runtime_lock:
                if digest in self._adapter_graphs:
                    return self._adapter_graphs[digest]
            return self._prepare_adapter(adapter, digest)

    def _prepare_adapter(self, adapter: DecoderAdapter, digest: str) -> dict[str, Any] | None:
        graphs = None
        if self._graph("decoder") is not None and (not self._decoder_split or "features" in self._graphs):
            try:
                graphs = self._export_adapter(adapter)
            except Exception as exc:  # noqa: BLE001 - any failure means eager, never a crash
                first = str(exc).splitlines()[0] if str(exc) else ""
                log.warning("adapted decoder: ONNX Runtime not used (%s: %s); decoding it in PyTorch",
                            exc.__class__.__name__, first)
                self._runtime_notes.append(f"adapted decoder: {exc.__class__.__name__}: {first}")
        with self._runtime_lock:
            self._adapter_graphs[digest] = graphs
            while len(self._adapter_graphs) > ADAPTER_GRAPHS_KEPT:
                self._adapter_graphs.popitem(last=False)
        return graphs

    def _export_adapter(self, adapter: DecoderAdapter) -> dict[str, Any]:
        from types import SimpleNamespace

        from . import onnx_cache
        from .sam_graphs import export_recipe

        cache_dir = (self.onnx_cache_dir or onnx_cache.default_cache_dir()) / ADAPTER_GRAPH_FOLDER
        pe, md = adapter.modules(self)
        net = SimpleNamespace(prompt_encoder=pe, mask_decoder=md, image_encoder=None)
        graphs: dict[str, Any] = {"features": None}
        for part in (("features", "decoder") if self._decoder_split else ("decoder",)):
            signature = onnx_cache.export_signature(self.spec.id, self.spec.architecture, self.spec.image_size, part,
                                                    adapter.digest)
            recipe = export_recipe(part, net, self.spec.image_size, self._decoder_split)
            graphs[part] = onnx_cache.load_or_export(part, signature, cache_dir, recipe)
            os.utime(graphs[part].path.parent)  # used now: the newest for prune_oldest
        onnx_cache.prune_oldest(cache_dir, ADAPTER_GRAPHS_ON_DISK)
        return graphs

    def decode(self, embedding: Any, geom: SliceGeometry, points: np.ndarray | None = None,
               labels: np.ndarray | None = None, box: np.ndarray | None = None, mask_input: Any = None,
               multimask: bool = False, features_key: Hashable | None = None,
               adapter: DecoderAdapter | None = None) -> DecodeResult:
        """Decode one prompt set: ``decode_batch`` with B = 1, mapped back to the slice.

        Args:
            embedding: as for ``decode_batch``.
            geom: as for ``decode_batch``.
            points: (N, 2) points in slice pixels, or None.
            labels: (N,) labels of ``points`` (1 include, 0 exclude).
            box: (4,) box in slice pixels, used as given, or None.
            mask_input: (1, 1, 256, 256) low-res logits of an earlier mask, or None.
            multimask: decode SAM's three multimask outputs and keep the one with the highest
                predicted IoU.
            features_key: as for ``decode_batch``.
            adapter: as for ``decode_batch``.

        Returns:
            The mask's full-resolution logits, predicted IoU and low-res logits.
        """
        import torch

        has_points = points is not None and len(points) > 0
        low_res, iou = self.decode_batch(
            embedding, geom, np.asarray(points, dtype=np.float64).reshape(1, -1, 2) if has_points else None,
            None if labels is None or not has_points else np.asarray(labels).reshape(1, -1),
            None if box is None else np.asarray(box, dtype=np.float64).reshape(1, 4), mask_input, multimask,
            features_key, adapter=adapter)
        best = int(torch.argmax(iou[0])) if multimask else 0
        score = float(iou[0, best])
        if multimask:  # a copy: the history keeps one mask, not the three
            low_res = low_res[:, best:best + 1].clone()
        with torch.inference_mode():
            full = geom.low_res_to_slice(low_res, LOW_RES_SIZE)
        return DecodeResult(full[0, 0].float().cpu().numpy(), score, low_res.float().cpu())

    # ----------------------------------------------------------------------------- decode internals
    def _model_prompts(self, geom: SliceGeometry, points: np.ndarray | None, labels: np.ndarray | None,
                       boxes: np.ndarray | None, mask_input: Any) -> _ModelPrompts:
        """Validate a batch of prompt sets and map it into the model frame."""
        from .errors import SAMSegmentError

        coords = labs = scaled = None
        sizes: list[int] = []
        if points is not None:
            pts = np.asarray(points, dtype=np.float64)
            if pts.ndim != 3 or pts.shape[-1] != 2:
                raise SAMSegmentError(f"Points of shape {pts.shape} in a batch decode", "give (B, N, 2) points")
            labs = (np.ones(pts.shape[:2], np.int64) if labels is None
                    else np.asarray(labels, dtype=np.int64).reshape(pts.shape[:2]))
            coords = geom.points_to_model(pts.reshape(-1, 2)).reshape(pts.shape)
            sizes.append(len(pts))
        if boxes is not None:
            bx = np.asarray(boxes, dtype=np.float64)
            if bx.ndim != 2 or bx.shape[-1] != 4:
                raise SAMSegmentError(f"Boxes of shape {bx.shape} in a batch decode", "give (B, 4) boxes")
            scaled = np.stack([geom.box_to_model(b, self.spec.box_rounding) for b in bx]).reshape(-1, 4)
            sizes.append(len(bx))
        if mask_input is not None:
            sizes.append(int(mask_input.shape[0]))
        if len(set(sizes)) > 1:
            raise SAMSegmentError(f"Prompt batches of different sizes {sizes} (points, boxes, mask inputs)",
                                  "give one box and one mask input per point set")
        return _ModelPrompts(sizes[0] if sizes else 1, coords, labs, scaled, mask_input)

    def _decode_eager(self, embedding: Any, p: _ModelPrompts, multimask: bool, batch: int,
                      modules: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
        """Decode in PyTorch with the stock prompt encoder and mask decoder, or ``modules``."""
        import torch

        dev = self.device
        pe, md = modules if modules is not None else (self.net.prompt_encoder, self.net.mask_decoder)
        lows, ious = [], []
        with torch.inference_mode():
            emb = embedding.to(dev, torch.float32)
            if self._dense_pe is None:
                self._dense_pe = pe.get_dense_pe()
            for start in range(0, p.size, batch):
                sl = slice(start, start + batch)
                point_arg = None
                if p.coords is not None:
                    point_arg = (torch.as_tensor(p.coords[sl], dtype=torch.float32, device=dev),
                                 torch.as_tensor(p.labels[sl], device=dev))
                box_arg = None if p.boxes is None else torch.as_tensor(p.boxes[sl], dtype=torch.float32, device=dev)
                mask_arg = None if p.mask_input is None else p.mask_input[sl].to(dev, torch.float32)
                sparse, dense = pe(points=point_arg, boxes=box_arg, masks=mask_arg)
                low, iou = md(image_embeddings=emb, image_pe=self._dense_pe, sparse_prompt_embeddings=sparse,
                              dense_prompt_embeddings=dense, multimask_output=multimask)
                lows.append(low)
                ious.append(iou)
        if len(lows) == 1:
            return lows[0], ious[0]
        return torch.cat(lows), torch.cat(ious)

    def _decode_onnx(self, graph: Any, embedding: Any, p: _ModelPrompts, multimask: bool,
                     features_key: Hashable | None, features_graph: Any = None) -> tuple[Any, Any] | None:
        """``decode_batch`` through the decoder graph, one prompt set per run; None for the rare
        prompts it does not cover (eager PyTorch decodes those). ``features_graph``: the features
        graph belonging to ``graph`` when it is not the stock one (an adapted decoder's)."""
        import torch

        from .sam_graphs import FEATURES_OUTPUTS, prompt_tokens

        tokens = [prompt_tokens(None if p.coords is None else p.coords[b], None if p.labels is None else p.labels[b],
                                None if p.boxes is None else p.boxes[b]) for b in range(p.size)]
        mask_shape = (1, *(int(v) for v in self.net.prompt_encoder.mask_input_size))
        if any(t is None for t in tokens) or (p.mask_input is not None and tuple(p.mask_input.shape[1:]) != mask_shape):
            return None
        wanted = slice(1, None) if multimask else slice(0, 1)  # SAM's MaskDecoder.forward
        if p.mask_input is None:  # any small array: the graph ignores it and broadcasts "no mask"
            masks_in = [np.zeros((1, 1, 4, 4), np.float32)] * p.size
            has_mask = np.zeros(1, np.float32)
        else:
            arr = p.mask_input.detach().to("cpu", torch.float32).contiguous().numpy()
            masks_in = [arr[b:b + 1] for b in range(p.size)]
            has_mask = np.ones(1, np.float32)
        lows, ious = [], []
        try:
            if self._decoder_split:  # the slice's features in; only the masks asked for come out
                shared = dict(zip(FEATURES_OUTPUTS, self._slice_features(embedding, features_key, features_graph)))
                shared["mask_index"] = np.arange(int(self.net.mask_decoder.num_mask_tokens), dtype=np.int64)[wanted]
            else:  # the embedding in; every mask comes out
                shared = {"image_embeddings": embedding.detach().to("cpu", torch.float32).contiguous().numpy()}
            for (coords, labels), mask in zip(tokens, masks_in):
                masks, iou = graph.run({**shared, "point_coords": coords, "point_labels": labels, "mask_input": mask,
                                        "has_mask_input": has_mask})
                lows.append(masks if self._decoder_split else masks[:, wanted])
                ious.append(iou[:, wanted])
        except Exception as exc:  # noqa: BLE001
            if features_graph is not None:  # an adapted decoder's graph: that adapter goes eager
                log.warning("adapted decoder graph failed (%s: %s); decoding it in PyTorch", exc.__class__.__name__, exc)
                return None
            self._fall_back("decoder", f"inference failed: {exc.__class__.__name__}: {exc}")
            return None
        if len(lows) == 1:
            return torch.from_numpy(np.ascontiguousarray(lows[0])), torch.from_numpy(np.ascontiguousarray(ious[0]))
        return torch.from_numpy(np.concatenate(lows)), torch.from_numpy(np.concatenate(ious))

    def _features_module(self) -> Any:
        if self._features_eager is None:
            from .sam_graphs import slice_features_module

            self._features_eager = slice_features_module(self.net.prompt_encoder, self.net.mask_decoder)
        return self._features_eager

    def _slice_features(self, embedding: Any, key: Hashable | None, graph: Any = None) -> tuple[np.ndarray, ...]:
        """The decoder graph's per-slice inputs for ``embedding``: from the small cache under ``key``,
        else computed (``graph``, an adapted decoder's features graph; else the stock features graph,
        or PyTorch when it could not be loaded) and kept there."""
        import torch

        if key is not None:
            with self._features_lock:
                found = self._features.get(key)
                if found is not None:
                    self._features.move_to_end(key)
                    return found
        emb = embedding.detach().to("cpu", torch.float32).contiguous()
        graph = graph if graph is not None else self._graphs.get("features")
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
