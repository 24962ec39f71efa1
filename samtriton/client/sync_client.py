"""Blocking SDK over tritonclient's gRPC or HTTP client."""

from __future__ import annotations

import numpy as np

from samtriton import spec
from samtriton.client.errors import SamTritonError, ServerUnavailableError, from_triton
from samtriton.client.inputs import as_boxes, encode_image
from samtriton.client.result import SegmentationResult
from samtriton.serving.outputs import OUTPUTS_PARAMETER
from samtriton.serving.postprocessing import decode_rle

PROTOCOLS = ("grpc", "http")
MASK_TRANSPORTS = ("rle", "dense")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


def _triton_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return module


def build_request(module, image_bytes: bytes, boxes: np.ndarray, mask_transport: str):
    """Inputs, requested outputs and parameters of one `sam` request (shared by the sync and async clients)."""
    if mask_transport not in MASK_TRANSPORTS:
        raise ValueError(f"mask_transport must be one of {MASK_TRANSPORTS}, got {mask_transport!r}")
    image = module.InferInput(spec.IMAGE.name, [1], spec.IMAGE.wire_dtype)
    image.set_data_from_numpy(np.array([image_bytes], dtype=np.object_))
    box_input = module.InferInput(spec.BOXES.name, list(boxes.shape), spec.BOXES.wire_dtype)
    box_input.set_data_from_numpy(boxes)
    masks_output = spec.MASKS_RLE.name if mask_transport == "rle" else spec.MASKS.name
    names = [spec.SCORES.name, masks_output]
    outputs = [module.InferRequestedOutput(n) for n in names]
    return [image, box_input], outputs, {OUTPUTS_PARAMETER: ",".join(names)}


def parse_response(response, boxes: np.ndarray, mask_transport: str) -> SegmentationResult:
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


class SamClient:
    """Segment an image with box prompts on a Triton server serving the `sam` ensemble.

    >>> client = SamClient("localhost:8001", protocol="grpc")
    >>> result = client.segment("photo.jpg", [[10, 20, 200, 240]])
    >>> result.masks.shape, result.scores
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", model_name: str = spec.ENSEMBLE,
                 timeout_s: float = 300.0):
        self.protocol = protocol
        self.model_name = model_name
        self.url = url or DEFAULT_URLS[protocol]
        self._module = _triton_module(protocol)
        self._timeout_s = timeout_s
        try:
            if protocol == "grpc":
                self._client = self._module.InferenceServerClient(self.url)
            else:
                self._client = self._module.InferenceServerClient(
                    self.url, connection_timeout=timeout_s, network_timeout=timeout_s
                )
        except Exception as e:
            raise ServerUnavailableError(f"cannot create a {protocol} client for {self.url}: {e}") from e

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._client.close()

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model_name))
        except Exception:
            return False

    def segment(self, image, boxes, mask_transport: str = "rle") -> SegmentationResult:
        """Masks for `boxes` (N x 4, xyxy, original pixels) on `image`.

        `image`: a path, encoded bytes, a PIL image or an HxWx3 uint8 RGB array.
        `mask_transport`: "rle" fetches compact COCO RLEs and decodes them here;
        "dense" fetches the N x H x W uint8 masks as they are.
        """
        box_array = as_boxes(boxes)
        inputs, outputs, params = build_request(self._module, encode_image(image), box_array, mask_transport)
        kwargs = {"client_timeout": self._timeout_s} if self.protocol == "grpc" else {}
        try:
            response = self._client.infer(self.model_name, inputs, outputs=outputs, parameters=params, **kwargs)
        except self._module.InferenceServerException as e:
            raise from_triton(e) from e
        except (ConnectionError, OSError) as e:
            raise ServerUnavailableError(f"{self.url}: {e}") from e
        return parse_response(response, box_array, mask_transport)
