"""SAM's prompt encoder + mask decoder rewritten for speed and for ONNX export.

Three rewrites, each computing what SAM's own modules compute (tests compare them with the stock
segment-anything decoder):

* ``ChannelsLastUpscaling``: the decoder's mask upscaling (two 2x2 stride-2 transposed
  convolutions around a channel LayerNorm) as matrix products on token-major rows. It replaces
  ``mask_decoder.output_upscaling`` in the eager network (``patch_mask_upscaling``) and is the tail
  of the exported decoder graph.
* ``prompt_decoder_module``: prompt encoder + mask decoder as one traceable module with
  fixed-type inputs, so that one graph serves points, boxes, both, with or without a mask input.
* ``slice_features_module`` with ``prompt_decoder_module(split_first_layer=True)``: the decoder's
  first-layer projections of the image tokens, which no prompt changes, computed once per slice.

``export_recipe`` says, per part ("encoder", "features", "decoder"), what ``onnx_cache`` exports.
This module needs torch; it is imported when a model is built, never by ``import SAMSegmentLib``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .onnx_cache import GraphRecipe

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


# ----------------------------------------------------------------------------- mask upscaling
def _is_2x2_upsampler(conv: Any) -> bool:
    return (isinstance(conv, torch.nn.ConvTranspose2d) and conv.kernel_size == (2, 2) and conv.stride == (2, 2)
            and conv.padding == (0, 0) and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.output_padding == (0, 0) and conv.bias is not None)


def _upscaling_layout_ok(seq: Any) -> bool:
    """True for SAM's [ConvT 2x2/2, LayerNorm2d, act, ConvT 2x2/2, act] ``output_upscaling``."""
    if not isinstance(seq, torch.nn.Sequential) or len(seq) != 5:
        return False
    norm = seq[1]
    channel_norm = all(hasattr(norm, a) for a in ("weight", "bias", "eps")) and not isinstance(norm, torch.nn.LayerNorm)
    return _is_2x2_upsampler(seq[0]) and _is_2x2_upsampler(seq[3]) and channel_norm


def _as_matrix(conv: torch.nn.ConvTranspose2d) -> torch.Tensor:
    """A 2x2/stride-2 transposed convolution's weight (C_in, C_out, 2, 2) as (C_in, 2*2*C_out), with
    columns ordered (dy, dx, c_out): one matrix product then gives each input cell's 2x2 outputs."""
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, -1)


class ChannelsLastUpscaling(torch.nn.Sequential):
    """SAM's mask upscaling computed on token-major rows, with the same five modules (and so the
    same state-dict keys) as the ``nn.Sequential`` it replaces.

    A 2x2 stride-2 transposed convolution is one matrix product per input cell; the channel
    LayerNorm is a plain ``layer_norm`` over a row. Only the final result is reordered into
    an image, instead of transposing 64- and 32-channel feature maps at every step.
    """

    def _first(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first transposed convolution, norm and activation: rows ordered (cell, a, b), output
        pixel (2i + a, 2j + b) of input cell (i, j)."""
        conv1, norm, act1 = self[0], self[1], self[2]
        c1 = conv1.out_channels
        x = (tokens @ _as_matrix(conv1)).reshape(-1, c1) + conv1.bias
        return act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Upscaled features, one row per output pixel, from ``tokens`` (N, C) of grid cells
        (i, j): rows ordered (cell, a, b, c, d), output pixel (4i + 2a + c, 4j + 2b + d)."""
        conv2, act2 = self[3], self[4]
        return act2((self._first(tokens) @ _as_matrix(conv2)).reshape(-1, conv2.out_channels) + conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, C, h, w) -> (B, C2, 4h, 4w), as the replaced ``nn.Sequential``."""
        b, c, h, w = x.shape
        conv2, act2 = self[3], self[4]
        c1, c2 = conv2.in_channels, conv2.out_channels
        # rows of the 2x image in raster order, then the second product with columns ordered
        # (c_out, c, d): both reorders then move runs of contiguous values, not single ones
        y = self._first(x.permute(0, 2, 3, 1).reshape(-1, c))
        y = y.reshape(b, h, w, 2, 2, c1).permute(0, 1, 3, 2, 4, 5).reshape(-1, c1) @ conv2.weight.reshape(c1, -1)
        y = y.reshape(b, 2 * h, 2 * w, c2, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c2, 4 * h, 4 * w)
        return act2(y + conv2.bias.view(1, c2, 1, 1))

    def masks(self, tokens: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``hyper_in`` (M, C2) applied to the upscaled ``tokens`` (h*w, C) of one image: (1, M, 4h, 4w)
        mask logits, reordering only the M final maps."""
        m = hyper_in.shape[0]
        masks = (self.rows(tokens) @ hyper_in.t()).reshape(h, w, 2, 2, 2, 2, m)  # (i, j, a, b, c, d, mask)
        return masks.permute(6, 0, 2, 4, 1, 3, 5).reshape(1, m, 4 * h, 4 * w)


def channels_last_upscaling(mask_decoder: Any) -> ChannelsLastUpscaling | None:
    """The decoder's upscaling as a ``ChannelsLastUpscaling`` sharing its modules (itself when already
    patched); None when ``output_upscaling`` is not SAM's layout."""
    seq = getattr(mask_decoder, "output_upscaling", None)
    if isinstance(seq, ChannelsLastUpscaling):
        return seq
    return ChannelsLastUpscaling(*seq) if _upscaling_layout_ok(seq) else None


def patch_mask_upscaling(mask_decoder: Any) -> bool:
    """Replace ``mask_decoder.output_upscaling`` by its ``ChannelsLastUpscaling`` (same weights, same
    state-dict keys; PyTorch's CPU transposed-convolution kernel is slow). Returns whether it did:
    a decoder with another layout is left alone."""
    upscaling = channels_last_upscaling(mask_decoder)
    if upscaling is None:
        return False
    mask_decoder.output_upscaling = upscaling
    return True


# ----------------------------------------------------------------------------- decoder graphs
def _attend(attention: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's ``Attention.forward`` after its three input projections (given here)."""
    heads = attention.num_heads

    def separate(t: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, heads, N, C / heads)
        b, n, c = t.shape
        return t.reshape(b, n, heads, c // heads).transpose(1, 2)

    q, k, v = separate(q), separate(k), separate(v)
    attn = torch.softmax((q @ k.permute(0, 1, 3, 2)) / math.sqrt(q.shape[-1]), dim=-1)
    out = attn @ v
    b, _, n, c = out.shape
    return attention.out_proj(out.transpose(1, 2).reshape(b, n, heads * c))


class PromptDecoder(torch.nn.Module):
    """Prompt encoder + mask decoder with fixed-type inputs; see ``prompt_decoder_module``."""

    def __init__(self, prompt_encoder: Any, mask_decoder: Any) -> None:
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
        self.tail = channels_last_upscaling(mask_decoder)

    def sparse(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse prompt embeddings, decoder tokens = output tokens + sparse embeddings)."""
        labels = point_labels.unsqueeze(-1)
        pe = self.pe_layer.forward_with_coords(point_coords + 0.5, self.input_size)
        sparse = pe * (labels != LABEL_PADDING).to(pe.dtype)
        sparse = sparse + self.not_a_point * (labels == LABEL_PADDING).to(pe.dtype)
        for i in range(self.label_embeddings.shape[0]):
            sparse = sparse + self.label_embeddings[i] * (labels == i).to(pe.dtype)
        dec = self.mask_decoder
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0).unsqueeze(0)
        return sparse, torch.cat([tokens, sparse], dim=1)

    def heads(self, hs: torch.Tensor, src_tokens: torch.Tensor, h: int, w: int,
              mask_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask logits of the masks in ``mask_index`` (all when None), all predicted IoUs)."""
        dec = self.mask_decoder
        iou_pred = dec.iou_prediction_head(hs[:, 0, :])
        hyper_in = torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)],
                               dim=1)[0]  # (M, C2)
        if mask_index is not None:
            hyper_in = hyper_in.index_select(0, mask_index)
        return self.tail.masks(src_tokens[0], hyper_in, h, w), iou_pred

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, tokens = self.sparse(point_coords, point_labels)
        has = has_mask_input.reshape(1, 1, 1, 1)
        dense = has * self.mask_downscaling(mask_input) + (1.0 - has) * self.no_mask
        if self.tail is None:
            return self.mask_decoder.predict_masks(image_embeddings=image_embeddings, image_pe=self.image_pe,
                                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        src = image_embeddings + dense
        _, _, h, w = src.shape
        hs, src_tokens = self.mask_decoder.transformer(src, self.image_pe, tokens)  # src_tokens: (1, h*w, c)
        return self.heads(hs, src_tokens, h, w)


class SplitPromptDecoder(PromptDecoder):
    """``PromptDecoder`` whose first transformer layer takes the slice's precomputed features; see
    ``prompt_decoder_module(split_first_layer=True)``."""

    def __init__(self, prompt_encoder: Any, mask_decoder: Any) -> None:
        super().__init__(prompt_encoder, mask_decoder)
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

    def forward(self, image_tokens: torch.Tensor, image_keys: torch.Tensor,  # type: ignore[override]
                image_values: torch.Tensor, image_queries: torch.Tensor, point_coords: torch.Tensor,
                point_labels: torch.Tensor, mask_input: torch.Tensor, has_mask_input: torch.Tensor,
                mask_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, tokens = self.sparse(point_coords, point_labels)
        has = has_mask_input.reshape(1, 1, 1)
        h16 = self.head(mask_input).flatten(2).permute(0, 2, 1)  # (1, cells, 16); 1 cell for the placeholder
        h, w = self.grid
        keys = image_tokens + (has * (h16 @ self.w_dense + self.b_dense) + (1.0 - has) * self.no_mask_token)

        def shifted(base: torch.Tensor, name: str) -> torch.Tensor:
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


def prompt_decoder_module(prompt_encoder: Any, mask_decoder: Any, split_first_layer: bool = False) -> PromptDecoder:
    """Prompt encoder + mask decoder as one traceable module with fixed-type inputs.

    Given the same tokens (``prompt_tokens``) it computes what ``PromptEncoder.forward`` +
    ``MaskDecoder.predict_masks`` compute. Label tests are written as arithmetic, so one graph
    serves points, boxes, both, and a mask input or none; the mask upscaling runs channels-last
    (``ChannelsLastUpscaling.masks``) on the transformer's token-major output.

    Inputs: ``image_embeddings`` (1, 256, 64, 64); ``point_coords`` (1, N, 2) in the model input
    frame; ``point_labels`` (1, N) float with 1 include, 0 exclude, 2/3 box corners, -1 padding;
    ``mask_input`` low-res logits (1, 1, 256, 256) with ``has_mask_input`` (1,) = 1, or any
    (1, 1, 4, 4) array with ``has_mask_input`` = 0 (its dense embedding is then SAM's "no mask"
    vector, broadcast over the grid: the same numbers without convolving a 256x256 zero mask).
    Outputs: all mask logits (1, M, 256, 256) and predicted IoUs (1, M); mask 0 is the single-mask
    output, 1..M-1 the multimask ones.

    With ``split_first_layer`` (needs ``first_layer_split``) the inputs start with the slice's
    ``image_tokens``, ``image_keys``, ``image_values``, ``image_queries`` from
    ``slice_features_module`` instead of ``image_embeddings``, and end with ``mask_index`` (K,)
    int64, the masks to upscale: the outputs are then those K masks (1, K, 256, 256) and all M
    predicted IoUs.

    Args:
        prompt_encoder: SAM's ``PromptEncoder`` (weights are shared, not copied).
        mask_decoder: SAM's ``MaskDecoder``.
        split_first_layer: build the split variant described above.

    Returns:
        The module, in eval mode.

    Raises:
        ValueError: ``split_first_layer`` for a decoder whose layout does not allow it.
    """
    if split_first_layer:
        if not first_layer_split(prompt_encoder, mask_decoder):
            raise ValueError("this decoder's layout does not allow splitting its first layer")
        return SplitPromptDecoder(prompt_encoder, mask_decoder).eval()
    return PromptDecoder(prompt_encoder, mask_decoder).eval()


def first_layer_split(prompt_encoder: Any, mask_decoder: Any) -> bool:
    """Whether the decoder has the layout ``slice_features_module`` and the split decoder assume.

    SAM's two-way transformer (first layer without query PE on its self attention), its mask
    downscaling ending in a 1x1 convolution, and its upscaling layout.

    Args:
        prompt_encoder: SAM's ``PromptEncoder``.
        mask_decoder: SAM's ``MaskDecoder``.

    Returns:
        True when both graphs can be built for this decoder.
    """
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
    linear = all(isinstance(m, torch.nn.Linear) for m in projections)
    return linear and channels_last_upscaling(mask_decoder) is not None


class SliceFeatures(torch.nn.Module):
    """The decoder's first-layer projections of the image tokens; see ``slice_features_module``."""

    def __init__(self, prompt_encoder: Any, mask_decoder: Any) -> None:
        super().__init__()
        layer = mask_decoder.transformer.layers[0]
        with torch.no_grad():
            self.register_buffer("pe", prompt_encoder.get_dense_pe().detach().flatten(2).permute(0, 2, 1).clone())
        self.t2i, self.i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = image_embeddings.flatten(2).permute(0, 2, 1)
        xp = x + self.pe
        return x.contiguous(), self.t2i.k_proj(xp), self.t2i.v_proj(x), self.i2t.q_proj(xp)


def slice_features_module(prompt_encoder: Any, mask_decoder: Any) -> SliceFeatures:
    """The decoder's first-layer projections of the image tokens, which no prompt changes.

    In SAM's decoder the first layer projects the 64x64 image tokens (+ positional encoding)
    three times (token->image keys and values, image->token queries) before any prompt token
    meets them. Computed once per slice here; ``prompt_decoder_module(split_first_layer=True)``
    takes them as inputs and adds the only prompt-dependent part, the dense (mask) embedding's
    projection, through its 16-channel factor (the mask embedding is a 1x1 convolution of 16
    channels, so ``W (x + dense) = W x + (W W3) h``).

    Args:
        prompt_encoder: SAM's ``PromptEncoder``.
        mask_decoder: SAM's ``MaskDecoder`` (``first_layer_split`` must hold).

    Returns:
        A module, in eval mode, mapping ``image_embeddings`` (1, 256, 64, 64) to ``image_tokens``
        (1, 4096, 256; the embedding token-major) and ``image_keys``, ``image_values``,
        ``image_queries`` (1, 4096, 128 with SAM's 2x attention downsampling).
    """
    return SliceFeatures(prompt_encoder, mask_decoder).eval()


def prompt_tokens(points_model: np.ndarray | None, labels: np.ndarray | None,
                  box_model: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The decoder graph's point inputs for one prompt set given in the model frame.

    Tokens come in the order SAM's prompt encoder builds them: points, a padding token when there
    is no box, box corners.

    Args:
        points_model: (N, 2) points, or None.
        labels: (N,) labels of ``points_model``: 1 include, 0 exclude.
        box_model: (4,) box x0, y0, x1, y1, or None.

    Returns:
        (coords (1, T, 2) float32, labels (1, T) float32), or None when the prompt has no token
        the graph knows (no prompt at all, other labels).
    """
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


# ----------------------------------------------------------------------------- what gets exported
def export_recipe(part: str, net: Any, image_size: int, split: bool) -> GraphRecipe:
    """What ``onnx_cache.load_or_export`` exports for one part of a loaded SAM-family network.

    Args:
        part: "encoder" (image encoder), "features" (``slice_features_module``) or "decoder"
            (``prompt_decoder_module``, split when ``split``).
        net: the network, with ``image_encoder``, ``prompt_encoder`` and ``mask_decoder``.
        image_size: the encoder's square input size.
        split: whether the decoder graph takes the features graph's outputs (``first_layer_split``).

    Returns:
        The module factory, example inputs, input/output names, dynamic axes and the extra inputs
        the exported graph is checked on.
    """
    pe, md = net.prompt_encoder, net.mask_decoder
    gen = torch.Generator().manual_seed(0)
    if part == "encoder":
        example = (torch.rand(1, 3, image_size, image_size, generator=gen),)
        return GraphRecipe(lambda: net.image_encoder, example, ENCODER_INPUTS, ENCODER_OUTPUTS)
    if part == "features":
        example = (torch.randn(1, pe.embed_dim, *pe.image_embedding_size, generator=gen),)
        return GraphRecipe(lambda: slice_features_module(pe, md), example, FEATURES_INPUTS, FEATURES_OUTPUTS)
    emb_h, emb_w = (int(v) for v in pe.image_embedding_size)
    mask_h, mask_w = (int(v) for v in pe.mask_input_size)
    example = (torch.randn(1, pe.embed_dim, emb_h, emb_w, generator=gen),
               torch.tensor([[[30.0, 40.0], [20.0, 25.0], [90.0, 120.0]]]),
               torch.tensor([[1.0, 2.0, 3.0]]),
               torch.randn(1, 1, mask_h, mask_w, generator=gen),
               torch.tensor([1.0]))
    # checked as well: box only without a mask input (the 4x4 placeholder), points with padding
    checks: list[tuple[Any, ...]] = [
        (example[0], example[1][:, 1:], example[2][:, 1:], torch.zeros(1, 1, 4, 4), torch.zeros(1)),
        (example[0], example[1][:, :2], torch.tensor([[1.0, -1.0]]), example[3], example[4])]
    dynamic = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"},
               "mask_input": {2: "mask_height", 3: "mask_width"}}
    names = DECODER_INPUTS
    if split:  # the slice's features replace the embedding; the masks to upscale are chosen
        with torch.inference_mode():
            features = tuple(t.clone() for t in slice_features_module(pe, md)(example[0]))
        example = (*features, *example[1:], torch.arange(1, int(md.num_mask_tokens)))
        checks = [(*features, *c[1:], torch.zeros(1, dtype=torch.int64)) for c in checks]
        dynamic = {**dynamic, "mask_index": {0: "num_masks"}, "masks": {1: "num_masks"}}
        names = SPLIT_DECODER_INPUTS
    return GraphRecipe(lambda: prompt_decoder_module(pe, md, split), example, names, DECODER_OUTPUTS, dynamic,
                       tuple(checks))
