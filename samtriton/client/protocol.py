"""Requests and responses of the `sam` and `sam_encode` ensembles, shared by the sync
and asyncio clients (tritonclient's InferInput/InferRequestedOutput are the same
classes for a protocol's sync and aio clients)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from samtriton import spec
from samtriton.client.errors import SamTritonError
from samtriton.client.result import SegmentationResult
from samtriton.serving.outputs import OUTPUTS_PARAMETER
from samtriton.serving.postprocessing import decode_rle
from samtriton.serving.preprocessing import Geometry
from samtriton.variants import get_variant

PROTOCOLS = ("grpc", "http")
MASK_TRANSPORTS = ("rle", "dense")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


@dataclass(frozen=True)
class EncodedImage:
    """An image whose embedding the server has computed (and cached).

    Holds the encoded file, not the 4 MB embedding: decoding sends the file
    again and the server's encoder answers from its response cache.
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
                 model: str | None = None):
        if model is not None:
            # A variant name (`samtriton models`) picks its own ensembles; an
            # unknown one raises UnknownModelError listing the valid names.
            variant = get_variant(model)
            model_name, encode_model_name = variant.ensemble, variant.encode_ensemble
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


def segment_request(module, image_bytes: bytes, boxes: np.ndarray, mask_transport: str):
    """Inputs, requested outputs and parameters of one `sam` request."""
    if mask_transport not in MASK_TRANSPORTS:
        raise ValueError(f"mask_transport must be one of {MASK_TRANSPORTS}, got {mask_transport!r}")
    box_input = module.InferInput(spec.BOXES.name, list(boxes.shape), spec.BOXES.wire_dtype)
    box_input.set_data_from_numpy(boxes)
    masks_output = spec.MASKS_RLE.name if mask_transport == "rle" else spec.MASKS.name
    names = [spec.SCORES.name, masks_output]
    outputs = [module.InferRequestedOutput(n) for n in names]
    return [_image_input(module, image_bytes), box_input], outputs, {OUTPUTS_PARAMETER: ",".join(names)}


def segment_response(response, boxes: np.ndarray, mask_transport: str) -> SegmentationResult:
    scores = response.as_numpy(spec.SCORES.name)
    if mask_transport == "rle":
        rles = [bytes(r) for r in response.as_numpy(spec.MASKS_RLE.name)]
        masks = decode_rle(rles)
    else:
        rles = []
        masks = response.as_numpy(spec.MASKS.name).astype(bool)
    if scores is None or masks.shape[0] != scores.shape[0]:
        raise SamTritonError("response is missing outputs or their lengths disagree")
    return SegmentationResult(masks=masks, scores=scores.astype(np.float32), boxes=boxes, rles=rles)


# A box inside any image: its mask is cheap and tells the image size.
_PROBE_BOX = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)


def encode_request(module, image_bytes: bytes, return_embeddings: bool, segment_model: str, encode_model: str):
    """(model, inputs, requested outputs, parameters) of a request that runs the
    image encoder, so that its response cache holds this image's embedding.

    With `return_embeddings`: `sam_encode`, asking for the 4 MB embedding.
    Without: Triton's ensemble skips steps whose outputs nobody asked for, so a
    `sam_encode` request for the geometry alone would not run the encoder; a
    `sam` request with a 1-pixel box and only `masks_rle` does, for the price
    of one small decoder call, and the RLE's size is the image size.
    """
    if return_embeddings:
        names = [spec.IMAGE_GEOMETRY.name, spec.IMAGE_EMBEDDINGS_NAME]
        return encode_model, [_image_input(module, image_bytes)], [module.InferRequestedOutput(n) for n in names], None
    inputs, _, _ = segment_request(module, image_bytes, _PROBE_BOX, "rle")
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
