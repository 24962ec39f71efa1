"""Blocking SDK over tritonclient's gRPC or HTTP client."""

from __future__ import annotations

import asyncio
from typing import Iterable

from tritonclient.utils import InferenceServerException

from samtriton import spec
from samtriton.client import protocol as proto
from samtriton.client.errors import ServerUnavailableError, from_triton
from samtriton.client.inputs import encode_image
from samtriton.client.result import EverythingResult, SegmentationResult


class SamClient(proto.ClientSettings):
    """Segment images with box and point prompts on a Triton server serving the `sam` ensemble.

    >>> client = SamClient("localhost:8001", protocol="grpc")
    >>> result = client.segment("photo.jpg", [[10, 20, 200, 240]])
    >>> result.masks.shape, result.scores
    >>> clicks = client.segment("photo.jpg", points=[[120, 80], [300, 90]], point_labels=[1, 0])

    `model="efficientvit-sam-l0"` calls that variant's ensembles in a
    repository holding several (the default is the repository's `sam`).

    Interactive use, one image and many prompts: `encoded = client.encode(image)`
    once, then `client.decode(encoded, points=..., ...)` per click; the server
    answers from its embedding cache, so a click costs the decoder.  Feed an answer back
    with `mask_input=previous.low_res_logits[:, 0]` (asked for with
    `return_low_res_logits=True`).
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", model_name: str = spec.ENSEMBLE,
                 encode_model_name: str = spec.ENCODE_ENSEMBLE, timeout_s: float = 300.0, *,
                 model: str | None = None, everything_model_name: str = spec.EVERYTHING):
        super().__init__(url, protocol, model_name, encode_model_name, timeout_s, model=model,
                         everything_model_name=everything_model_name)
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

    def _infer(self, model_name, inputs, outputs, parameters=None):
        try:
            return self._client.infer(model_name, inputs, outputs=outputs, parameters=parameters,
                                      **self._infer_kwargs())
        except InferenceServerException as e:
            raise from_triton(e) from e
        except (ConnectionError, OSError) as e:
            raise ServerUnavailableError(f"{self.url}: {e}") from e

    def segment(self, image, boxes=None, *, points=None, point_labels=None, mask_input=None, multimask=False,
                prompts=None, mask_transport: str = proto.DEFAULT_MASK_TRANSPORT,
                return_low_res_logits: bool = False) -> SegmentationResult:
        """Masks for N prompts on `image`, one per prompt (three with `multimask`).

        `image`: a path, encoded bytes, a PIL image or an HxWx3 uint8 RGB array.
        Prompts, in original pixels, N of them sharing their kinds:
          `boxes` (N, 4) xyxy;
          `points` (N, P, 2) xy, or a list of N lists of any lengths (padded with
            label -1 here), or (P, 2) / (2,) for one prompt;
          `point_labels` like `points` without the xy axis: 1 foreground, 0
            background (default: all 1);
          `mask_input` (N, 256, 256): low-res logits of a previous answer
            (`return_low_res_logits=True`), to refine it.
        Boxes and points together make box + points prompts.  To mix kinds
        (some prompts with a box, some without), pass `prompts=[Prompt(...), ...]`:
        one request per kind is sent, the image is encoded once.
        `multimask`: three candidates per prompt with their predicted IoU
        (masks (N, 3, H, W), scores (N, 3)), for ambiguous single clicks.
        `mask_transport`: "packed" (the default) fetches the masks 8 pixels a
        byte and unpacks them here, cheap at both ends whatever the masks look
        like; "rle" fetches COCO RLEs (also kept as `rles`, e.g. for COCO
        files) and decodes them here; "dense" fetches the N x H x W uint8 masks
        as they are, 8 times the bytes.
        """
        image_bytes = encode_image(image)
        plan = proto.plan_requests(boxes, points, point_labels, mask_input, prompts)
        parts = []
        for members, wire in plan:  # the first request encodes the image; the others hit the cache
            inputs, outputs, params = proto.segment_request(self._module, image_bytes, wire, mask_transport,
                                                            multimask, return_low_res_logits)
            response = self._infer(self.model_name, inputs, outputs, params)
            parts.append((members, proto.segment_response(response, wire, mask_transport, multimask,
                                                          return_low_res_logits)))
        if len(parts) == 1:
            return parts[0][1]
        return proto.merge_results(parts, multimask, return_low_res_logits)

    def segment_everything(self, image, boxes=None, **params) -> EverythingResult:
        """Segment everything in `image` (upstream's automatic mask generator, served).

        `params`: the generator's knobs, with its names and defaults
        (points_per_side=32, points_per_batch=64, pred_iou_thresh=0.88,
        stability_score_thresh=0.95, stability_score_offset=1.0,
        box_nms_thresh=0.7, crop_n_layers=0, crop_nms_thresh=0.7,
        crop_overlap_ratio=512/1500, crop_n_points_downscale_factor=1,
        min_mask_region_area=0); an unknown name or a value out of range raises
        InvalidInputError naming it.  `boxes` (N, 4) xyxy, e.g. a detector's:
        prompts instead of the point grid (MobileSAMv2's object-aware mode),
        one mask per box, filtered the same way.
        """
        inputs, outputs, parameters = proto.everything_request(self._module, encode_image(image), boxes, params)
        return proto.everything_response(self._infer(self.everything_model_name, inputs, outputs, parameters))

    def encode(self, image, return_embeddings: bool = False) -> proto.EncodedImage:
        """Run the image encoder once (the server caches the embedding)."""
        image_bytes = encode_image(image)
        model, inputs, outputs, params = proto.encode_request(
            self._module, image_bytes, return_embeddings, self.model_name, self.encode_model_name
        )
        response = self._infer(model, inputs, outputs, params)
        return proto.encode_response(response, image_bytes, return_embeddings)

    def decode(self, encoded: proto.EncodedImage, boxes=None, **prompts) -> SegmentationResult:
        """Masks for new prompts on an image passed to `encode` before: the same
        arguments as `segment`; only the decoder runs (a click costs tens of ms)."""
        return self.segment(encoded.image_bytes, boxes, **prompts)

    def segment_many(self, requests: Iterable[tuple[object, object]], concurrency: int = 16,
                     mask_transport: str = proto.DEFAULT_MASK_TRANSPORT,
                     return_exceptions: bool = False) -> list:
        """Segment many (image, boxes) pairs keeping `concurrency` requests in flight;
        an item may also be (image, {"points": ..., "multimask": True, ...}), the
        keyword arguments of `segment`.

        Results come in the order of `requests`.  With `return_exceptions`, a
        failed request gives its exception in its place instead of raising.
        Runs an asyncio client of the same protocol on a private event loop.
        """
        from samtriton.client.async_client import AsyncSamClient

        async def run():
            async with AsyncSamClient(self.url, self.protocol, self.model_name, self.encode_model_name,
                                      self._timeout_s) as client:
                return await client.segment_many(requests, concurrency, mask_transport, return_exceptions)

        return asyncio.run(run())
