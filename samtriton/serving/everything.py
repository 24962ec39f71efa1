"""One segment-everything request: image -> crops -> encoder -> decoder in small requests -> filtered masks.

The encoder and the decoder are passed in as coroutines, so the same code
runs inside Triton (`sam_everything`: BLS requests to the variant's
`image_encoder` and `mask_decoder`, which batch them with other clients'
requests and cache the embeddings) and in-process (`InProcessPipeline`).

Prompts: the upstream generator's point grid per crop, one point per prompt
with multimask output; or, when the request carries `boxes` (a detector's, as
in MobileSAMv2), one box per prompt with a single mask, on the whole image.
Each candidate is filtered on its own (predicted IoU, stability, crop
edges), so how prompts are split into decoder requests does not change the
result; it is split finely so other clients' requests reach the decoder
between the pieces.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from samtriton.serving import automatic_masks as am
from samtriton.serving.errors import InvalidInput
from samtriton.serving.postprocessing import decode_rle, encode_rle, upscaled_logits
from samtriton.serving.preprocessing import (
    PreprocessSettings,
    decode_image,
    normalise_and_pad,
    resize_longest_side,
    resized_shape,
)
from samtriton.serving.prompts import Geometry, PromptInputs, Prompts, build_prompts, transform_coords
from samtriton import spec

STAGES = ("image", "encoder", "decoder", "filtering")


class Cancelled(Exception):
    """The client cancelled the request (or its deadline passed); no more work is sent."""


@dataclass(frozen=True)
class EverythingSettings:
    preprocess: PreprocessSettings
    decoder_request_prompts: int = 8
    # Decoder requests in flight per everything-request: 2 queues the next one
    # while an answer is filtered; 1 leaves other clients a shorter queue.
    decoder_window: int = 1
    limits: am.EverythingLimits = am.EverythingLimits()

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "EverythingSettings":
        return cls(PreprocessSettings.from_parameters(params), int(params["decoder_request_prompts"]),
                   int(params["decoder_window"]))


class Timings:
    """Seconds per stage: each `lap(stage)` charges the time since the previous lap to `stage`."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now


@dataclass(frozen=True)
class Crop:
    box: list[int]  # xyxy in image pixels
    layer: int
    geometry: Geometry
    pixel_values: np.ndarray | None  # None: the whole image, embedded by `encode_image`


def point_prompts(points: np.ndarray, geometry: Geometry, pad_tokens: int = 0) -> Prompts:
    """(N, 2) xy points (float64, crop pixels) -> one foreground point per prompt plus SAM's padding
    point, as the upstream generator prompts its predictor.  Not `build_prompts`: that takes a
    client's float32 points and caps a request's prompts, while a grid is ours, float64 as
    upstream transforms it, and up to 4096 points."""
    n = points.shape[0]
    tokens = max(2, pad_tokens)
    coords = np.zeros((n, tokens, 2), np.float32)
    labels = np.full((n, tokens), spec.LABEL_ABSENT, np.int32)
    coords[:, 0] = transform_coords(points, geometry)
    labels[:, 0] = spec.LABEL_FOREGROUND
    labels[:, 1] = spec.LABEL_NOT_A_POINT
    size = spec.LOW_RES_MASK_SIZE
    return Prompts(coords, labels, np.zeros((1, size, size), np.float32), np.zeros(n, np.float32))


def _slice(prompts: Prompts, part: slice) -> Prompts:
    has_mask = prompts.has_mask_input[part]
    return Prompts(prompts.coords[part], prompts.labels[part], prompts.mask_inputs, has_mask)


def _crops(rgb: np.ndarray, boxes, params: am.GeneratorParameters, settings: PreprocessSettings,
           whole_image_pixels: bool = True) -> list[Crop]:
    """The crops to encode; the whole image's without pixels unless `whole_image_pixels`."""
    h, w = rgb.shape[:2]
    layout = [([0, 0, w, h], 0)] if boxes is not None else am.crop_boxes(h, w, params.crop_n_layers,
                                                                          params.crop_overlap_ratio)
    crops = []
    for box, layer in layout:
        x0, y0, x1, y1 = box
        part = rgb[y0:y1, x0:x1]
        ch, cw = part.shape[:2]
        geometry = Geometry(ch, cw, *resized_shape(ch, cw, settings.prompt_size))
        pixels = None
        if whole_image_pixels or (ch, cw) != (h, w):
            pixels = normalise_and_pad(resize_longest_side(part, settings.encoder_size), settings.encoder_size,
                                       settings.pixel_mean, settings.pixel_std)
        crops.append(Crop(box, layer, geometry, pixels))
    return crops


async def _decode_crop(crop: Crop, embedding, prompts: Prompts, multimask: bool, sources, image_hw,
                       params: am.GeneratorParameters, settings: EverythingSettings, decode, cancelled,
                       timings: Timings) -> am.Masks:
    """One crop's prompts through the decoder, `decoder_request_prompts` at a time with
    `decoder_window` requests in flight, each answer filtered as it arrives."""
    n = prompts.coords.shape[0]
    request_size = max(1, min(params.points_per_batch, settings.decoder_request_prompts))
    pending: deque = deque()
    pieces = []

    async def finish_oldest():
        part, task = pending.popleft()
        low_res, iou = await task
        timings.lap("decoder")
        pieces.append(am.filter_candidates(low_res, iou, sources[0][part], sources[1][part], crop.box, image_hw,
                                           crop.geometry, params, upscaled_logits, encode_rle))
        timings.lap("filtering")

    for part in am.batches(n, request_size):
        while len(pending) >= settings.decoder_window:
            await finish_oldest()
        if cancelled():
            for _, task in pending:
                task.cancel()
            raise Cancelled()
        pending.append((part, asyncio.ensure_future(decode(embedding, _slice(prompts, part), multimask))))
    while pending:
        await finish_oldest()
    return am.finish_crop(am.Masks.concat(pieces), crop.box, params)


async def segment_everything(image_bytes: bytes, boxes: np.ndarray | None, params: am.GeneratorParameters,
                             settings: EverythingSettings, encode, decode, cancelled=lambda: False,
                             timings: Timings | None = None, encode_image=None) -> am.Masks:
    """The kept masks, in upstream's order.

    `encode(pixel_values (3, S, S))` -> (256, 64, 64) and `decode(embedding, Prompts, multimask)` ->
    ((N, K, 256, 256), (N, K)) are awaitables; `cancelled()` is polled before each piece of work.
    `encode_image(geometry)`, if given, embeds the whole image instead of `encode` (the served
    model's embedding cache, shared with `sam`).
    """
    timings = timings or Timings()
    pre = settings.preprocess
    rgb = decode_image(image_bytes, pre.limits)
    h, w = rgb.shape[:2]
    box_prompts = None
    if boxes is not None:
        if params.crop_n_layers:
            raise InvalidInput(am.parameter_field("crop_n_layers"), "box prompts are decoded on the whole image; "
                               "crop layers apply to the point grid only (send crop_n_layers 0 with boxes)")
        full = Geometry(h, w, *resized_shape(h, w, pre.prompt_size))
        box_prompts = build_prompts(PromptInputs(boxes=boxes), full, pre.limits, pre.pad_prompt_tokens)
    crops = _crops(rgb, boxes, params, pre, whole_image_pixels=encode_image is None)
    del rgb
    timings.lap("image")

    if cancelled():
        raise Cancelled()
    embeddings = await asyncio.gather(*(encode(c.pixel_values) if c.pixel_values is not None
                                        else encode_image(c.geometry) for c in crops))
    timings.lap("encoder")

    grids = am.layer_point_grids(params)
    kept = []
    for crop, embedding in zip(crops, embeddings):
        if box_prompts is not None:
            n = boxes.shape[0]
            prompts, multimask = box_prompts, False
            sources = np.full((n, 2), np.nan), np.asarray(boxes, np.float32)
        else:
            g = crop.geometry
            points = grids[crop.layer] * np.array([g.original_w, g.original_h])[None, :]
            prompts, multimask = point_prompts(points, g, pre.pad_prompt_tokens), True
            sources = points, np.full((points.shape[0], 4), np.nan, np.float32)
        kept.append(await _decode_crop(crop, embedding, prompts, multimask, sources, (h, w), params, settings,
                                       decode, cancelled, timings))
    masks = am.Masks.concat(kept)
    if len(crops) > 1:
        masks = am.crop_nms(masks, params.crop_nms_thresh)
    if params.min_mask_region_area > 0:
        masks = am.clean_small_regions(masks, params.min_mask_region_area,
                                       max(params.box_nms_thresh, params.crop_nms_thresh), decode_rle, encode_rle)
    timings.lap("filtering")
    return masks


def output_arrays(masks: am.Masks) -> dict[str, np.ndarray]:
    """The response tensors of `sam_everything`, by output name."""
    return {
        spec.MASKS_RLE.name: np.array(masks.rles, dtype=np.object_).reshape(-1),
        spec.SCORES.name: masks.scores.astype(np.float32),
        spec.STABILITY_SCORES.name: masks.stability.astype(np.float32),
        spec.BBOXES.name: am.xyxy_to_xywh(masks.boxes).astype(np.int32).reshape(-1, 4),
        spec.AREAS.name: masks.areas.astype(np.int32),
        spec.POINT_COORDS.name: masks.points.astype(np.float32).reshape(-1, 2),
        spec.PROMPT_BOXES.name: masks.prompt_boxes.astype(np.float32).reshape(-1, 4),
        spec.CROP_BOXES.name: am.xyxy_to_xywh(masks.crop_boxes).astype(np.int32).reshape(-1, 4),
    }
