"""asyncio SDK over tritonclient's grpc.aio / http.aio clients."""

from __future__ import annotations

import asyncio
from typing import Iterable

from tritonclient.utils import InferenceServerException

from samtriton import spec
from samtriton.client import protocol as proto
from samtriton.client.errors import ServerUnavailableError, from_triton
from samtriton.client.inputs import encode_image
from samtriton.client.result import EverythingResult, SegmentationResult


class AsyncSamClient(proto.ClientSettings):
    """The asyncio twin of `SamClient`: same methods, awaited.

    >>> async with AsyncSamClient("localhost:8001") as client:
    ...     results = await client.segment_many([(img, boxes) for img, boxes in work], concurrency=32)
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", model_name: str = spec.ENSEMBLE,
                 encode_model_name: str = spec.ENCODE_ENSEMBLE, timeout_s: float = 300.0, *,
                 model: str | None = None, everything_model_name: str = spec.EVERYTHING):
        super().__init__(url, protocol, model_name, encode_model_name, timeout_s, model=model,
                         everything_model_name=everything_model_name)
        if protocol == "grpc":
            import tritonclient.grpc.aio as aio

            self._client = aio.InferenceServerClient(self.url)
        else:
            import tritonclient.http.aio as aio

            self._client = aio.InferenceServerClient(self.url, conn_timeout=timeout_s)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready() and await self._client.is_model_ready(self.model_name))
        except Exception:
            return False

    async def _infer(self, model_name, inputs, outputs, parameters=None):
        try:
            return await self._client.infer(model_name, inputs, outputs=outputs, parameters=parameters,
                                            **self._infer_kwargs())
        except InferenceServerException as e:
            raise from_triton(e) from e
        except (ConnectionError, OSError) as e:
            raise ServerUnavailableError(f"{self.url}: {e}") from e

    async def segment(self, image, boxes=None, *, points=None, point_labels=None, mask_input=None,
                      multimask=False, prompts=None, mask_transport: str = proto.DEFAULT_MASK_TRANSPORT,
                      return_low_res_logits: bool = False) -> SegmentationResult:
        """See `SamClient.segment`.  With mixed prompt kinds, the first request
        encodes the image and the others, answered from the cache, run together."""
        image_bytes = encode_image(image)
        plan = proto.plan_requests(boxes, points, point_labels, mask_input, prompts)

        async def one(wire):
            inputs, outputs, params = proto.segment_request(self._module, image_bytes, wire, mask_transport,
                                                            multimask, return_low_res_logits)
            response = await self._infer(self.model_name, inputs, outputs, params)
            return proto.segment_response(response, wire, mask_transport, multimask, return_low_res_logits)

        first = await one(plan[0][1])
        if len(plan) == 1:
            return first
        rest = await asyncio.gather(*(one(wire) for _, wire in plan[1:]))
        parts = list(zip([members for members, _ in plan], [first, *rest]))
        return proto.merge_results(parts, multimask, return_low_res_logits)

    async def segment_everything(self, image, boxes=None, **params) -> EverythingResult:
        """See `SamClient.segment_everything`."""
        inputs, outputs, parameters = proto.everything_request(self._module, encode_image(image), boxes, params)
        return proto.everything_response(await self._infer(self.everything_model_name, inputs, outputs, parameters))

    async def encode(self, image, return_embeddings: bool = False) -> proto.EncodedImage:
        image_bytes = encode_image(image)
        model, inputs, outputs, params = proto.encode_request(
            self._module, image_bytes, return_embeddings, self.model_name, self.encode_model_name
        )
        response = await self._infer(model, inputs, outputs, params)
        return proto.encode_response(response, image_bytes, return_embeddings)

    async def decode(self, encoded: proto.EncodedImage, boxes=None, **prompts) -> SegmentationResult:
        """See `SamClient.decode`."""
        return await self.segment(encoded.image_bytes, boxes, **prompts)

    async def segment_many(self, requests: Iterable[tuple[object, object]], concurrency: int = 16,
                           mask_transport: str = proto.DEFAULT_MASK_TRANSPORT,
                           return_exceptions: bool = False) -> list:
        """Keeps up to `concurrency` requests in flight; results in input order.
        Items are (image, boxes) or (image, {keyword arguments of `segment`})."""
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        gate = asyncio.Semaphore(concurrency)

        async def one(image, prompts):
            kwargs = dict(prompts) if isinstance(prompts, dict) else {"boxes": prompts}
            kwargs.setdefault("mask_transport", mask_transport)
            async with gate:
                return await self.segment(image, **kwargs)

        tasks = [asyncio.ensure_future(one(image, prompts)) for image, prompts in requests]
        try:
            return await asyncio.gather(*tasks, return_exceptions=return_exceptions)
        finally:
            for task in tasks:  # on the first error (without return_exceptions) stop the rest
                task.cancel()
