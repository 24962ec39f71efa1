"""Export-only wrappers around the upstream SAM modules.

They reuse the upstream submodules and weights unchanged and only rearrange
how a batch flows through them, so that the exported graphs:

* take any number of images in the encoder (dynamic batch axis), and
* decode prompts of any kind (points, boxes, both, with or without a previous
  mask) that belong to different images and requests in one call: every
  prompt names its image and mask input by index, and the graph gathers them
  (the upstream ONNX export fixes the embedding batch at 1 and one prompt
  layout per call).  Prompts with fewer tokens than the longest are filled
  with tokens the attention leaves out, so a batch answers each prompt as if
  it were alone.

Nothing here feeds a shape computation from prompt values (no OneHot / Tile on
labels), which is what trips TensorRT's parser on the upstream SAM decoder
exports.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import types

import torch
from torch import nn
from torch.nn import functional as F

from samtriton import spec


def _patch_merging_forward(self, x):
    # Same computation as TinyViT's PatchMerging.forward, but its `len(x)` is
    # invisible to the tracer and would freeze the batch size into the graph.
    if x.ndim == 3:
        height, width = self.input_resolution
        x = x.reshape(-1, height, width, self.dim).permute(0, 3, 1, 2)
    x = self.act(self.conv1(x))
    x = self.act(self.conv2(x))
    x = self.conv3(x)
    return x.flatten(2).transpose(1, 2)


def _tinyvit_block_forward(self, x):
    """TinyViTBlock.forward, with the token grid going into and out of the local convolution's
    channels-first layout as 4-D permutes (see `tinyvit_layout`)."""
    height, width = self.input_resolution
    _, tokens, channels = x.shape
    shortcut = x
    if height == self.window_size and width == self.window_size:
        x = self.attn(x)
    else:
        size = self.window_size
        x = x.reshape(-1, height, width, channels)
        pad_b, pad_r = (size - height % size) % size, (size - width % size) % size
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        rows, cols = (height + pad_b) // size, (width + pad_r) // size
        x = x.reshape(-1, rows, size, cols, size, channels).transpose(2, 3).reshape(-1, size * size, channels)
        x = self.attn(x)
        x = x.reshape(-1, rows, cols, size, size, channels).transpose(2, 3).reshape(
            -1, rows * size, cols * size, channels)
        if pad_b or pad_r:
            x = x[:, :height, :width]
        x = x.reshape(-1, tokens, channels)
    x = shortcut + self.drop_path(x)
    x = self.local_conv(x.reshape(-1, height, width, channels).permute(0, 3, 1, 2))
    x = x.permute(0, 2, 3, 1).reshape(-1, tokens, channels)
    return x + self.drop_path(self.mlp(x))


def _tinyvit_attention_forward(self, x):
    """TinyViT's Attention.forward with its qkv projection as three, one per q, k and v, from
    the rows of its weight that upstream's split would take (see `tinyvit_layout`)."""
    _, tokens, _ = x.shape
    x = self.norm(x)
    heads, key_dim, value_dim = self.num_heads, self.key_dim, self.d
    weight = self.qkv.weight.reshape(heads, 2 * key_dim + value_dim, -1)
    bias = self.qkv.bias.reshape(heads, 2 * key_dim + value_dim)

    def project(start, width):
        rows = weight[:, start:start + width].reshape(heads * width, -1)
        out = F.linear(x, rows, bias[:, start:start + width].reshape(-1))
        return out.reshape(-1, tokens, heads, width).permute(0, 2, 1, 3)

    q, k, v = project(0, key_dim), project(key_dim, key_dim), project(2 * key_dim, value_dim)
    biases = self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab  # as upstream
    attn = ((q @ k.transpose(-2, -1)) * self.scale + biases).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(-1, tokens, self.dh))


@contextlib.contextmanager
def _forwards_replaced(module: nn.Module, forward_for):
    """Temporarily give each submodule for which `forward_for(sub)` returns a function that
    function as its forward."""
    patched = []
    for sub in module.modules():
        forward = forward_for(sub)
        if forward is not None:
            sub.forward = types.MethodType(forward, sub)
            patched.append(sub)
    try:
        yield module
    finally:
        for sub in patched:
            del sub.forward  # back to the class method


def batch_agnostic(module: nn.Module):
    """Temporarily give modules with batch-freezing code a traceable forward."""
    return _forwards_replaced(module, lambda sub: _patch_merging_forward if (
        type(sub).__name__ == "PatchMerging" and hasattr(sub, "input_resolution")) else None)


def tinyvit_layout(module: nn.Module):
    """Temporarily give TinyViT's blocks (MobileSAM's encoder) forwards that trace into fewer
    layout changes, for the same values (ONNX Runtime fp32: bit for bit here):
    - upstream splits one qkv projection per head into q, k and v, which OpenVINO runs as a
      reference VariadicSplit (2.7 ms a block at 128 x 128 tokens, bf16); three projections
      from the same weight rows leave nothing to split;
    - upstream takes the tokens to channels-first for the local convolution with a 3-D
      transpose and a reshape (5.2 ms a block there); a reshape and a 4-D permute run as a
      fast transpose (0.8 ms).
    OpenVINO bf16 runs MobileSAM's encoder 1.12-1.14x faster for it (perf/README.md)."""
    def forward_for(sub):
        if type(sub).__name__ == "TinyViTBlock" and hasattr(sub, "local_conv"):
            return _tinyvit_block_forward
        if type(sub).__name__ == "Attention" and hasattr(sub, "attention_bias_idxs"):
            return _tinyvit_attention_forward
        return None

    return _forwards_replaced(module, forward_for)


def _add_relative_terms(attn, grid_q, rel_h, rel_w, batch, q_size, k_size):
    """Add SAM ViT's decomposed relative positions into `attn` [B, q_h * q_w, k_h * k_w] itself:
    `grid_q` [B, q_h, q_w, C] the queries on their grid, `rel_h` [q_h, k_h, C] and `rel_w`
    [q_w, k_w, C] their rows of `get_rel_pos`.  Upstream's two additions in its order.  The
    sizes come in as the caller has them (a traced shape or -1 for B, ints for the grids), so
    that the traced graph reads no shape upstream's does not."""
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    along_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_h)
    along_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_w)
    # The sum is returned from the view itself: a tracer follows an in-place op only along
    # the tensor it was applied to, not back into the tensor viewed.
    grid = attn.view(batch, q_h, q_w, k_h, k_w)
    grid = grid.add_(along_h[:, :, :, :, None]).add_(along_w[:, :, :, None, :])
    return grid.view(batch, q_h * q_w, k_h * k_w)


def _add_rel_pos_in_place(upstream, attn, q, rel_pos_h, rel_pos_w, q_size, k_size):
    """`upstream.add_decomposed_rel_pos`, with its two terms added into `attn` itself rather
    than into two new tensors: the same additions in the same order (the same values, the
    same Add nodes in a traced graph), one attention map fewer alive."""
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    batch, _, channels = q.shape
    return _add_relative_terms(attn, q.reshape(batch, q_h, q_w, channels), upstream.get_rel_pos(q_h, k_h, rel_pos_h),
                               upstream.get_rel_pos(q_w, k_w, rel_pos_w), batch, q_size, k_size)


# Query rows of SAM ViT's token grid that a global attention layer attends at once.  At
# 1024 x 1024 the grid is 64 x 64: ViT-B's 12 whole maps of 4096 x 4096 are 805 MB in float32
# (ONNX Runtime's run of the encoder peaked 2 GB above its loaded session), 16 rows' are 201 MB.
GLOBAL_ATTENTION_QUERY_ROWS = 16


def _attention_by_query_rows(upstream, rows: int, self, x):
    """SAM ViT's `Attention.forward` on `rows` grid rows of queries at a time: softmax
    normalises each query's row of the map on its own, so a block of queries needs only its
    own rows of the map (and of the relative positions along the height); the keys and values
    are the whole grid's.  The same operations in the same order per query as upstream, in
    smaller matrix products."""
    _, height, width, dim = x.shape
    if height <= rows:
        return type(self).forward(self, x)
    heads, head_dim = self.num_heads, dim // self.num_heads
    # q, k, v: [B * heads, H * W, head_dim], upstream's layout.
    q, k, v = (self.qkv(x).reshape(-1, height * width, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
               .reshape(3, -1, height * width, head_dim).unbind(0))
    keys = k.transpose(-2, -1)
    if self.use_rel_pos:
        rel_h = upstream.get_rel_pos(height, height, self.rel_pos_h)  # [query row, key row, head_dim]
        rel_w = upstream.get_rel_pos(width, width, self.rel_pos_w)
    blocks = []
    for top in range(0, height, rows):
        count = min(rows, height - top)
        q_block = q[:, top * width:(top + count) * width]
        attn = (q_block * self.scale) @ keys
        if self.use_rel_pos:
            attn = _add_relative_terms(attn, q_block.reshape(-1, count, width, head_dim), rel_h[top:top + count],
                                       rel_w, -1, (count, width), (height, width))
        blocks.append(attn.softmax(dim=-1) @ v)
    out = torch.cat(blocks, dim=1).view(-1, heads, height, width, head_dim)
    return self.proj(out.permute(0, 2, 3, 1, 4).reshape(-1, height, width, dim))


@contextlib.contextmanager
def lean_attention(module: nn.Module, query_rows: int = GLOBAL_ATTENTION_QUERY_ROWS):
    """Temporarily run SAM ViT's attention in less memory, for the same values:
    - the relative positions are added into the map in place (upstream's out-of-place sum
      keeps a third map alive at its peak);
    - a layer whose grid has more than `query_rows` rows (the global ones) attends that many
      rows of queries at a time (GLOBAL_ATTENTION_QUERY_ROWS).
    Under it the export traces the blocks into the graph: ONNX Runtime and OpenVINO then hold
    one block's maps at a time too (the parity check, the accuracy gate, the served encoder).
    ViT-B's build peaked in its global attention (perf/README.md, build peak memory)."""
    upstreams, chunked = {}, []
    for sub in module.modules():
        owner = sys.modules[type(sub).__module__]
        if not (hasattr(owner, "add_decomposed_rel_pos") and hasattr(owner, "get_rel_pos")):
            continue
        if getattr(sub, "use_rel_pos", False):
            upstreams[owner.__name__] = (owner, owner.add_decomposed_rel_pos)
        if type(sub).__name__ == "Attention" and hasattr(sub, "qkv") and hasattr(sub, "proj"):
            sub.forward = types.MethodType(functools.partial(_attention_by_query_rows, owner, query_rows), sub)
            chunked.append(sub)
    for owner, _ in upstreams.values():
        owner.add_decomposed_rel_pos = functools.partial(_add_rel_pos_in_place, owner)
    try:
        yield module
    finally:
        for owner, original in upstreams.values():
            owner.add_decomposed_rel_pos = original
        for sub in chunked:
            del sub.forward  # back to the class method


class ImageEncoderExport(nn.Module):
    """pixel_values [B, 3, S, S] (normalised, padded) -> image_embeddings [B, 256, 64, 64]."""

    def __init__(self, sam: nn.Module):
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(pixel_values)


def _attend(attention: nn.Module, q, k, v, key_bias=None):
    """An upstream SAM `Attention` with its own weights; `key_bias` [B, K]
    (0 or -inf) is added to the logits of every query.

    The same operations as `Attention.forward` plus one broadcast add: keys
    with -inf get exactly zero weight, so the other tokens' results equal
    those of a prompt without them.
    """
    q = attention._separate_heads(attention.q_proj(q), attention.num_heads)
    k = attention._separate_heads(attention.k_proj(k), attention.num_heads)
    v = attention._separate_heads(attention.v_proj(v), attention.num_heads)
    logits = q @ k.permute(0, 1, 3, 2)
    logits = logits / math.sqrt(q.shape[-1])
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    out = torch.softmax(logits, dim=-1) @ v
    return attention.out_proj(attention._recombine_heads(out))


def _attend_image_to_tokens(attention: nn.Module, image_tokens, tokens, values, key_bias):
    """`_attend` for the image-to-token attention: 4096 image tokens as queries, a prompt's
    few tokens as keys, without splitting the image tokens into heads.

    The keys and values go into block-diagonal [N, heads * T, C] tensors (row (h, t): token
    t's channels of head h, zeros elsewhere), so every head's logits come out of one
    [heads * T, C] x [C, 4096] product, and the output of one [4096, heads * T] x
    [heads * T, C] product, already in the recombined-heads layout.  The zeros add exact
    zeros: upstream's values (bit for bit in ONNX Runtime fp32 here).  The softmax runs along
    T with the image tokens innermost: along a last axis of T (5-7 keys) OpenVINO's softmax
    took 2.4-2.6 ms a prompt and layer (L0, bf16, 5 boxes).  With the token
    layout and the upscaling of `PromptMaskDecoderExport`, OpenVINO bf16 decodes 1.65-2.12x
    faster for 1-47 boxes than with upstream's layout (perf/README.md).
    """
    heads = attention.num_heads
    q = attention.q_proj(image_tokens)
    k, v = attention.k_proj(tokens), attention.v_proj(values)
    n, t, c = k.shape
    eye = torch.eye(heads, dtype=k.dtype, device=k.device).reshape(1, heads, 1, heads, 1)

    def head_blocks(x):
        return (x.reshape(n, 1, t, heads, c // heads) * eye).reshape(n, heads * t, c)

    # [N, heads, T, 4096]: the softmax runs along T with the image tokens innermost.
    logits = (head_blocks(k) @ q.transpose(1, 2)) / math.sqrt(c // heads)
    logits = logits.reshape(n, heads, t, -1) + key_bias[:, None, :, None]
    weights = torch.softmax(logits, dim=2).reshape(n, heads * t, -1)
    return attention.out_proj(weights.transpose(1, 2) @ head_blocks(v))


def _two_way_transformer(transformer: nn.Module, image_tokens, image_pe_tokens, point_embedding, token_bias):
    """`TwoWayTransformer.forward` on image tokens [N, HW, C] (and their positional
    encoding [1, HW, C]), with filler tokens left out of the attentions whose keys are
    tokens (self-attention, image-to-token)."""
    queries, keys = point_embedding, image_tokens
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = _attend(layer.self_attn, queries, queries, queries, token_bias)
        else:
            q = queries + point_embedding
            queries = queries + _attend(layer.self_attn, q, q, queries, token_bias)
        queries = layer.norm1(queries)
        q, k = queries + point_embedding, keys + image_pe_tokens
        queries = layer.norm2(queries + layer.cross_attn_token_to_image(q=q, k=k, v=keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        q, k = queries + point_embedding, keys + image_pe_tokens
        keys = layer.norm4(keys + _attend_image_to_tokens(layer.cross_attn_image_to_token, k, q, queries,
                                                          token_bias))
    q, k = queries + point_embedding, keys + image_pe_tokens
    queries = transformer.norm_final_attn(queries + transformer.final_attn_token_to_image(q=q, k=k, v=keys))
    return queries, keys


def _stride_two_deconv_as_product(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2, stride-2 transposed convolution as a channels-last product: (weight [C_in, 4 * C_out]
    with columns in (row offset, column offset, C_out) order, and the bias of those columns).  Each input pixel
    writes its own 2x2 block of outputs, so out[2i + a, 2j + b, o] = x[i, j] . W[:, o, a, b] + bias[o]."""
    if (conv.kernel_size, conv.stride, conv.padding, conv.output_padding, conv.dilation, conv.groups) != (
            (2, 2), (2, 2), (0, 0), (0, 0), (1, 1), 1):
        raise ValueError(f"the mask decoder's upscaling is not SAM's 2x2 stride-2 transposed convolution: {conv}")
    weight = conv.weight.detach().permute(0, 2, 3, 1).reshape(conv.in_channels, 4 * conv.out_channels)
    return weight.clone(), conv.bias.detach().repeat(4)


class PromptMaskDecoderExport(nn.Module):
    """Prompt encoder + mask decoder for any mix of prompts, images and mask inputs in one call.

    Inputs (names in `samtriton.spec`):
      image_embeddings [B, 256, 64, 64];
      prompt_coords [N, T, 2] (xy, prompt frame), prompt_labels [N, T] (int32,
        spec.TOKEN_LABELS);
      mask_inputs [M, 256, 256] (previous low-res logits, M >= 0) and
        mask_image_index [M] (int32: the image each belongs to);
      prompt_source_index [N] (int32): the prompt's image n < B (no mask
        input: SAM's no-mask embedding), or B + m for the image of mask input m
        with that mask's embedding;
      mask_tokens [K] (int32): which of the 4 mask tokens to decode; upstream's
        single-mask output is token 0, its multimask output tokens 1-3
        (`MaskDecoder.forward`).
    Outputs: low_res_masks [N, K, 256, 256] (logits) and iou_predictions [N, K].

    Per prompt this is `SamPredictor.predict_torch` up to the low-res logits,
    with every token of upstream's `PromptEncoder` (points, the padding point,
    box corners) and filler tokens (LABEL_ABSENT) that are never attended to.
    The dense embeddings are added to the B + M source rows before the
    gather, so a call costs one [N, 4096, 256] gather of image tokens, as without masks.
    """

    def __init__(self, sam: nn.Module):
        super().__init__()
        prompt_encoder = sam.prompt_encoder
        decoder = sam.mask_decoder
        self.transformer = decoder.transformer
        self.hypernetworks = decoder.output_hypernetworks_mlps
        self.iou_prediction_head = decoder.iou_prediction_head
        self.mask_downscaling = prompt_encoder.mask_downscaling
        self.register_buffer("output_tokens", torch.cat(
            [decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0).detach().clone())
        self.register_buffer(
            "gaussian_matrix", prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.detach().clone()
        )
        input_h, input_w = prompt_encoder.input_image_size
        self.register_buffer("coord_scale", torch.tensor([float(input_w), float(input_h)]))
        # Row label + 1 of this table is added to a token's embedding (labels
        # -1..3); filler (LABEL_ABSENT) takes row 0 and is masked anyway.
        self.register_buffer("label_embeddings", torch.cat(
            [prompt_encoder.not_a_point_embed.weight]
            + [prompt_encoder.point_embeddings[i].weight for i in range(4)], dim=0).detach().clone())
        self.register_buffer("no_mask_embedding", prompt_encoder.no_mask_embed.weight.detach().reshape(1, -1, 1, 1))
        # The upscaling in the transformer's channels-last token layout (see `_masks`).
        first, norm, self.first_activation, second, self.second_activation = decoder.output_upscaling
        for name, conv in (("first", first), ("second", second)):
            weight, bias = _stride_two_deconv_as_product(conv)
            self.register_buffer(f"{name}_deconv_weight", weight)
            self.register_buffer(f"{name}_deconv_bias", bias)
        self.upscale_norm = norm
        with torch.no_grad():
            # [1, HW, C]: the token layout the transformer adds it in, once for every prompt.
            self.register_buffer("image_pe_tokens",
                                 prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1).contiguous())

    def embed_tokens(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The upstream PromptEncoder's _embed_points / _embed_boxes math, with
        # the per-label writes as a lookup and a select (in-place masked
        # writes export as ScatterND).
        projected = (2 * math.pi) * ((2 * ((coords + 0.5) / self.coord_scale) - 1) @ self.gaussian_matrix)
        encoding = torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)
        encoding = encoding.masked_fill((labels < 0).unsqueeze(-1), 0.0)
        rows = torch.clamp(labels + 1, min=0).long()
        return encoding + self.label_embeddings[rows]

    def forward(self, image_embeddings, prompt_coords, prompt_labels, mask_inputs, mask_image_index,
                prompt_source_index, mask_tokens):
        sparse = self.embed_tokens(prompt_coords, prompt_labels)
        num_prompts = sparse.shape[0]
        tokens = torch.cat([self.output_tokens.unsqueeze(0).expand(num_prompts, -1, -1), sparse], dim=1)
        # The IoU and mask tokens are always attended to; filler never.
        filler = torch.cat([torch.zeros_like(prompt_labels[:, :1], dtype=torch.bool).expand(
            -1, self.output_tokens.shape[0]), prompt_labels == spec.LABEL_ABSENT], dim=1)
        token_bias = torch.zeros_like(filler, dtype=sparse.dtype).masked_fill(filler, float("-inf"))

        sources = torch.cat([image_embeddings + self.no_mask_embedding,
                             image_embeddings.index_select(0, mask_image_index)
                             + self.mask_downscaling(mask_inputs.unsqueeze(1))])
        # Into the transformer's token layout before the gather: once per image (and mask
        # input), not once per prompt.
        height, width = sources.shape[-2:]
        src = sources.flatten(2).permute(0, 2, 1).index_select(0, prompt_source_index)
        hs, src = _two_way_transformer(self.transformer, src, self.image_pe_tokens, tokens, token_bias)

        mask_tokens_out = hs[:, 1:1 + spec.NUM_MASK_TOKENS, :]
        hyper = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.hypernetworks)], dim=1)
        hyper = hyper.index_select(1, mask_tokens)
        masks = self._masks(src, hyper, height, width)
        return masks, self.iou_prediction_head(hs[:, 0, :]).index_select(1, mask_tokens)

    def _masks(self, image_tokens, hyper, height: int, width: int):
        """Upstream's `output_upscaling` and hypernetwork product, from image tokens [N, HW, C] to
        mask logits [N, K, 4H, 4W], without going back to channels-first.

        Each 2x2 stride-2 transposed convolution is one product (`_stride_two_deconv_as_product`)
        that leaves every pixel's 2x2 block of outputs on a pair of axes of its own, LayerNorm2d
        normalises the last (channel) axis, and the pixels come into row-major order once, at
        the end, on the K mask logits rather than on 256- or 64-channel tensors.  Row 4i + 2a + a2
        and column 4j + 2b + b2 of a mask is low-res pixel (i, j), first block offset (a, b) and
        second (a2, b2).
        """
        n = image_tokens.shape[0]
        norm = self.upscale_norm
        x = (image_tokens @ self.first_deconv_weight + self.first_deconv_bias).reshape(n, height * width * 4, -1)
        x = self.first_activation(F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps))
        x = (x @ self.second_deconv_weight + self.second_deconv_bias).reshape(n, height * width * 16, -1)
        x = self.second_activation(x)
        logits = x @ hyper.transpose(1, 2)  # [N, pixels in (i, j, a, b, a2, b2) order, K]
        logits = logits.reshape(n, height, width, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return logits.reshape(n, -1, 4 * height, 4 * width)


class RaggedPromptMaskDecoderExport(nn.Module):
    """The prompt mask decoder as Triton's TensorRT backend feeds a ragged batch.

    With `allow_ragged_batch`, the backend concatenates the requests' prompt
    tensors into flat ones and passes, through `batch_input`s of kind
    BATCH_ACCUMULATED_ELEMENT_COUNT, each request's running element count of
    `prompt_labels` and of `model_mask_inputs`.  Every prompt has the same
    `tokens` count here (the GPU preprocess pads to it), so the flat labels
    reshape to [N, tokens] by a constant.  Request r holds image r; prompt p
    belongs to the number of requests whose running label count is
    <= tokens * p, and mask input m to the number whose running mask count is
    <= 65536 * m.  A prompt with a mask input uses the one at its own offset
    within its request's masks (a request without mask inputs sends one
    placeholder, unused).  Everything is computed from data (comparisons,
    sums, gathers), never from a shape derived from prompt values, so it stays
    a plain TensorRT layer chain.  It decodes all four mask tokens: an engine
    cannot choose per request; the postprocess picks.
    """

    def __init__(self, sam: nn.Module, tokens: int):
        super().__init__()
        self.decoder = PromptMaskDecoderExport(sam)
        self.tokens = tokens
        self.register_buffer("all_mask_tokens", torch.arange(spec.NUM_MASK_TOKENS, dtype=torch.int32))

    @staticmethod
    def _owner(first_element: torch.Tensor, accumulated: torch.Tensor) -> torch.Tensor:
        """Index of the request whose elements start at or after each first element."""
        return (first_element.unsqueeze(1) >= accumulated.reshape(1, -1)).to(torch.int32).sum(dim=1)

    def forward(self, image_embeddings, prompt_coords, prompt_labels, model_mask_inputs, has_mask_input,
                labels_accumulated, masks_accumulated):
        size = spec.LOW_RES_MASK_SIZE * spec.LOW_RES_MASK_SIZE
        labels = prompt_labels.reshape(-1, self.tokens)
        coords = prompt_coords.reshape(-1, self.tokens, 2)
        masks = model_mask_inputs.reshape(-1, spec.LOW_RES_MASK_SIZE, spec.LOW_RES_MASK_SIZE)
        prompt = torch.arange(labels.shape[0], device=labels.device, dtype=torch.int32)
        image = self._owner(prompt * self.tokens, labels_accumulated)
        mask_image = self._owner(torch.arange(masks.shape[0], device=labels.device, dtype=torch.int32) * size,
                                 masks_accumulated)
        zero = torch.zeros_like(labels_accumulated.reshape(-1)[:1])
        prompt_start = torch.cat([zero, labels_accumulated.reshape(-1)]).index_select(0, image) // self.tokens
        mask_start = torch.cat([zero, masks_accumulated.reshape(-1)]).index_select(0, image) // size
        with_mask = (has_mask_input.reshape(-1) > 0.5).to(torch.int32)
        source = image + with_mask * (image_embeddings.shape[0] + mask_start + prompt - prompt_start - image)
        return self.decoder(image_embeddings, coords, labels, masks, mask_image, source, self.all_mask_tokens)
