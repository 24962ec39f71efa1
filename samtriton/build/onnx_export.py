"""PyTorch -> ONNX for the image encoder and the box mask decoder, with parity checks.

Opset 17, the TorchScript-based exporter: the graphs contain Conv, MatMul,
Gemm, Softmax, Erf/Gelu pieces, Gather (index_select), Reshape/Transpose,
ConvTranspose, LayerNormalization, Sin/Cos.  All of them are TensorRT 10 layers;
the only dynamic axes are the image batch and the number of boxes.
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
    BoxMaskDecoderExport,
    ImageEncoderExport,
    RaggedBoxMaskDecoderExport,
    batch_agnostic,
)

OPSET = 17


@dataclass(frozen=True)
class ParityReport:
    encoder_max_abs_diff: float
    decoder_mask_max_abs_diff: float
    decoder_iou_max_abs_diff: float
    # IoU of the thresholded (> 0) low-resolution masks, worst box.
    decoder_mask_min_iou: float

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
    with torch.no_grad(), batch_agnostic(encoder):
        _export(encoder, (example,), path, [pv], [emb], {pv: {0: "images"}, emb: {0: "images"}})


def _export_box_decoder(decoder, boxes, third_name: str, third, box_axis: str, path: Path) -> None:
    """Both decoder graphs: embeddings of 2 images, boxes, and one tensor telling
    which image each box belongs to; outputs one mask and score per box."""
    embeddings = torch.zeros(2, *spec.EMBEDDING_SHAPE)
    names_in = [spec.IMAGE_EMBEDDINGS_NAME, spec.MODEL_BOXES.name, third_name]
    names_out = [spec.LOW_RES_MASKS.name, spec.IOU_PREDICTIONS.name]
    third_axis = "boxes" if box_axis == "boxes" else "images"
    axes = {names_in[0]: {0: "images"}, names_in[1]: {0: box_axis}, names_in[2]: {0: third_axis},
            names_out[0]: {0: "boxes"}, names_out[1]: {0: "boxes"}}
    with torch.no_grad():
        _export(decoder.eval(), (embeddings, boxes, third), path, names_in, names_out, axes)


_EXAMPLE_BOXES = [[10.0, 20.0, 300.0, 400.0], [0.0, 0.0, 50.0, 60.0], [5.0, 5.0, 900.0, 700.0]]


def export_decoder(sam: torch.nn.Module, path: Path) -> None:
    """The CPU target's decoder graph: boxes [N, 4] and each box's image index."""
    _export_box_decoder(BoxMaskDecoderExport(sam), torch.tensor(_EXAMPLE_BOXES), spec.BOX_IMAGE_INDEX.name,
                        torch.tensor([0, 1, 1], dtype=torch.int32), "boxes", path)


def export_ragged_decoder(sam: torch.nn.Module, path: Path) -> None:
    """The GPU target's decoder graph: 1-D ragged boxes + accumulated counts (see
    RaggedBoxMaskDecoderExport).  Same outputs as `export_decoder`'s."""
    _export_box_decoder(RaggedBoxMaskDecoderExport(sam), torch.tensor(_EXAMPLE_BOXES).reshape(-1),
                        spec.BOXES_ACCUMULATED_NAME, torch.tensor([4, 12], dtype=torch.int32), "box_elements", path)


def check_parity(sam: torch.nn.Module, encoder_size: int, encoder_path: Path, decoder_path: Path,
                 seed: int = 0) -> ParityReport:
    """Run the exported graphs and the PyTorch modules on the same random inputs.

    The encoder is run at batch 2 (a graph that froze the batch size fails
    here), the decoder with boxes spread over two images.
    """
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, 3, encoder_size, encoder_size)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    enc = ort.InferenceSession(str(encoder_path), opts, providers=["CPUExecutionProvider"])
    onnx_emb = enc.run(None, {enc.get_inputs()[0].name: pixels})[0]
    with torch.no_grad():
        torch_emb = sam.image_encoder(torch.from_numpy(pixels)).numpy()

    n = 6
    # Boxes are in the prompt frame, whatever the encoder's input size.
    xy0 = rng.uniform(0, spec.PROMPT_SIZE * 0.6, size=(n, 2))
    wh = rng.uniform(8, spec.PROMPT_SIZE * 0.4, size=(n, 2))
    boxes = np.concatenate([xy0, xy0 + wh], axis=1).astype(np.float32)
    dec = ort.InferenceSession(str(decoder_path), opts, providers=["CPUExecutionProvider"])
    if spec.BOXES_ACCUMULATED_NAME in {i.name for i in dec.get_inputs()}:
        # The GPU target's ragged graph: boxes grouped by image, flattened.
        index = np.array([0, 0, 0, 1, 1, 1], dtype=np.int32)
        feeds = {spec.MODEL_BOXES.name: boxes.reshape(-1),
                 spec.BOXES_ACCUMULATED_NAME: np.array([12, 24], dtype=np.int32)}
    else:
        index = np.array([0, 1, 0, 1, 1, 0], dtype=np.int32)
        feeds = {spec.MODEL_BOXES.name: boxes, spec.BOX_IMAGE_INDEX.name: index}
    onnx_masks, onnx_iou = dec.run(None, {spec.IMAGE_EMBEDDINGS_NAME: torch_emb, **feeds})
    # Reference: the upstream modules, one image at a time, as the predictor calls them.
    ref_masks = np.empty_like(onnx_masks)
    ref_iou = np.empty_like(onnx_iou)
    with torch.no_grad():
        for image in (0, 1):
            sel = np.flatnonzero(index == image)
            sparse, dense = sam.prompt_encoder(points=None, boxes=torch.from_numpy(boxes[sel]), masks=None)
            masks, iou = sam.mask_decoder(
                image_embeddings=torch.from_numpy(torch_emb[image : image + 1]),
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            ref_masks[sel] = masks[:, 0].numpy()
            ref_iou[sel] = iou[:, 0].numpy()
    return ParityReport(
        encoder_max_abs_diff=float(np.abs(onnx_emb - torch_emb).max()),
        decoder_mask_max_abs_diff=float(np.abs(onnx_masks - ref_masks).max()),
        decoder_iou_max_abs_diff=float(np.abs(onnx_iou - ref_iou).max()),
        decoder_mask_min_iou=float(mask_ious(onnx_masks > 0, ref_masks > 0).min()),
    )
