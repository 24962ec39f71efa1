"""Export-only wrappers around the upstream SAM modules.

They reuse the upstream submodules and weights unchanged and only rearrange
how a batch flows through them, so that the exported graphs:

* take any number of images in the encoder (dynamic batch axis), and
* decode boxes that belong to different images in one call: every box names
  its image through `box_image_index`, and the graph gathers that image's
  embedding (the upstream ONNX export fixes the embedding batch at 1).

Nothing here feeds a shape computation from prompt values (no OneHot / Tile on
labels), which is what trips TensorRT's parser on the upstream SAM decoder
exports.
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
from torch import nn


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


@contextlib.contextmanager
def batch_agnostic(module: nn.Module):
    """Temporarily give modules with batch-freezing code a traceable forward."""
    patched = []
    for sub in module.modules():
        if type(sub).__name__ == "PatchMerging" and hasattr(sub, "input_resolution"):
            sub.forward = types.MethodType(_patch_merging_forward, sub)
            patched.append(sub)
    try:
        yield module
    finally:
        for sub in patched:
            del sub.forward  # back to the class method


class ImageEncoderExport(nn.Module):
    """pixel_values [B, 3, S, S] (normalised, padded) -> image_embeddings [B, 256, 64, 64]."""

    def __init__(self, sam: nn.Module):
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(pixel_values)


class BoxMaskDecoderExport(nn.Module):
    """Prompt encoder (boxes only) + mask decoder for single-mask output.

    Inputs: image_embeddings [B, 256, 64, 64], model_boxes [N, 4] (xyxy in the
    encoder's input frame), box_image_index [N] (int32, which of the B images).
    Outputs: low_res_masks [N, 256, 256] (logits), iou_predictions [N].

    Equivalent to the upstream predictor's `predict_torch(boxes=...,
    multimask_output=False)` up to the low-resolution logits: only the first
    mask token, the one upstream keeps for single-mask output, is decoded.
    """

    def __init__(self, sam: nn.Module):
        super().__init__()
        prompt_encoder = sam.prompt_encoder
        decoder = sam.mask_decoder
        self.transformer = decoder.transformer
        self.output_upscaling = decoder.output_upscaling
        self.single_mask_hypernetwork = decoder.output_hypernetworks_mlps[0]
        self.iou_prediction_head = decoder.iou_prediction_head
        self.num_mask_tokens = decoder.num_mask_tokens
        self.output_tokens = nn.Parameter(
            torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0).detach(),
            requires_grad=False,
        )
        self.register_buffer(
            "gaussian_matrix", prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.detach().clone()
        )
        input_h, input_w = prompt_encoder.input_image_size
        self.register_buffer("coord_scale", torch.tensor([float(input_w), float(input_h)]))
        self.register_buffer(
            "corner_embeddings",
            torch.stack(
                [prompt_encoder.point_embeddings[2].weight[0], prompt_encoder.point_embeddings[3].weight[0]]
            ).detach().unsqueeze(0),
        )
        self.register_buffer("no_mask_embedding", prompt_encoder.no_mask_embed.weight.detach().reshape(1, -1, 1, 1))
        with torch.no_grad():
            self.register_buffer("image_pe", prompt_encoder.get_dense_pe().detach().clone())

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        # The upstream PromptEncoder._embed_boxes math, without in-place slice
        # writes (they export as ScatterND).
        corners = (boxes + 0.5).reshape(-1, 2, 2) / self.coord_scale
        corners = 2 * corners - 1
        projected = (2 * math.pi) * (corners @ self.gaussian_matrix)
        encoding = torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)
        return encoding + self.corner_embeddings

    def forward(self, image_embeddings, model_boxes, box_image_index):
        sparse = self.embed_boxes(model_boxes)
        num_boxes = sparse.shape[0]
        tokens = torch.cat([self.output_tokens.unsqueeze(0).expand(num_boxes, -1, -1), sparse], dim=1)

        src = image_embeddings.index_select(0, box_image_index) + self.no_mask_embedding
        pos_src = self.image_pe.expand(num_boxes, -1, -1, -1)
        _, channels, height, width = src.shape
        hs, src = self.transformer(src, pos_src, tokens)

        iou_token_out = hs[:, 0, :]
        mask_token_out = hs[:, 1, :]
        src = src.transpose(1, 2).reshape(-1, channels, height, width)
        upscaled = self.output_upscaling(src)
        hyper = self.single_mask_hypernetwork(mask_token_out)
        _, up_channels, up_h, up_w = upscaled.shape
        masks = hyper.unsqueeze(1) @ upscaled.reshape(-1, up_channels, up_h * up_w)
        low_res_masks = masks.reshape(-1, up_h, up_w)
        iou_predictions = self.iou_prediction_head(iou_token_out)[:, 0]
        return low_res_masks, iou_predictions


class RaggedBoxMaskDecoderExport(nn.Module):
    """The box mask decoder as Triton's TensorRT backend feeds a ragged batch.

    With `allow_ragged_batch` on `model_boxes`, the backend concatenates the
    requests' boxes into one 1-D tensor and, through a `batch_input` of kind
    BATCH_ACCUMULATED_ELEMENT_COUNT, passes each request's running element
    count.  Request r holds image r of `image_embeddings`, so box i belongs to
    the number of requests whose running count is <= 4 * i.  That index is
    computed from data only (a comparison and a sum), never from a shape
    derived from prompt values, so it stays a plain TensorRT layer chain.
    """

    def __init__(self, sam: nn.Module):
        super().__init__()
        self.decoder = BoxMaskDecoderExport(sam)

    def forward(self, image_embeddings, model_boxes, boxes_accumulated):
        boxes = model_boxes.reshape(-1, 4)
        first_element = torch.arange(boxes.shape[0], device=boxes.device, dtype=torch.int32) * 4
        index = (first_element.unsqueeze(1) >= boxes_accumulated.reshape(1, -1)).to(torch.int32).sum(dim=1)
        return self.decoder(image_embeddings, boxes, index)
