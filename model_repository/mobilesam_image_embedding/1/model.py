"""Triton python model: an image's embedding, from the embedding cache or from the encoder.

Keyed by a digest of the encoded image plus the variant and its
preprocessing settings (`samtriton.serving.embedding_cache`), so a hit costs
a hash of the bytes the client sent: no decode, no resize, no 12 MB encoder
input to build or to hash.  On a miss the image is decoded, resized and
normalised on a thread of this model's pool, and sent to the
`image_encoder` through BLS, where Triton's dynamic batcher batches it with
other misses.

One instance serves every request, so every request sees one cache; hits must
not wait behind misses.  `execute()` answers a hit itself, through the
request's response sender (Triton 24.06+ default mode: one response per
request), and hands every other request to an event loop on a thread of its
own, which answers it the same way once its embedding is computed.
Answering hits on the loop as well cost them 0.7-2.2 ms more beyond the
decoder's compute (median 1.2 ms, six paired runs of `perf/cache_ratio.py`):
the loop's thread first has to wake and take the GIL.  Concurrent requests
for the same new image run the encoder once.

On the CPU target (parameter `embedding_handoff_spare_slots` > 0) the
embeddings live in a /dev/shm arena (`samtriton.serving.embedding_arena`), and
a request that asks for `embedding_handle` (the `sam` ensemble's) is answered
with the slot's handle, which the decoder reads in place; one that asks for
`image_embeddings` (`sam_encode`, sam_everything) gets a copy of the slot.
"""

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from samtriton import spec
from samtriton.serving.embedding_arena import EMBEDDING_BYTES, EmbeddingArena, Stored
from samtriton.serving.embedding_cache import EmbeddingCache, image_key
from samtriton.serving.errors import EmbeddingGone, InvalidInput
from samtriton.serving.preprocessing import (
    PreprocessSettings,
    decode_image,
    encoder_input,
    settings_fingerprint,
)
from samtriton.serving.triton_helpers import ErrorResponses, StepFailed, bls_output, input_array, model_parameters, tensor


class EncoderBusy(RuntimeError):
    """As many images as the encoder can hold are being embedded already."""


class TritonPythonModel:
    def initialize(self, args):
        self.name = args["model_name"]
        self.error = ErrorResponses(args)
        params = model_parameters(args)
        self.settings = PreprocessSettings.from_parameters(params)
        self.encoder_name = params["image_encoder"]
        # New images beyond this many in flight are refused here (UNAVAILABLE), not
        # by the encoder: a Triton queue policy there stops its batcher from
        # prefetching, and Triton 2.51's python backend keeps the 12 MB input of a BLS
        # request the encoder refuses (measured: +25 MB resident per refusal, never
        # given back).  0: no bound.
        self.max_misses = int(params["max_misses_in_flight"])
        self.misses = 0
        self.context = f"{params['samtriton_model']}|{settings_fingerprint(self.settings)}"
        self.cpu = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        self.pool = ThreadPoolExecutor(max_workers=int(params["decode_threads"]),
                                       thread_name_prefix="image-decode")
        labels = {"model": args["model_name"]}
        self._events_family = pb_utils.MetricFamily(
            name=spec.EMBEDDING_CACHE_EVENTS_METRIC, kind=pb_utils.MetricFamily.COUNTER,
            description="embedding cache: hits, misses, requests that waited for another's miss (shared), "
                        "evictions")
        self._events = {event: self._events_family.Metric(labels={**labels, "event": event})
                        for event in ("hit", "miss", "shared", "eviction")}
        self._size_family = pb_utils.MetricFamily(
            name=spec.EMBEDDING_CACHE_BYTES_METRIC, kind=pb_utils.MetricFamily.GAUGE,
            description="bytes of embeddings held by the embedding cache")
        self._size = self._size_family.Metric(labels=labels)
        cache_mb = os.environ.get(spec.EMBEDDING_CACHE_MB_ENV) or params["embedding_cache_mb"]
        capacity = int(float(cache_mb) * 1024 * 1024)
        spare = int(params.get("embedding_handoff_spare_slots", "0"))
        try:
            self.arena = EmbeddingArena(capacity // EMBEDDING_BYTES + spare) if spare > 0 else None
        except OSError as e:
            raise RuntimeError(f"{self.name}: cannot create the embedding arena in /dev/shm ({e}); give the "
                               f"host or container more shared memory (Docker: --shm-size) than the embedding "
                               f"cache ({cache_mb} MiB) plus {spare} x 4 MiB, or build with --no-embedding-handoff"
                               ) from e
        self.cache = EmbeddingCache(capacity, on_event=lambda event, n: self._events[event].increment(n),
                                    on_drop=None if self.arena is None else self.arena.release)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="image-embedding", daemon=True)
        self.thread.start()

    def _pixels(self, image_bytes: bytes, geometry: np.ndarray) -> np.ndarray:
        rgb = decode_image(image_bytes, self.settings.limits)
        if tuple(rgb.shape[:2]) != (int(geometry[0]), int(geometry[1])):
            raise InvalidInput(spec.IMAGE_GEOMETRY.name, f"is {geometry[:2].tolist()} but the image decodes to "
                               f"{list(rgb.shape[:2])}")
        return encoder_input(rgb, self.settings)

    async def _encode(self, image_bytes: bytes, geometry: np.ndarray) -> np.ndarray | Stored:
        if self.max_misses and self.misses >= self.max_misses:
            # Triton's own words for a full queue, which clients (and the SDK) know as backpressure.
            raise EncoderBusy(f"{self.encoder_name}: exceeds maximum queue size ({self.misses} new images are "
                              "being embedded, the build's bound); retry later or on another replica")
        self.misses += 1
        try:
            return await self._encode_now(image_bytes, geometry)
        finally:
            self.misses -= 1

    async def _encode_now(self, image_bytes: bytes, geometry: np.ndarray) -> np.ndarray:
        pixels = await self.loop.run_in_executor(self.pool, self._pixels, image_bytes, geometry)
        request = pb_utils.InferenceRequest(
            model_name=self.encoder_name, requested_output_names=[spec.IMAGE_EMBEDDINGS_NAME],
            inputs=[pb_utils.Tensor(spec.PIXEL_VALUES_NAME, pixels[np.newaxis])], preferred_memory=self.cpu)
        response = await request.async_exec()
        embedding = bls_output(response, self.encoder_name, spec.IMAGE_EMBEDDINGS_NAME)
        # The response's tensor is gone with it: kept as a copy, or in the arena.
        return embedding.copy() if self.arena is None else self.arena.store(embedding)

    def _failure(self, exc):
        if isinstance(exc, (EncoderBusy, EmbeddingGone)) or (
                isinstance(exc, StepFailed) and exc.code == pb_utils.TritonError.UNAVAILABLE):
            # The encoder's queue is full, its timeout passed or an eviction won a race: the client may retry.
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE))
        return self.error(exc)

    def _embedding_response(self, embedding: np.ndarray | Stored, wanted: set[str]):
        """The response with the outputs `wanted`; None if `embedding`'s slot was
        overwritten meanwhile (it was evicted: look again)."""
        if self.arena is None:
            return pb_utils.InferenceResponse(output_tensors=[tensor(spec.IMAGE_EMBEDDINGS_NAME, embedding)])
        outputs = []
        if spec.EMBEDDING_HANDLE.name in wanted:
            outputs.append(tensor(spec.EMBEDDING_HANDLE.name, self.arena.handle(embedding)))
        if spec.IMAGE_EMBEDDINGS_NAME in wanted or not outputs:
            array = self.arena.copy(embedding)
            if array is None:
                return None
            outputs.append(tensor(spec.IMAGE_EMBEDDINGS_NAME, array))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    async def _answer(self, sender, key: bytes, image_bytes: bytes, geometry: np.ndarray, wanted: set[str]) -> None:
        try:
            embedding = await self.cache.get_or_compute(key, lambda: self._encode(image_bytes, geometry))
            self._size.set(self.cache.size_bytes)  # only a computed embedding changes it
            response = self._embedding_response(embedding, wanted)
            if response is None:
                raise EmbeddingGone(f"{self.name}: the embedding was evicted while it was sent; retry")
        except Exception as e:  # one response per request, whatever happens
            response = self._failure(e)
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                images = input_array(request, spec.IMAGE.name).reshape(-1)
                if images.size != 1:
                    raise InvalidInput(spec.IMAGE.name, f"expected exactly one encoded image, got {images.size}")
                # Copies: the request's tensors are gone once execute() returns.
                image_bytes = bytes(images[0])
                geometry = input_array(request, spec.IMAGE_GEOMETRY.name).reshape(-1).copy()
                key = image_key(image_bytes, self.context)
                wanted = set(request.requested_output_names())
                embedding = self.cache.hit(key)
                response = None if embedding is None else self._embedding_response(embedding, wanted)
            except Exception as e:
                response = self._failure(e)
            if response is not None:
                try:
                    sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception as e:  # the requests after this one must still be answered
                    pb_utils.Logger.log_error(f"{self.name}: sending a response failed: {e}")
                continue
            asyncio.run_coroutine_threadsafe(self._answer(sender, key, image_bytes, geometry, wanted), self.loop)
        return None

    def finalize(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.arena is not None:
            self.arena.close()
