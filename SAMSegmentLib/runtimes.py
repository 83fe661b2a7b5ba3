"""Inference runtimes behind ``SamBackend``: eager PyTorch, or ONNX Runtime graphs exported once.

On a CPU, ONNX Runtime runs the same weights faster than eager PyTorch (bench/runtimes.py, 2
cores, one run: LiteMedSAM encoder 0.92 s vs 1.48 s, prompt encoder + mask decoder 53 ms vs
92 ms; random-weight SAM ViT-B encoder ~10 s vs ~16 s) with logits within 1e-4 of eager. The
graphs are exported from the loaded network on first use (LiteMedSAM ~5 s, ViT-B ~35 s, once)
and kept in a cache folder; each one lives in its own folder whose name carries a hash of its
signature (model id, weights sha256, torch and onnxruntime versions, opset, export format), and
the full signature is stored beside it and compared on load. A file whose signature does not match, or
that ONNX Runtime cannot open, is exported again, never used. Anything that goes wrong (no
onnxruntime, an export the tracer cannot handle, an unwritable cache folder, a graph that does
not reproduce the eager outputs) logs a warning and leaves that part on eager PyTorch.

SAM-layout decoders (LiteMedSAM, SAM, MedSAM) run as two graphs: ``features`` (once per slice:
the first decoder layer's projections of the image tokens, which no prompt changes) and
``decoder`` (per prompt, taking them as inputs): cached prompt -> mask 38 -> 30 ms on 2 cores
(bench/pipeline.py). If the features graph cannot be used, PyTorch computes the same inputs.

Selection: ``runtime="auto"`` (default; also settable with ``$SAMSEGMENT_RUNTIME``) picks ONNX
Runtime on a CPU device when ``onnxruntime`` imports, eager PyTorch on CUDA/MPS (the CPU
execution provider would move every tensor off the GPU); on CPU it keeps the ViT-L/H image
encoders eager (``AUTO_ONNX_ENCODERS``). ``"eager"`` and ``"onnx"`` force one for both parts.
torch.compile and bf16 are deliberately absent from "auto" (bench/pipeline.py, 2 cores, no bf16
instructions): bf16 autocast took ~90 s per slice and lowered mask Dice vs fp32 by 0.02; torch.compile
(fp32, exact) needed ~60 s to compile and was still 2x slower than ONNX Runtime.

Cache folder: the ``cache_dir`` argument, else ``$SAMSEGMENT_CACHE/onnx``, else
``$XDG_CACHE_HOME/samsegment/onnx``, else ``~/.cache/samsegment/onnx``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import SAMSegmentError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "eager", "onnx")
RUNTIME_ENV = "SAMSEGMENT_RUNTIME"
CACHE_ENV = "SAMSEGMENT_CACHE"
ONNX_OPSET = 17
# Bump whenever the exported graphs change (wrapper code, inputs, outputs): old files are then stale.
EXPORT_FORMAT = 2
MODEL_FILE = "model.onnx"
SIGNATURE_FILE = "signature.json"
# Exported graphs are checked against eager PyTorch once, on the export's own example input.
VERIFY_RTOL = 1e-3

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("image_embeddings",)
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")
DECODER_OUTPUTS = ("masks", "iou_predictions")
# SAM-layout decoders run as two graphs: per-slice features once, then the decoder per prompt.
FEATURES_INPUTS = ("image_embeddings",)
FEATURES_OUTPUTS = ("image_tokens", "image_keys", "image_values", "image_queries")
SPLIT_DECODER_INPUTS = FEATURES_OUTPUTS + DECODER_INPUTS[1:] + ("mask_index",)
# Token labels of the decoder graph: SAM's prompt encoder vocabulary.
LABEL_PADDING, LABEL_EXCLUDE, LABEL_INCLUDE, LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3

# Encoders that "auto" runs in ONNX Runtime. Measured on 2 cores: LiteMedSAM 1.6x and ViT-B 1.7x
# faster than eager; ViT-H no faster (63 s vs 64 s per slice) for a 170 s export peaking at 10 GB,
# so ViT-L/H encoders stay eager unless "onnx" is asked for. Every decoder is the same small graph.
AUTO_ONNX_ENCODERS = ("litemedsam", "vit_b")

# How many graphs this process exported, by (model id, part); tests read it to prove a cache hit.
export_counts: Counter = Counter()
_export_lock = threading.Lock()


# ----------------------------------------------------------------------------- selection
def requested_runtime(runtime: str | None = None) -> str:
    """The runtime asked for: ``runtime``, else ``$SAMSEGMENT_RUNTIME``, else "auto"; validated."""
    value = runtime if runtime not in (None, "") else os.environ.get(RUNTIME_ENV, "") or "auto"
    value = str(value).strip().lower()
    if value not in RUNTIMES:
        raise SAMSegmentError(f"Unknown runtime {value!r}", f"use one of {', '.join(RUNTIMES)}")
    return value


def onnxruntime_available() -> bool:
    """True when ``import onnxruntime`` works (it can be missing, or broken by a bad wheel)."""
    try:
        import onnxruntime  # noqa: F401
    except Exception as exc:  # ImportError, or an OSError from a missing shared library
        log.debug("onnxruntime is not usable: %s", exc)
        return False
    return True


def resolve_runtime(runtime: str | None, device: str) -> str:
    """"onnx" or "eager" for a requested runtime on ``device`` ("cpu", "cuda:0", "mps", ...)."""
    requested = requested_runtime(runtime)
    if requested == "eager":
        return "eager"
    kind = str(device).split(":")[0]
    if kind != "cpu":
        if requested == "onnx":
            log.warning("ONNX Runtime is used on CPU only; the %s device runs eager PyTorch", device)
        return "eager"
    if not onnxruntime_available():
        if requested == "onnx":
            log.warning("onnxruntime is not installed (pip install onnxruntime); running eager PyTorch")
        return "eager"
    return "onnx"


def part_runtimes(runtime: str | None, device: str, architecture: str) -> dict[str, str]:
    """"onnx" or "eager" for the encoder and the decoder of one model (see ``resolve_runtime``)."""
    resolved = resolve_runtime(runtime, device)
    parts = {"encoder": resolved, "decoder": resolved}
    if resolved == "onnx" and requested_runtime(runtime) == "auto" and architecture not in AUTO_ONNX_ENCODERS:
        parts["encoder"] = "eager"
    return parts


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "samsegment" / "onnx"


# ----------------------------------------------------------------------------- signatures
def weights_digest(weights_path: str | Path, cache_dir: str | Path, known_sha256: str | None = None) -> str:
    """sha256 of a checkpoint file, remembered per (path, size, mtime) so a 2.5 GB ViT-H file is
    hashed once, not at every start. ``known_sha256`` (already verified by the caller) is used as is."""
    if known_sha256:
        return known_sha256
    from .model_registry import sha256_of

    path = Path(weights_path).resolve()
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo_path = Path(cache_dir) / "weights-sha256.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(str(path)) if isinstance(memo, dict) else None
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) and entry.get("sha256"):
        return str(entry["sha256"])
    digest = sha256_of(path)
    memo = memo if isinstance(memo, dict) else {}
    memo[str(path)] = {**stamp, "sha256": digest}
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        _atomic_write_text(memo_path, json.dumps(memo, indent=1))
    except OSError as exc:  # a read-only cache only costs a re-hash next time
        log.debug("could not remember the weights digest in %s: %s", memo_path, exc)
    return digest


def export_signature(model_id: str, architecture: str, image_size: int, part: str,
                     weights_sha256: str) -> dict[str, Any]:
    """Everything an exported graph depends on; a file is used only when all of it matches."""
    import onnxruntime
    import torch

    return {"format": EXPORT_FORMAT, "part": part, "model_id": model_id, "architecture": architecture,
            "image_size": int(image_size), "weights_sha256": weights_sha256, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": ONNX_OPSET, "exporter": "torchscript"}


def signature_hash(signature: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def artifact_dir(cache_dir: str | Path, signature: dict[str, Any]) -> Path:
    safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", str(signature["model_id"]))
    return Path(cache_dir) / f"{safe_id}-{signature['part']}-{signature_hash(signature)}"


# ----------------------------------------------------------------------------- ONNX Runtime sessions
def session_options(threads: int | None = None):
    """ORT options: as many intra-op threads as torch uses, sequential graph, all graph optimisations,
    no busy-waiting."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's pool threads otherwise spin after each run; on 2 cores that stole the CPU from the torch
    # ops that follow (eager decode 175 ms right after an ORT call vs 95 ms) and ORT was no faster for it.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    return opts


@dataclass
class OnnxGraph:
    """One exported graph loaded in ONNX Runtime."""

    part: str
    path: Path
    signature: dict[str, Any]
    session: Any  # onnxruntime.InferenceSession
    exported: bool  # True when this process exported it, False when it came from the disk cache

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


def _open_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(), providers=["CPUExecutionProvider"])


def _read_signature(folder: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((folder / SIGNATURE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def load_or_export(part: str, signature: dict[str, Any], cache_dir: str | Path,
                   build_module: Callable[[], Any], example_inputs: Sequence[Any],
                   input_names: Sequence[str], output_names: Sequence[str],
                   dynamic_axes: dict[str, dict[int, str]] | None = None,
                   check_inputs: Sequence[Sequence[Any]] = ()) -> OnnxGraph:
    """The cached graph for ``signature`` if it is valid, otherwise a fresh export (verified
    against eager PyTorch on ``example_inputs`` and each of ``check_inputs``). Raises on failure;
    the caller falls back."""
    folder = artifact_dir(cache_dir, signature)
    with _export_lock:
        if folder.exists():
            found = _read_signature(folder)
            if found == signature:
                try:
                    graph = OnnxGraph(part, folder / MODEL_FILE, signature, _open_session(folder / MODEL_FILE), False)
                    log.info("%s %s: using cached ONNX graph %s", signature["model_id"], part, folder)
                    return graph
                except Exception as exc:  # truncated or corrupted file
                    log.warning("Cached ONNX graph %s cannot be opened (%s); exporting it again", folder,
                                str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
            else:
                differs = sorted(k for k in signature if (found or {}).get(k) != signature[k])
                log.warning("Cached ONNX graph %s has a different signature (%s); exporting it again", folder,
                            ", ".join(differs) if found else "signature missing or unreadable")
            shutil.rmtree(folder, ignore_errors=True)
        return _export(part, signature, folder, build_module, example_inputs, input_names, output_names,
                       dynamic_axes, check_inputs)


def _export(part: str, signature: dict[str, Any], folder: Path, build_module: Callable[[], Any],
            example_inputs: Sequence[Any], input_names: Sequence[str], output_names: Sequence[str],
            dynamic_axes: dict[str, dict[int, str]] | None, check_inputs: Sequence[Sequence[Any]] = ()) -> OnnxGraph:
    import warnings

    import torch

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        module = build_module()
        log.info("exporting the %s of %s to ONNX (once; cached in %s)", part, signature["model_id"], folder)
        traced: list[Any] = []  # the tracer's own forward pass is the reference for the example input
        hook = module.register_forward_hook(lambda _m, _i, out: traced.append(out))
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
                # The TorchScript exporter handles these models as they are; models over 2 GB (ViT-H)
                # get their weights written as external data files beside model.onnx.
                torch.onnx.export(module, tuple(example_inputs), str(tmp / MODEL_FILE), input_names=list(input_names),
                                  output_names=list(output_names), dynamic_axes=dynamic_axes or {},
                                  opset_version=ONNX_OPSET, do_constant_folding=True, dynamo=False)
        finally:
            hook.remove()
        export_counts[(signature["model_id"], part)] += 1
        session = _open_session(tmp / MODEL_FILE)
        _verify(part, module, session, example_inputs, input_names, output_names, traced[0] if traced else None)
        for inputs in check_inputs:
            _verify(part, module, session, inputs, input_names, output_names)
        del session  # closed before the folder is renamed (Windows cannot rename open or mapped files)
        _atomic_write_text(tmp / SIGNATURE_FILE, json.dumps(signature, indent=1, sort_keys=True))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same export first: use its copy if valid
            if _read_signature(folder) != signature:
                raise
        _prune_stale(folder, signature)
        return OnnxGraph(part, folder / MODEL_FILE, signature, _open_session(folder / MODEL_FILE), True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _verify(part: str, module: Any, session: Any, inputs: Sequence[Any], input_names: Sequence[str],
            output_names: Sequence[str], expected: Any = None) -> None:
    """Raise unless the ORT session reproduces the PyTorch module (or its ``expected`` outputs) on ``inputs``."""
    import torch

    if expected is None:
        with torch.inference_mode():
            expected = module(*inputs)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    got = session.run(None, {name: _to_numpy(x) for name, x in zip(input_names, inputs)})
    for name, want, have in zip(output_names, expected, got):
        want = _to_numpy(want)
        if want.shape != have.shape:
            raise SAMSegmentError(f"the exported {part} graph's {name} has shape {have.shape}, PyTorch {want.shape}")
        err = float(np.max(np.abs(want - have))) if want.size else 0.0
        tol = VERIFY_RTOL * max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
        if not np.isfinite(err) or err > tol:
            raise SAMSegmentError(f"the exported {part} graph's {name} differs from PyTorch by {err:.3g} "
                                  f"(tolerance {tol:.3g})")


def _prune_stale(folder: Path, signature: dict[str, Any]) -> None:
    """Delete graphs of the same model, part and weights made by other versions (they can never match again)."""
    prefix = folder.name.rsplit("-", 1)[0] + "-"
    for other in folder.parent.glob(prefix + "*"):
        if other == folder or not other.is_dir() or other.name.startswith("."):
            continue
        found = _read_signature(other) or {}
        if all(found.get(k) == signature[k] for k in ("model_id", "part", "weights_sha256")):
            shutil.rmtree(other, ignore_errors=True)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().to("cpu").contiguous().numpy()
    return np.ascontiguousarray(x)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}_{threading.get_ident()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- exportable graphs
def prompt_decoder_module(prompt_encoder: Any, mask_decoder: Any, split_first_layer: bool = False):
    """Prompt encoder + mask decoder as one traceable module with fixed-type inputs.

    Inputs: ``image_embeddings`` (1, 256, 64, 64); ``point_coords`` (1, N, 2) in the model input
    frame; ``point_labels`` (1, N) float with 1 include, 0 exclude, 2/3 box corners, -1 padding;
    ``mask_input`` low-res logits (1, 1, 256, 256) with ``has_mask_input`` (1,) = 1, or any
    (1, 1, 4, 4) array with ``has_mask_input`` = 0 (its dense embedding is then SAM's "no mask"
    vector, broadcast over the grid: the same numbers without convolving a 256x256 zero mask).
    Outputs: all mask logits (1, M, 256, 256) and predicted IoUs (1, M); mask 0 is the single-mask
    output, 1..M-1 the multimask ones.

    Given the same tokens (``prompt_tokens``) it computes what ``PromptEncoder.forward`` +
    ``MaskDecoder.predict_masks`` compute: label tests are written as arithmetic so that one graph
    serves points, boxes, both, and a mask input or none; and the mask upscaling (two 2x2
    stride-2 transposed convolutions around a channel LayerNorm) runs channels-last as matrix
    products on the transformer's token-major output, with one small reorder of the final (M,
    256x256) logits, instead of transposing 32- and 64-channel feature maps (in ONNX Runtime a
    third of the decoder's time went to Transpose and strided ReduceMean; 80-90 ms -> 45-55 ms).

    ``split_first_layer`` (needs ``first_layer_split``): the inputs start with the slice's
    ``image_tokens``, ``image_keys``, ``image_values``, ``image_queries`` from
    ``slice_features_module`` instead of ``image_embeddings`` (the first layer uses them instead of
    projecting the image tokens), and end with ``mask_index`` (K,) int64, the masks to upscale:
    the outputs are then those K masks (1, K, 256, 256) and all M predicted IoUs. Upscaling and
    reordering the three multimask outputs nobody asked for was ~1 ms of a single-mask call.
    """
    import torch

    tail = _channels_last_upscaling(mask_decoder)
    if split_first_layer and not first_layer_split(prompt_encoder, mask_decoder):
        raise ValueError("this decoder's layout does not allow splitting its first layer")

    class PromptDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pe_layer = prompt_encoder.pe_layer
            self.input_size = tuple(int(v) for v in prompt_encoder.input_image_size)
            self.mask_downscaling = prompt_encoder.mask_downscaling
            self.mask_decoder = mask_decoder
            with torch.no_grad():
                self.register_buffer("not_a_point", prompt_encoder.not_a_point_embed.weight.detach().clone())
                self.register_buffer("label_embeddings",
                                     torch.cat([e.weight.detach() for e in prompt_encoder.point_embeddings]).clone())
                no_mask = prompt_encoder.no_mask_embed.weight.detach().reshape(1, -1, 1, 1)
                self.register_buffer("no_mask", no_mask.clone())
                self.register_buffer("image_pe", prompt_encoder.get_dense_pe().detach().clone())
            self.tail = tail

        def sparse(self, point_coords, point_labels):
            labels = point_labels.unsqueeze(-1)
            pe = self.pe_layer.forward_with_coords(point_coords + 0.5, self.input_size)
            sparse = pe * (labels != LABEL_PADDING).to(pe.dtype)
            sparse = sparse + self.not_a_point * (labels == LABEL_PADDING).to(pe.dtype)
            for i in range(self.label_embeddings.shape[0]):
                sparse = sparse + self.label_embeddings[i] * (labels == i).to(pe.dtype)
            dec = self.mask_decoder
            tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0).unsqueeze(0)
            return sparse, torch.cat([tokens, sparse], dim=1)

        def heads(self, hs, src_tokens, h: int, w: int, mask_index=None):
            dec = self.mask_decoder
            iou_pred = dec.iou_prediction_head(hs[:, 0, :])
            hyper_in = torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)],
                                   dim=1)[0]  # (M, C2)
            if mask_index is not None:
                hyper_in = hyper_in.index_select(0, mask_index)
            return self.tail(src_tokens[0], hyper_in, h, w), iou_pred

        def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
            sparse, tokens = self.sparse(point_coords, point_labels)
            has = has_mask_input.reshape(1, 1, 1, 1)
            dense = has * self.mask_downscaling(mask_input) + (1.0 - has) * self.no_mask
            if self.tail is None:
                return self.mask_decoder.predict_masks(image_embeddings=image_embeddings, image_pe=self.image_pe,
                                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
            src = image_embeddings + dense
            b, c, h, w = src.shape
            hs, src_tokens = self.mask_decoder.transformer(src, self.image_pe, tokens)  # src_tokens: (1, h*w, c)
            return self.heads(hs, src_tokens, h, w)

    class SplitPromptDecoder(PromptDecoder):
        def __init__(self) -> None:
            super().__init__()
            layer = mask_decoder.transformer.layers[0]
            self.head = torch.nn.Sequential(*list(prompt_encoder.mask_downscaling)[:-1])  # -> (1, 16, 64, 64)
            last = prompt_encoder.mask_downscaling[-1]
            with torch.no_grad():
                w3 = last.weight.detach()[:, :, 0, 0].t()  # (16, 256): dense = h @ w3 + b3
                b3 = last.bias.detach()
                no_mask = prompt_encoder.no_mask_embed.weight.detach()[0]
                self.register_buffer("pe_tokens", self.image_pe.flatten(2).permute(0, 2, 1).clone())
                self.register_buffer("w_dense", w3.clone())
                self.register_buffer("b_dense", b3.clone())
                self.register_buffer("no_mask_token", no_mask.clone())
                for name, proj in (("k", layer.cross_attn_token_to_image.k_proj),
                                   ("v", layer.cross_attn_token_to_image.v_proj),
                                   ("q", layer.cross_attn_image_to_token.q_proj)):
                    wt = proj.weight.detach().t()  # (256, 128)
                    self.register_buffer(f"m_{name}", (w3 @ wt).clone())  # the mask embedding's share, factored
                    self.register_buffer(f"c_{name}", (b3 @ wt).clone())
                    self.register_buffer(f"n_{name}", (no_mask @ wt).clone())  # the "no mask" vector's share
            self.layer = layer
            self.grid = tuple(int(v) for v in prompt_encoder.image_embedding_size)

        def forward(self, image_tokens, image_keys, image_values, image_queries,  # type: ignore[override]
                    point_coords, point_labels, mask_input, has_mask_input, mask_index):
            _, tokens = self.sparse(point_coords, point_labels)
            has = has_mask_input.reshape(1, 1, 1)
            h16 = self.head(mask_input).flatten(2).permute(0, 2, 1)  # (1, cells, 16); 1 cell for the placeholder
            h, w = self.grid
            keys = image_tokens + (has * (h16 @ self.w_dense + self.b_dense) + (1.0 - has) * self.no_mask_token)

            def shifted(base, name):
                m, cst, n = (getattr(self, f"{p}_{name}") for p in ("m", "c", "n"))
                return base + (has * (h16 @ m + cst) + (1.0 - has) * n)

            layer = self.layer  # TwoWayAttentionBlock.forward, first layer (no query PE in self attention)
            queries = layer.norm1(layer.self_attn(q=tokens, k=tokens, v=tokens))
            t2i = layer.cross_attn_token_to_image
            queries = layer.norm2(queries + _attend(t2i, t2i.q_proj(queries + tokens), shifted(image_keys, "k"),
                                                    shifted(image_values, "v")))
            queries = layer.norm3(queries + layer.mlp(queries))
            i2t = layer.cross_attn_image_to_token
            q = queries + tokens
            keys = layer.norm4(keys + _attend(i2t, shifted(image_queries, "q"), i2t.k_proj(q), i2t.v_proj(queries)))
            transformer = self.mask_decoder.transformer
            for later in transformer.layers[1:]:
                queries, keys = later(queries=queries, keys=keys, query_pe=tokens, key_pe=self.pe_tokens)
            attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + self.pe_tokens, v=keys)
            queries = transformer.norm_final_attn(queries + attn_out)
            return self.heads(queries, keys, h, w, mask_index)

    return (SplitPromptDecoder() if split_first_layer else PromptDecoder()).eval()


def first_layer_split(prompt_encoder: Any, mask_decoder: Any) -> bool:
    """Whether the decoder has the layout ``slice_features_module`` and ``prompt_decoder_module``'s
    split first layer assume: SAM's two-way transformer (first layer without query PE on its self
    attention), its mask downscaling ending in a 1x1 convolution, its channels-last upscaling."""
    import torch

    transformer = getattr(mask_decoder, "transformer", None)
    layers = getattr(transformer, "layers", None)
    head = getattr(prompt_encoder, "mask_downscaling", None)
    if not layers or not getattr(layers[0], "skip_first_layer_pe", False) or not isinstance(head, torch.nn.Sequential):
        return False
    last = head[-1]
    if not (isinstance(last, torch.nn.Conv2d) and last.kernel_size == (1, 1) and last.bias is not None):
        return False
    attns = (layers[0].cross_attn_token_to_image, layers[0].cross_attn_image_to_token)
    projections = [getattr(a, n, None) for a in attns for n in ("q_proj", "k_proj", "v_proj")]
    return all(isinstance(m, torch.nn.Linear) for m in projections) and _channels_last_upscaling(mask_decoder) is not None


def slice_features_module(prompt_encoder: Any, mask_decoder: Any):
    """The decoder's first-layer projections of the image tokens, which no prompt changes.

    In SAM's decoder the first layer projects the 64x64 image tokens (+ positional encoding)
    three times (token->image keys and values, image->token queries) before any prompt token
    meets them: three of the ten 4096x256x128 products of a decode, at the CPU's matmul peak.
    Computed once per slice here; ``prompt_decoder_module(split_first_layer=True)`` takes them as
    inputs and adds the only prompt-dependent part, the dense (mask) embedding's projection,
    through its 16-channel factor (the mask embedding is a 1x1 convolution of 16 channels, so
    ``W (x + dense) = W x + (W W3) h``: a 4096x16x128 product instead of 4096x256x128).
    Input ``image_embeddings`` (1, 256, 64, 64); outputs the embedding token-major,
    ``image_tokens`` (1, 4096, 256), which the decoder would otherwise transpose at every call,
    and ``image_keys``, ``image_values``, ``image_queries`` (1, 4096, 128 with SAM's 2x attention
    downsampling).
    """
    import torch

    layer = mask_decoder.transformer.layers[0]

    class SliceFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            with torch.no_grad():
                self.register_buffer("pe", prompt_encoder.get_dense_pe().detach().flatten(2).permute(0, 2, 1).clone())
            self.t2i, self.i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token

        def forward(self, image_embeddings):
            x = image_embeddings.flatten(2).permute(0, 2, 1)
            xp = x + self.pe
            return x.contiguous(), self.t2i.k_proj(xp), self.t2i.v_proj(x), self.i2t.q_proj(xp)

    return SliceFeatures().eval()


def _attend(attention: Any, q: Any, k: Any, v: Any) -> Any:
    """SAM's ``Attention.forward`` after its three input projections (given here)."""
    import math

    import torch

    q, k, v = (attention._separate_heads(t, attention.num_heads) for t in (q, k, v))
    attn = torch.softmax((q @ k.permute(0, 1, 3, 2)) / math.sqrt(q.shape[-1]), dim=-1)
    return attention.out_proj(attention._recombine_heads(attn @ v))


def _channels_last_upscaling(mask_decoder: Any):
    """A module computing ``hyper_in @ output_upscaling(src)`` from token-major ``src`` (h*w, C)
    when ``output_upscaling`` is SAM's [ConvT 2x2/2, LayerNorm2d, act, ConvT 2x2/2, act]; None for
    any other layout (the decoder's own ``predict_masks`` is exported then)."""
    import torch
    import torch.nn.functional as F

    seq = getattr(mask_decoder, "output_upscaling", None)
    if not isinstance(seq, torch.nn.Sequential) or len(seq) != 5:
        return None
    conv1, norm, act1, conv2, act2 = seq
    for conv in (conv1, conv2):
        if not (isinstance(conv, torch.nn.ConvTranspose2d) and conv.kernel_size == (2, 2) and conv.stride == (2, 2)
                and conv.padding == (0, 0) and conv.groups == 1 and conv.dilation == (1, 1)
                and conv.output_padding == (0, 0) and conv.bias is not None):
            return None
    if not all(hasattr(norm, a) for a in ("weight", "bias", "eps")) or isinstance(norm, torch.nn.LayerNorm):
        return None

    class ChannelsLastUpscaling(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            with torch.no_grad():
                # ConvTranspose weight (C_in, C_out, 2, 2) -> (C_in, 2*2*C_out) with columns ordered (dy, dx, c_out)
                self.register_buffer("w1", conv1.weight.detach().permute(0, 2, 3, 1).reshape(conv1.in_channels, -1))
                self.register_buffer("b1", conv1.bias.detach().clone())
                self.register_buffer("w2", conv2.weight.detach().permute(0, 2, 3, 1).reshape(conv2.in_channels, -1))
                self.register_buffer("b2", conv2.bias.detach().clone())
                self.register_buffer("norm_weight", norm.weight.detach().clone())
                self.register_buffer("norm_bias", norm.bias.detach().clone())
            self.eps = float(norm.eps)
            self.act1, self.act2 = act1, act2
            self.c1, self.c2 = conv1.out_channels, conv2.out_channels

        def forward(self, src_tokens, hyper_in, h: int, w: int):
            # rows: (i, j) grid cells; after step 1 (i, j, a, b); after step 2 (i, j, a, b, c, d)
            x = (src_tokens @ self.w1).reshape(-1, self.c1) + self.b1
            x = self.act1(F.layer_norm(x, (self.c1,), self.norm_weight, self.norm_bias, self.eps))
            x = self.act2((x @ self.w2).reshape(-1, self.c2) + self.b2)
            m = hyper_in.shape[0]
            masks = (x @ hyper_in.t()).reshape(h, w, 2, 2, 2, 2, m)  # (i, j, a, b, c, d, mask)
            # output row 4i + 2a + c, column 4j + 2b + d
            return masks.permute(6, 0, 2, 4, 1, 3, 5).reshape(1, m, 4 * h, 4 * w)

    return ChannelsLastUpscaling()


def prompt_tokens(points_model: np.ndarray | None, labels: np.ndarray | None,
                  box_model: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The decoder graph's (coords (1, N, 2), labels (1, N)) for prompts in the model frame, in the
    order SAM's prompt encoder builds them: points, a padding token when there is no box, box
    corners. None when the prompt has no token the graph knows (no prompt at all, odd labels)."""
    coords: list[np.ndarray] = []
    labs: list[np.ndarray] = []
    if points_model is not None and len(points_model):
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        if not np.isin(lab, (LABEL_EXCLUDE, LABEL_INCLUDE)).all():
            return None
        coords.append(np.asarray(points_model, dtype=np.float32).reshape(-1, 2))
        labs.append(lab.astype(np.float32))
        if box_model is None:
            coords.append(np.zeros((1, 2), np.float32))
            labs.append(np.array([LABEL_PADDING], np.float32))
    if box_model is not None:
        coords.append(np.asarray(box_model, dtype=np.float32).reshape(2, 2))
        labs.append(np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], np.float32))
    if not coords:
        return None
    return np.concatenate(coords)[None], np.concatenate(labs)[None]
