"""Requests and responses of the `sam` and `sam_encode` ensembles, shared by the sync
and asyncio clients (tritonclient's InferInput/InferRequestedOutput are the same
classes for a protocol's sync and aio clients)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from samtriton import spec
from samtriton.client.errors import SamTritonError
from samtriton.client.inputs import WirePrompts, as_boxes, group_prompts, wire_prompts
from samtriton.client.result import EverythingResult, SegmentationResult
from samtriton.serving.request_parameters import MULTIMASK_PARAMETER, OUTPUTS_PARAMETER
from samtriton.serving.postprocessing import decode_rle, unpack_masks
from samtriton.serving.prompts import Geometry
from samtriton.variants import get_variant

PROTOCOLS = ("grpc", "http")
# How `segment` fetches the masks it returns as arrays (`SegmentationResult.masks`):
# "packed": `masks_packed` (8 pixels a byte) and `image_size`, unpacked here;
# "rle": COCO RLEs, decoded here and kept as `SegmentationResult.rles`;
# "dense": `masks` as they are, a byte a pixel.
MASK_TRANSPORTS = ("packed", "rle", "dense")
DEFAULT_MASK_TRANSPORT = "packed"
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


@dataclass(frozen=True)
class EncodedImage:
    """An image whose embedding the server has computed (and cached).

    Holds the encoded file, not the 4 MB embedding: decoding sends the file
    again and the server answers from its embedding cache (keyed by the file's bytes).
    `embeddings` is filled only when asked for (`encode(..., return_embeddings=True)`).
    """

    image_bytes: bytes
    height: int
    width: int
    embeddings: np.ndarray | None = None


class ClientSettings:
    """What the sync and asyncio clients share: where, which models, how long to wait."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", model_name: str = spec.ENSEMBLE,
                 encode_model_name: str = spec.ENCODE_ENSEMBLE, timeout_s: float = 300.0, *,
                 model: str | None = None, everything_model_name: str = spec.EVERYTHING):
        if model is not None:
            # A variant name (`samtriton models`) picks its own ensembles; an
            # unknown one raises UnknownModelError listing the valid names.
            variant = get_variant(model)
            model_name, encode_model_name = variant.ensemble, variant.encode_ensemble
            everything_model_name = spec.model_names(variant.slug).everything
        self.everything_model_name = everything_model_name
        self.protocol = protocol
        self.model_name = model_name
        self.encode_model_name = encode_model_name
        self.url = url or DEFAULT_URLS[protocol]
        self._module = triton_module(protocol)
        self._timeout_s = timeout_s

    def _infer_kwargs(self) -> dict:
        return {"client_timeout": self._timeout_s} if self.protocol == "grpc" else {}


def triton_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return module


def _image_input(module, image_bytes: bytes):
    image = module.InferInput(spec.IMAGE.name, [1], spec.IMAGE.wire_dtype)
    image.set_data_from_numpy(np.array([image_bytes], dtype=np.object_))
    return image


def _input(module, spec_tensor, array: np.ndarray):
    tensor = module.InferInput(spec_tensor.name, list(array.shape), spec_tensor.wire_dtype)
    tensor.set_data_from_numpy(array)
    return tensor


_MASK_OUTPUTS = {"packed": (spec.MASKS_PACKED.name, spec.IMAGE_SIZE.name), "rle": (spec.MASKS_RLE.name,),
                 "dense": (spec.MASKS.name,)}


def segment_request(module, image_bytes: bytes, prompts: WirePrompts, mask_transport: str,
                    multimask: bool = False, low_res_logits: bool = False):
    """Inputs, requested outputs and parameters of one `sam` request."""
    if mask_transport not in MASK_TRANSPORTS:
        raise ValueError(f"mask_transport must be one of {MASK_TRANSPORTS}, got {mask_transport!r}")
    arrays = prompts.arrays()
    inputs = [_image_input(module, image_bytes)] + [_input(module, t, arrays[t.name])
                                                     for t in spec.PROMPT_INPUTS if t.name in arrays]
    names = [spec.SCORES.name, *_MASK_OUTPUTS[mask_transport]]
    if low_res_logits:
        names.append(spec.LOW_RES_LOGITS.name)
    outputs = [module.InferRequestedOutput(n) for n in names]
    parameters = {OUTPUTS_PARAMETER: ",".join(names)}
    if multimask:
        parameters[MULTIMASK_PARAMETER] = True
    return inputs, outputs, parameters


def segment_response(response, prompts: WirePrompts, mask_transport: str, multimask: bool = False,
                     low_res_logits: bool = False) -> SegmentationResult:
    scores = response.as_numpy(spec.SCORES.name)
    if mask_transport == "rle":
        rle_array = response.as_numpy(spec.MASKS_RLE.name)
        if rle_array is None:
            raise SamTritonError("response is missing masks_rle")
        flat = [bytes(r) for r in rle_array.reshape(-1)]
        masks = decode_rle(flat)
        masks = masks.reshape(*rle_array.shape, *masks.shape[1:])
        rles = [flat[i:i + 3] for i in range(0, len(flat), 3)] if multimask else flat
    elif mask_transport == "packed":
        rles = []
        packed, size = response.as_numpy(spec.MASKS_PACKED.name), response.as_numpy(spec.IMAGE_SIZE.name)
        if packed is None or size is None:
            raise SamTritonError("response is missing masks_packed or image_size")
        if size.shape != (2,) or packed.ndim < 2 or packed.shape[-2] != size[0]:
            raise SamTritonError(f"response's masks_packed {list(packed.shape)} disagrees with its image_size "
                                 f"{size.tolist()}")
        try:
            masks = unpack_masks(packed, int(size[1]))
        except ValueError as e:
            raise SamTritonError(f"response's masks_packed: {e}") from e
    else:
        rles = []
        masks = response.as_numpy(spec.MASKS.name).astype(bool)
    logits = response.as_numpy(spec.LOW_RES_LOGITS.name) if low_res_logits else None
    expected = (len(prompts), 3) if multimask else (len(prompts),)
    if scores is None or scores.shape != expected or masks.shape[:len(expected)] != expected:
        raise SamTritonError(f"response outputs disagree with the {len(prompts)} prompts sent "
                             f"(scores {None if scores is None else list(scores.shape)}, masks {list(masks.shape)})")
    if low_res_logits and (logits is None or logits.shape[0] != len(prompts)):
        raise SamTritonError("response is missing low_res_logits")
    return SegmentationResult(masks=masks, scores=scores.astype(np.float32), boxes=prompts.boxes, rles=rles,
                              points=prompts.points, point_labels=prompts.point_labels, low_res_logits=logits,
                              multimask=multimask)


def plan_requests(boxes=None, points=None, point_labels=None, mask_input=None,
                  prompts=None) -> list[tuple[list[int], WirePrompts]]:
    """The `sam` requests a `segment` call makes: one, or one per prompt kind
    when `prompts` (a list of `Prompt`) mixes kinds; with each request's
    positions among the prompts."""
    if prompts is not None:
        if any(v is not None for v in (boxes, points, point_labels, mask_input)):
            raise ValueError("pass either prompts=[Prompt, ...] or boxes/points/point_labels/mask_input, not both")
        return group_prompts(prompts)
    wire = wire_prompts(boxes, points, point_labels, mask_input)
    return [(list(range(len(wire))), wire)]


def merge_results(parts: list[tuple[list[int], SegmentationResult]], multimask: bool,
                  low_res_logits: bool) -> SegmentationResult:
    """Results of the per-kind requests of `group_prompts` -> one result in prompt order."""
    n = sum(len(members) for members, _ in parts)
    order = np.empty(n, dtype=np.int64)
    at = 0
    for members, _ in parts:
        order[members] = np.arange(at, at + len(members))
        at += len(members)
    results = [r for _, r in parts]

    def cat(values):
        return np.concatenate(values)[order]

    boxes = None
    if any(r.boxes is not None for r in results):
        boxes = cat([r.boxes if r.boxes is not None else np.full((len(r), 4), np.nan, np.float32) for r in results])
    points = labels = None
    if any(r.points is not None for r in results):
        width = max(r.points.shape[1] for r in results if r.points is not None)
        padded_points, padded_labels = [], []
        for r in results:
            p = np.zeros((len(r), width, 2), np.float32)
            lab = np.full((len(r), width), -1, np.int32)
            if r.points is not None:
                p[:, : r.points.shape[1]] = r.points
                lab[:, : r.points.shape[1]] = r.point_labels
            padded_points.append(p)
            padded_labels.append(lab)
        points, labels = cat(padded_points), cat(padded_labels)
    rles = [rle for r in results for rle in r.rles]
    return SegmentationResult(
        masks=cat([r.masks for r in results]), scores=cat([r.scores for r in results]), boxes=boxes,
        rles=[rles[i] for i in order] if rles else [], points=points, point_labels=labels,
        low_res_logits=cat([r.low_res_logits for r in results]) if low_res_logits else None, multimask=multimask)


def everything_request(module, image_bytes: bytes, boxes=None, params: dict | None = None):
    """Inputs, requested outputs and parameters of one `sam_everything` request."""
    inputs = [_image_input(module, image_bytes)]
    if boxes is not None:
        inputs.append(_input(module, spec.BOXES, as_boxes(boxes)))
    outputs = [module.InferRequestedOutput(t.name) for t in spec.EVERYTHING_OUTPUTS]
    parameters = {}
    for name, value in (params or {}).items():
        # gRPC and JSON carry ints, floats and bools; numpy scalars are not theirs.
        parameters[name] = value.item() if isinstance(value, np.generic) else value
    return inputs, outputs, parameters


def everything_response(response) -> EverythingResult:
    arrays = {t.name: response.as_numpy(t.name) for t in spec.EVERYTHING_OUTPUTS}
    missing = [name for name, a in arrays.items() if a is None]
    if missing:
        raise SamTritonError(f"response is missing {', '.join(missing)}")
    return EverythingResult(
        rles=[bytes(r) for r in arrays[spec.MASKS_RLE.name].reshape(-1)],
        scores=arrays[spec.SCORES.name], stability_scores=arrays[spec.STABILITY_SCORES.name],
        bboxes=arrays[spec.BBOXES.name].reshape(-1, 4), areas=arrays[spec.AREAS.name],
        point_coords=arrays[spec.POINT_COORDS.name].reshape(-1, 2),
        prompt_boxes=arrays[spec.PROMPT_BOXES.name].reshape(-1, 4),
        crop_boxes=arrays[spec.CROP_BOXES.name].reshape(-1, 4),
    )


# A box inside any image: its mask is cheap and tells the image size.
_PROBE_BOX = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)


def encode_request(module, image_bytes: bytes, return_embeddings: bool, segment_model: str, encode_model: str):
    """(model, inputs, requested outputs, parameters) of a request that runs the
    image encoder, so that the embedding cache holds this image's embedding.

    With `return_embeddings`: `sam_encode`, asking for the 4 MB embedding.
    Without: Triton's ensemble skips steps whose outputs nobody asked for, so a
    `sam_encode` request for the geometry alone would not run the encoder; a
    `sam` request with a 1-pixel box and only `masks_rle` does, for the price
    of one small decoder call, and the RLE's size is the image size.
    """
    if return_embeddings:
        names = [spec.IMAGE_GEOMETRY.name, spec.IMAGE_EMBEDDINGS_NAME]
        return encode_model, [_image_input(module, image_bytes)], [module.InferRequestedOutput(n) for n in names], None
    inputs, _, _ = segment_request(module, image_bytes, WirePrompts(boxes=_PROBE_BOX), "rle")
    outputs = [module.InferRequestedOutput(spec.MASKS_RLE.name)]
    return segment_model, inputs, outputs, {OUTPUTS_PARAMETER: spec.MASKS_RLE.name}


def encode_response(response, image_bytes: bytes, return_embeddings: bool) -> EncodedImage:
    if return_embeddings:
        geometry = Geometry.from_array(response.as_numpy(spec.IMAGE_GEOMETRY.name))
        height, width = geometry.original_h, geometry.original_w
        embeddings = response.as_numpy(spec.IMAGE_EMBEDDINGS_NAME)
    else:
        height, width = json.loads(response.as_numpy(spec.MASKS_RLE.name)[0])["size"]
        embeddings = None
    return EncodedImage(image_bytes, int(height), int(width), embeddings)
