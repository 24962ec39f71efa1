"""PyTorch -> ONNX for the image encoder and the prompt mask decoder, with parity checks.

Opset 17, the TorchScript-based exporter: the graphs contain Conv, MatMul,
Gemm, Softmax, Erf/Gelu pieces, Gather (index_select), Reshape/Transpose,
ConvTranspose, LayerNormalization, Sin/Cos, Where.  All of them are TensorRT 10
layers; the dynamic axes are the image batch, the number of prompts, their
token count and the number of mask inputs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from samtriton import spec
from samtriton.serving.postprocessing import mask_ious
from samtriton.build.export_wrappers import (
    ImageEncoderExport,
    PromptMaskDecoderExport,
    RaggedPromptMaskDecoderExport,
    batch_agnostic,
    lean_attention,
    tinyvit_layout,
)
from samtriton.build.memory import release_memory
from samtriton.serving import decoder_batch

OPSET = 17


@dataclass(frozen=True)
class ParityReport:
    encoder_max_abs_diff: float
    decoder_mask_max_abs_diff: float
    decoder_iou_max_abs_diff: float
    # IoU of the thresholded (> 0) low-resolution masks, worst box.
    decoder_mask_min_iou: float
    # The encoder graph's output shape for a batch of 2, from shape inference
    # (None: it could not be propagated, e.g. a batch size frozen in a Reshape).
    encoder_batch2_shape: tuple[int, ...] | None = (2, *spec.EMBEDDING_SHAPE)

    # Float32 ONNX Runtime vs PyTorch on the same weights: differences are
    # rounding (1e-5 seen); anything near these bounds is a wrong graph.
    MAX_ENCODER_DIFF = 1e-3
    MAX_MASK_LOGIT_DIFF = 1e-3
    MAX_IOU_SCORE_DIFF = 1e-4
    MIN_MASK_IOU = 0.999

    def problems(self) -> list[str]:
        out = []
        if not self.encoder_max_abs_diff <= self.MAX_ENCODER_DIFF:
            out.append(f"encoder differs by {self.encoder_max_abs_diff:.3g} (bound {self.MAX_ENCODER_DIFF})")
        if not self.decoder_mask_max_abs_diff <= self.MAX_MASK_LOGIT_DIFF:
            out.append(f"mask logits differ by {self.decoder_mask_max_abs_diff:.3g} (bound {self.MAX_MASK_LOGIT_DIFF})")
        if not self.decoder_iou_max_abs_diff <= self.MAX_IOU_SCORE_DIFF:
            out.append(f"iou scores differ by {self.decoder_iou_max_abs_diff:.3g} (bound {self.MAX_IOU_SCORE_DIFF})")
        if not self.decoder_mask_min_iou >= self.MIN_MASK_IOU:
            out.append(f"mask IoU {self.decoder_mask_min_iou:.5f} (bound {self.MIN_MASK_IOU})")
        if self.encoder_batch2_shape != (2, *spec.EMBEDDING_SHAPE):
            out.append(f"the encoder graph froze its batch size: a batch of 2 gives {self.encoder_batch2_shape}")
        return out

    def lines(self) -> list[str]:
        return [
            f"encoder embeddings  max |onnx - torch| = {self.encoder_max_abs_diff:.3g}",
            f"decoder mask logits max |onnx - torch| = {self.decoder_mask_max_abs_diff:.3g}",
            f"decoder iou scores  max |onnx - torch| = {self.decoder_iou_max_abs_diff:.3g}",
            f"decoder masks (> 0) min IoU onnx vs torch = {self.decoder_mask_min_iou:.5f}",
        ]


def _export(module, args, path, input_names, output_names, dynamic_axes):
    with warnings.catch_warnings():
        # The tracer warns about every python int taken from a shape; the
        # parity check below is what tells whether the graph is right.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def export_encoder(sam: torch.nn.Module, encoder_size: int, path: Path) -> None:
    encoder = ImageEncoderExport(sam).eval()
    example = torch.zeros(1, 3, encoder_size, encoder_size)
    pv, emb = spec.PIXEL_VALUES_NAME, spec.IMAGE_EMBEDDINGS_NAME
    with torch.no_grad(), batch_agnostic(encoder), lean_attention(encoder), tinyvit_layout(encoder):
        _export(encoder, (example,), path, [pv], [emb], {pv: {0: "images"}, emb: {0: "images"}})


_DECODER_OUTPUTS = [spec.LOW_RES_MASKS_NAME, spec.IOU_PREDICTIONS_NAME]


_CPU_DECODER_INPUTS = [spec.IMAGE_EMBEDDINGS_NAME, spec.PROMPT_COORDS_NAME, spec.PROMPT_LABELS_NAME,
                       spec.MASK_INPUTS.name, spec.MASK_IMAGE_INDEX_NAME, spec.PROMPT_SOURCE_INDEX_NAME,
                       spec.MASK_TOKENS_NAME]


def all_mask_tokens(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CPU decoder feeds that decode every mask token (for checks against upstream)."""
    return {**feeds, spec.MASK_TOKENS_NAME: np.arange(spec.NUM_MASK_TOKENS, dtype=np.int32)}


def export_decoder(sam: torch.nn.Module, path: Path) -> None:
    """The CPU target's decoder graph: prompts of several images in one call, each
    pointing at its source row (see PromptMaskDecoderExport)."""
    requests = decoder_batch.sample_requests(np.random.default_rng(0))
    feeds = all_mask_tokens(decoder_batch.stack(requests, [False] * len(requests)).feeds)
    axes = {spec.IMAGE_EMBEDDINGS_NAME: {0: "images"}, spec.PROMPT_COORDS_NAME: {0: "prompts", 1: "tokens"},
            spec.PROMPT_LABELS_NAME: {0: "prompts", 1: "tokens"}, spec.MASK_INPUTS.name: {0: "mask_inputs"},
            spec.MASK_IMAGE_INDEX_NAME: {0: "mask_inputs"}, spec.PROMPT_SOURCE_INDEX_NAME: {0: "prompts"},
            spec.MASK_TOKENS_NAME: {0: "candidates"}, spec.LOW_RES_MASKS_NAME: {0: "prompts", 1: "candidates"},
            spec.IOU_PREDICTIONS_NAME: {0: "prompts", 1: "candidates"}}
    with torch.no_grad():
        _export(PromptMaskDecoderExport(sam).eval(), tuple(torch.from_numpy(feeds[n]) for n in _CPU_DECODER_INPUTS),
                path, _CPU_DECODER_INPUTS, _DECODER_OUTPUTS, axes)


def export_ragged_decoder(sam: torch.nn.Module, path: Path, tokens: int) -> None:
    """The GPU target's decoder graph: flat ragged prompt tensors + running counts,
    `tokens` per prompt (see RaggedPromptMaskDecoderExport).  Same outputs as
    `export_decoder`'s."""
    feeds = decoder_batch.ragged_feeds(decoder_batch.sample_requests(np.random.default_rng(0)), tokens)
    names = [spec.IMAGE_EMBEDDINGS_NAME, spec.PROMPT_COORDS_NAME, spec.PROMPT_LABELS_NAME,
             spec.MODEL_MASK_INPUTS_NAME, spec.HAS_MASK_INPUT_NAME, spec.LABELS_ACCUMULATED_NAME,
             spec.MASKS_ACCUMULATED_NAME]
    axes = {spec.IMAGE_EMBEDDINGS_NAME: {0: "images"}, spec.PROMPT_COORDS_NAME: {0: "coord_elements"},
            spec.PROMPT_LABELS_NAME: {0: "label_elements"}, spec.MODEL_MASK_INPUTS_NAME: {0: "mask_elements"},
            spec.HAS_MASK_INPUT_NAME: {0: "prompts"}, spec.LABELS_ACCUMULATED_NAME: {0: "images"},
            spec.MASKS_ACCUMULATED_NAME: {0: "images"}, spec.LOW_RES_MASKS_NAME: {0: "prompts"},
            spec.IOU_PREDICTIONS_NAME: {0: "prompts"}}
    with torch.no_grad():
        _export(RaggedPromptMaskDecoderExport(sam, tokens).eval(),
                tuple(torch.from_numpy(feeds[n]) for n in names), path, names, _DECODER_OUTPUTS, axes)


def upstream_decoder(sam: torch.nn.Module, request: decoder_batch.DecoderRequest) -> tuple[np.ndarray, np.ndarray]:
    """The upstream modules on each prompt alone, as `SamPredictor.predict_torch`
    calls them, with every mask token: ((b*N, 4, 256, 256), (b*N, 4))."""
    low_res, iou = [], []
    with torch.no_grad():
        for j in range(request.images):
            image = torch.from_numpy(request.embeddings[j:j + 1])
            for i in range(request.prompts):
                labels, coords = request.labels[j, i], request.coords[j, i]
                is_point = (labels == spec.LABEL_FOREGROUND) | (labels == spec.LABEL_BACKGROUND)
                corners = coords[(labels == spec.LABEL_BOX_TOP_LEFT) | (labels == spec.LABEL_BOX_BOTTOM_RIGHT)]
                points = None
                if is_point.any():
                    points = (torch.from_numpy(coords[is_point])[None], torch.from_numpy(labels[is_point])[None])
                box = torch.from_numpy(corners.reshape(1, 4)) if corners.size else None
                mask = None
                if request.has_mask_input[j, i] > 0.5:
                    mask = torch.from_numpy(request.mask_inputs[j, i])[None, None]
                sparse, dense = sam.prompt_encoder(points=points, boxes=box, masks=mask)
                m, s = sam.mask_decoder.predict_masks(image, sam.prompt_encoder.get_dense_pe(), sparse, dense)
                low_res.append(m[0].numpy())
                iou.append(s[0].numpy())
    return np.stack(low_res), np.stack(iou)


def encoder_batch_shape(encoder_path: Path, batch: int) -> tuple[int, ...] | None:
    """The encoder graph's output shape for `batch` images, by OpenVINO's shape
    inference (nothing is run); None when the batch cannot propagate."""
    import openvino as ov

    model = ov.Core().read_model(str(encoder_path))
    try:
        model.reshape({model.input(0).get_any_name(): [batch, *model.input(0).get_partial_shape()[1:].to_shape()]})
        shape = model.output(0).get_partial_shape()
    except Exception:
        return None
    return tuple(shape.to_shape()) if shape.is_static else None


def check_parity(sam: torch.nn.Module, encoder_size: int, encoder_path: Path, decoder_path: Path,
                 seed: int = 0, ragged_tokens: int | None = None, batched_encoder: bool = False,
                 keep_torch_encoder: bool = True) -> ParityReport:
    """Run the exported graphs and the PyTorch modules on the same random inputs.

    The encoder runs two images, one per call (`batched_encoder`: both in one
    call, which costs ViT-B GBs of activations), and its graph's shapes are
    propagated for a batch of 2 (a graph that froze the batch size fails
    there); the decoder gets every prompt kind (`sample_requests`) on the two
    embeddings in one call, against the upstream modules prompt by prompt,
    on all four mask tokens.  A GPU-target decoder (`ragged_tokens` per
    prompt) gets the same prompts as Triton's TensorRT backend lays them out.
    `keep_torch_encoder=False` frees `sam.image_encoder`'s weights once its
    embeddings are taken (ViT-B's 360 MB stay out of ONNX Runtime's peak).
    """
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, 3, encoder_size, encoder_size)).astype(np.float32)
    # Peak memory: PyTorch runs the images one at a time first, and its freed
    # activations go back to the system before ONNX Runtime (without its arena,
    # so its activations go after each run) loads the graph: the two encoders'
    # activations (GBs for ViT-B) never coexist, nor does either with the other's session.
    with torch.no_grad(), lean_attention(sam.image_encoder):
        torch_emb = np.concatenate([sam.image_encoder(torch.from_numpy(p[np.newaxis])).numpy() for p in pixels])
    if not keep_torch_encoder:
        sam.image_encoder.to("meta")  # storage-free placeholders: the module stays, its weights go
    release_memory()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False
    enc = ort.InferenceSession(str(encoder_path), opts, providers=["CPUExecutionProvider"])
    name = enc.get_inputs()[0].name
    if batched_encoder:
        onnx_emb = enc.run(None, {name: pixels})[0]
    else:
        onnx_emb = np.concatenate([enc.run(None, {name: p[np.newaxis]})[0] for p in pixels])
    del enc
    release_memory()
    batch2_shape = encoder_batch_shape(encoder_path, 2)

    requests = decoder_batch.sample_requests(rng, images=torch_emb)
    dec = ort.InferenceSession(str(decoder_path), opts, providers=["CPUExecutionProvider"])
    if ragged_tokens is not None:
        feeds = decoder_batch.ragged_feeds(requests, ragged_tokens)
    else:
        feeds = all_mask_tokens(decoder_batch.stack(requests, [False] * len(requests)).feeds)
    onnx_masks, onnx_iou = dec.run(_DECODER_OUTPUTS, feeds)
    ref = [upstream_decoder(sam, r) for r in requests]
    ref_masks = np.concatenate([m for m, _ in ref])
    ref_iou = np.concatenate([i for _, i in ref])
    return ParityReport(
        encoder_max_abs_diff=float(np.abs(onnx_emb - torch_emb).max()),
        decoder_mask_max_abs_diff=float(np.abs(onnx_masks - ref_masks).max()),
        decoder_iou_max_abs_diff=float(np.abs(onnx_iou - ref_iou).max()),
        decoder_mask_min_iou=float(mask_ious(onnx_masks.reshape(-1, *onnx_masks.shape[2:]) > 0,
                                             ref_masks.reshape(-1, *ref_masks.shape[2:]) > 0).min()),
        encoder_batch2_shape=batch2_shape,
    )
