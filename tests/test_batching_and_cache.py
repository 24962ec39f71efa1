"""Batching across requests (encoder dynamic batching, decoder ragged batching), the
embedding cache, and the SDK at concurrency >= 16, against a real tritonserver."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from samtriton import spec
from samtriton.client import AsyncSamClient, InvalidInputError, SamClient
from samtriton.client.errors import from_triton
from samtriton.sample_image import sample_scene
from samtriton.serving.pipeline import InProcessPipeline
from samtriton.variants import get_variant
from tests.conftest import decoder_prompt_inputs, encode, infer, mask_iou, random_boxes

pytestmark = pytest.mark.integration

# The default variant's steps (the test repository's `sam`).
ENCODER = spec.model_names("mobilesam").image_encoder
DECODER = spec.model_names("mobilesam").mask_decoder
EMBEDDING = spec.model_names("mobilesam").image_embedding

CONCURRENCY = 16


def _stats(server, model: str) -> dict[str, int]:
    import tritonclient.grpc as g

    client = g.InferenceServerClient(server.grpc_url)
    try:
        s = client.get_inference_statistics(model).model_stats[0]
    finally:
        client.close()
    return {
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "cache_hit": s.inference_stats.cache_hit.count,
        "cache_miss": s.inference_stats.cache_miss.count,
        "success": s.inference_stats.success.count,
    }


def _delta(after, before):
    return {k: after[k] - before[k] for k in after}


def _settled_delta(server, model, before, expect: dict, timeout_s: float = 5.0):
    """The change in `model`'s statistics since `before`, once it shows `expect`
    (Triton records some counters just after the response leaves) or time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        delta = _delta(_stats(server, model), before)
        if all(delta[k] == v for k, v in expect.items()) or time.monotonic() > deadline:
            return delta
        time.sleep(0.05)


def _settled_events(server, model, before, expect: dict, timeout_s: float = 5.0):
    """The change in `model`'s embedding-cache counters since `before`, once it shows `expect`."""
    deadline = time.monotonic() + timeout_s
    while True:
        delta = _delta(server.embedding_cache_events(model), before)
        if all(delta[k] == v for k, v in expect.items()) or time.monotonic() > deadline:
            return delta
        time.sleep(0.05)


def _workload(n: int, seed: int):
    """n distinct images (never served before: seeds of their own) with 1..n boxes each."""
    work = []
    for i in range(n):
        w, h = 320 + 16 * i, 240 + 8 * i
        scene, _ = sample_scene(w, h, seed=seed + i)
        boxes = random_boxes(np.random.default_rng(seed + i), 1 + i % 8, w, h)
        work.append((encode(scene, "JPEG", quality=90), boxes))
    return work


@pytest.fixture(scope="module")
def pipeline(built_repository):
    repo, _ = built_repository
    return InProcessPipeline(repo)


def _assert_same_as_alone(results, work, pipeline):
    for result, (image, boxes) in zip(results, work):
        masks, scores = pipeline.segment(image, boxes)
        # Batched GEMMs round differently in the last bits: tolerance, not bit equality.
        np.testing.assert_allclose(result.scores, scores, atol=1e-5)
        assert mask_iou(result.masks, masks).min() >= 0.999


def test_concurrent_clients_are_batched_and_get_their_own_masks(triton_server, pipeline):
    work = _workload(CONCURRENCY, seed=1000)
    enc0, dec0 = _stats(triton_server, ENCODER), _stats(triton_server, DECODER)
    events0 = triton_server.embedding_cache_events(EMBEDDING)
    with SamClient(triton_server.grpc_url) as client:
        results = client.segment_many(work, concurrency=CONCURRENCY)
    enc = _settled_delta(triton_server, ENCODER, enc0, {"inference_count": CONCURRENCY})
    dec = _settled_delta(triton_server, DECODER, dec0, {"inference_count": CONCURRENCY})
    events = _settled_events(triton_server, EMBEDDING, events0, {"miss": CONCURRENCY})
    print(f"\n{ENCODER}: {enc}\n{DECODER}: {dec}\n{EMBEDDING}: {events}")
    assert enc["inference_count"] == CONCURRENCY
    assert events["miss"] == CONCURRENCY and events["hit"] == 0
    assert enc["execution_count"] < enc["inference_count"]  # several images per encoder call
    assert dec["inference_count"] == CONCURRENCY
    assert dec["execution_count"] < dec["inference_count"]  # several requests per decoder call
    _assert_same_as_alone(results, work, pipeline)


def test_async_client_at_concurrency_16_hits_the_cache(triton_server, pipeline):
    work = _workload(4, seed=2000)
    with SamClient(triton_server.grpc_url) as client:
        for image, boxes in work:  # warm the cache, one image at a time
            client.segment(image, boxes)
    repeated = [(image, boxes[:1] + k) for k in range(4) for image, boxes in work]  # new boxes, same images
    enc0, events0 = _stats(triton_server, ENCODER), triton_server.embedding_cache_events(EMBEDDING)

    async def run(protocol):
        async with AsyncSamClient(triton_server.url(protocol), protocol=protocol) as client:
            assert await client.is_ready()
            return await client.segment_many(repeated, concurrency=CONCURRENCY)

    for protocol in ("grpc", "http"):
        results = asyncio.run(run(protocol))
        assert len(results) == len(repeated)
        _assert_same_as_alone(results[:4], repeated[:4], pipeline)
    events = _settled_events(triton_server, EMBEDDING, events0, {"hit": 2 * len(repeated)})
    enc = _delta(_stats(triton_server, ENCODER), enc0)
    print(f"\n{EMBEDDING} over {2 * len(repeated)} cached requests: {events}; {ENCODER}: {enc}")
    assert events["hit"] == 2 * len(repeated) and events["miss"] == 0
    assert enc["inference_count"] == 0 and enc["execution_count"] == 0


def test_encode_then_decode_runs_the_encoder_once(triton_server):
    scene, boxes = sample_scene(600, 400, seed=3000)
    image = encode(scene, "PNG")
    with SamClient(triton_server.grpc_url) as client:
        before, events0 = _stats(triton_server, ENCODER), triton_server.embedding_cache_events(EMBEDDING)
        encoded = client.encode(image)
        assert (encoded.height, encoded.width) == (400, 600) and encoded.embeddings is None
        results = [client.decode(encoded, boxes[i : i + 2]) for i in range(0, 6, 2)]
        events = _settled_events(triton_server, EMBEDDING, events0, {"hit": 3})
        enc = _delta(_stats(triton_server, ENCODER), before)
        assert enc["inference_count"] == 1 and events["miss"] == 1 and events["hit"] == 3
        full = client.segment(image, boxes[:6])
        with_embedding = client.encode(image, return_embeddings=True)
    assert with_embedding.embeddings.shape == (1, 256, 64, 64)
    assert np.array_equal(np.concatenate([r.masks for r in results]), full.masks)
    assert np.array_equal(np.concatenate([r.scores for r in results]), full.scores)


def test_encode_rejects_bad_image(triton_server):
    with SamClient(triton_server.http_url, protocol="http") as client:
        with pytest.raises(InvalidInputError) as info:
            client.encode(b"GIF89a not really")
    assert info.value.field == "image"


def _decoder_request(server, request, multimask=False):
    """A DecoderRequest sent to the decoder model directly (its inputs as the ensemble passes them)."""
    outputs = [spec.LOW_RES_MASKS_NAME, spec.IOU_PREDICTIONS_NAME]
    r = infer(server.grpc_url, DECODER, {spec.IMAGE_EMBEDDINGS_NAME: request.embeddings,
                                         **decoder_prompt_inputs(request)},
              outputs, parameters={"multimask_output": multimask}, timeout_s=300)
    return r[spec.LOW_RES_MASKS_NAME], r[spec.IOU_PREDICTIONS_NAME]


def test_decoder_ragged_batch_with_a_bad_request_inside(triton_server, pipeline):
    """Requests of every prompt kind (boxes; 1-4 points; box + points with mask
    inputs; a click with a mask input) on two images, single-mask and
    multimask, and two bad ones, reach the decoder together; the bad ones fail
    alone, the rest match one-at-a-time."""
    from dataclasses import replace

    from samtriton.serving import decoder_batch

    images = [sample_scene(500, 375, seed=s)[0] for s in (4000, 4001)]
    embeddings = np.concatenate([pipeline.encode(pipeline.preprocess(encode(img, "PNG"))) for img in images])
    good = decoder_batch.sample_requests(np.random.default_rng(5), images=embeddings)
    multimask = [False, True, False, True]
    nan_points = replace(good[1], coords=np.where(np.arange(good[1].coords.size).reshape(good[1].coords.shape) == 3,
                                                  np.nan, good[1].coords).astype(np.float32))
    only_filler = replace(good[0], labels=np.full_like(good[0].labels, spec.LABEL_ABSENT))
    bad = [nan_points, only_filler]
    busy = decoder_batch.sample_requests(np.random.default_rng(6), images=embeddings)[0]  # occupies the decoder
    busy = replace(busy, coords=np.tile(busy.coords, (1, 16, 1, 1)), labels=np.tile(busy.labels, (1, 16, 1)),
                   has_mask_input=np.tile(busy.has_mask_input, (1, 16)))

    before = _stats(triton_server, DECODER)
    outcomes = {}

    def call(key, request, multi=False):
        try:
            outcomes[key] = _decoder_request(triton_server, request, multi)
        except Exception as e:  # noqa: BLE001 - inspected below
            outcomes[key] = e

    threads = [threading.Thread(target=call, args=("busy", busy))]
    threads[0].start()
    time.sleep(0.5)
    jobs = [*((f"good{i}", g, m) for i, (g, m) in enumerate(zip(good, multimask))),
            *((f"bad{i}", b, False) for i, b in enumerate(bad))]
    for key, request, multi in jobs:
        threads.append(threading.Thread(target=call, args=(key, request, multi)))
        threads[-1].start()
    for t in threads:
        t.join(300)
    dec = _settled_delta(triton_server, DECODER, before, {"inference_count": 7})
    print(f"\n{DECODER}: {dec}")
    # The busy request alone, then the six others (bad ones included) in one
    # execute() call.  (Triton counts a python model's per-request error
    # responses as successful executions.)
    assert dec["inference_count"] == 7 and dec["execution_count"] <= 2

    for i, (request, multi) in enumerate(zip(good, multimask)):
        low_res, iou = outcomes[f"good{i}"]
        ref_low, ref_iou = pipeline.decode(request.embeddings, _prompts_of(request), multi)
        k = 3 if multi else 1
        assert low_res.shape == (1, request.prompts, k, 256, 256) and iou.shape == (1, request.prompts, k)
        np.testing.assert_allclose(iou[0], ref_iou, atol=1e-5)
        assert np.mean((low_res[0] > 0) == (ref_low > 0)) > 0.9999
    fields = [spec.PROMPT_COORDS_NAME, spec.PROMPT_LABELS_NAME]
    for i, field in enumerate(fields):
        error = from_triton(outcomes[f"bad{i}"])
        assert isinstance(error, InvalidInputError) and error.field == field, error


def _prompts_of(request):
    from samtriton.serving.prompts import Prompts

    return Prompts(request.coords[0], request.labels[0], request.mask_inputs[0], request.has_mask_input[0])


def _mixed_workload(seed: int, images: list[bytes], sizes: list[tuple[int, int]]):
    """(image, keyword arguments of segment) of every prompt kind, on `images`."""
    rng = np.random.default_rng(seed)
    work = []
    for i in range(CONCURRENCY):
        image, (w, h) = images[i % len(images)], sizes[i % len(images)]
        n = 1 + i % 3
        points = rng.uniform([0, 0], [w, h], size=(n, 1 + i % 4, 2)).astype(np.float32)
        labels = rng.integers(0, 2, size=points.shape[:2]).astype(np.int32)
        labels[:, 0] = 1
        kind = i % 4
        if kind == 0:
            kwargs = {"boxes": random_boxes(rng, n, w, h)}
        elif kind == 1:
            kwargs = {"points": points, "point_labels": labels, "multimask": True}
        elif kind == 2:
            kwargs = {"boxes": random_boxes(rng, n, w, h), "points": points, "point_labels": labels}
        else:
            masks = rng.standard_normal((n, 256, 256)).astype(np.float32) * 4
            kwargs = {"points": points, "point_labels": labels, "mask_input": masks}
        work.append((image, kwargs))
    return work


def test_mixed_prompt_kinds_share_decoder_calls_and_get_their_own_masks(triton_server, pipeline):
    """16 clients in flight at once with boxes, clicks (multimask), box + clicks
    and refinements on 4 cached images: the decoder batches them across kinds
    and each gets what it gets alone."""
    sizes = [(480, 320), (320, 480), (400, 400), (640, 360)]
    images = [encode(sample_scene(w, h, seed=5000 + i)[0], "JPEG", quality=90) for i, (w, h) in enumerate(sizes)]
    work = _mixed_workload(5100, images, sizes)
    with SamClient(triton_server.grpc_url) as client:
        for image in images:
            client.encode(image)
    enc0, dec0 = _stats(triton_server, ENCODER), _stats(triton_server, DECODER)
    events0 = triton_server.embedding_cache_events(EMBEDDING)
    with SamClient(triton_server.grpc_url) as client:
        results = client.segment_many(work, concurrency=CONCURRENCY)
    dec = _settled_delta(triton_server, DECODER, dec0, {"inference_count": CONCURRENCY})
    events = _settled_events(triton_server, EMBEDDING, events0, {"hit": CONCURRENCY})
    enc = _delta(_stats(triton_server, ENCODER), enc0)
    print(f"\n{DECODER} over {CONCURRENCY} mixed requests: {dec}; {EMBEDDING}: {events}")
    assert dec["inference_count"] == CONCURRENCY
    assert dec["execution_count"] < dec["inference_count"]  # several kinds per decoder call
    assert events["hit"] == CONCURRENCY and enc["inference_count"] == 0
    for result, (image, kwargs) in zip(results, work):
        multi = kwargs.get("multimask", False)
        masks, scores = pipeline.segment(image, kwargs.get("boxes"), points=kwargs.get("points"),
                                         point_labels=kwargs.get("point_labels"),
                                         mask_inputs=kwargs.get("mask_input"), multimask=multi)
        assert result.masks.shape == masks.shape and result.multimask == multi
        np.testing.assert_allclose(result.scores, scores, atol=1e-5)
        assert mask_iou(result.masks.reshape(-1, *masks.shape[-2:]), masks.reshape(-1, *masks.shape[-2:])).min() >= 0.999


def test_concurrent_requests_for_one_new_image_run_the_encoder_once(triton_server, pipeline):
    scene, boxes = sample_scene(520, 360, seed=6100)
    image = encode(scene, "JPEG", quality=90)
    work = [(image, boxes[i:i + 1]) for i in range(6)]
    enc0, events0 = _stats(triton_server, ENCODER), triton_server.embedding_cache_events(EMBEDDING)
    with SamClient(triton_server.grpc_url) as client:
        results = client.segment_many(work, concurrency=len(work))
    events = _settled_events(triton_server, EMBEDDING, events0, {"miss": 1})
    enc = _settled_delta(triton_server, ENCODER, enc0, {"inference_count": 1})
    print(f"\n6 concurrent requests, one new image: {EMBEDDING} {events}; {ENCODER} {enc}")
    assert enc["inference_count"] == 1
    assert events["miss"] == 1 and events["shared"] + events["hit"] == len(work) - 1
    _assert_same_as_alone(results, work, pipeline)


def test_a_cached_image_does_not_wait_behind_a_new_one(triton_server):
    """A request on a cached image is answered while a new image's encoder run
    (ViT-B: seconds on 2 cores) is under way in the same image_embedding model."""
    vit_b = spec.model_names(get_variant("sam-vit-b").slug).image_embedding
    cached = encode(sample_scene(400, 300, seed=6200)[0], "PNG")
    new = encode(sample_scene(400, 300, seed=6201)[0], "PNG")
    box = [[40.0, 30.0, 300.0, 240.0]]
    with SamClient(triton_server.grpc_url, model="sam-vit-b") as client:
        client.segment(cached, box)
        events0 = triton_server.embedding_cache_events(vit_b)
        miss_done = threading.Event()

        def miss():
            with SamClient(triton_server.grpc_url, model="sam-vit-b") as own:
                own.segment(new, box)
            miss_done.set()

        thread = threading.Thread(target=miss)
        thread.start()
        assert _settled_events(triton_server, vit_b, events0, {"miss": 1}, timeout_s=30)["miss"] == 1
        started = time.perf_counter()
        hit = client.segment(cached, box)
        hit_s = time.perf_counter() - started
        answered_first = not miss_done.is_set()
        thread.join(timeout=120)
    print(f"\ncached-image request beside a new image's ViT-B encoder run: {hit_s * 1000:.0f} ms")
    assert answered_first and len(hit.scores) == 1
    assert miss_done.is_set()
    assert _delta(triton_server.embedding_cache_events(vit_b), events0)["hit"] == 1


def test_sam_hands_the_decoder_a_handle_it_reads_in_place(triton_server):
    """image_embedding answers `embedding_handle` (what `sam` asks for) with a slot of its
    arena in /dev/shm, named after the server, and `image_embeddings` with the same
    embedding; the decoder gives the same masks for the handle as for the tensor; bad
    handles fail naming the input."""
    import glob

    from samtriton.serving import decoder_batch, embedding_arena

    url = triton_server.grpc_url
    arenas = glob.glob(f"{embedding_arena.DIRECTORY}/{embedding_arena.PREFIX}-{triton_server.proc.pid}-*")
    assert arenas, "no embedding arena of this server in /dev/shm"
    image = encode(sample_scene(400, 300, seed=4100)[0], "PNG")
    encoded = infer(url, spec.ENCODE_ENSEMBLE, {spec.IMAGE.name: np.array([image], dtype=object)},
                    [spec.IMAGE_GEOMETRY.name, spec.IMAGE_EMBEDDINGS_NAME])
    step_inputs = {spec.IMAGE.name: np.array([image], dtype=object),
                   spec.IMAGE_GEOMETRY.name: encoded[spec.IMAGE_GEOMETRY.name]}
    handle = infer(url, EMBEDDING, step_inputs, [spec.EMBEDDING_HANDLE.name])[spec.EMBEDDING_HANDLE.name]
    tensor = infer(url, EMBEDDING, step_inputs, [spec.IMAGE_EMBEDDINGS_NAME])[spec.IMAGE_EMBEDDINGS_NAME]
    assert handle.shape == (1, 3) and handle.dtype == np.int64
    np.testing.assert_array_equal(tensor, encoded[spec.IMAGE_EMBEDDINGS_NAME])

    request = decoder_batch.sample_requests(np.random.default_rng(7), images=np.repeat(tensor, 2, axis=0))[0]
    outputs, prompts = [spec.LOW_RES_MASKS_NAME, spec.IOU_PREDICTIONS_NAME], decoder_prompt_inputs(request)
    by_tensor = infer(url, DECODER, {spec.IMAGE_EMBEDDINGS_NAME: tensor, **prompts}, outputs)
    by_handle = infer(url, DECODER, {spec.EMBEDDING_HANDLE.name: handle, **prompts}, outputs)
    for name in outputs:
        np.testing.assert_allclose(by_handle[name], by_tensor[name], rtol=0, atol=1e-5)

    epoch, slot, seq = (int(v) for v in handle[0])
    for inputs, code, field, problem in (
        ({spec.IMAGE_EMBEDDINGS_NAME: tensor, spec.EMBEDDING_HANDLE.name: handle}, "INVALID_ARGUMENT",
         spec.EMBEDDING_HANDLE.name, "not both"),
        ({spec.EMBEDDING_HANDLE.name: np.array([[epoch, 10**6, seq]], np.int64)}, "INVALID_ARGUMENT",
         spec.EMBEDDING_HANDLE.name, "outside the arena"),
        ({spec.EMBEDDING_HANDLE.name: np.array([[epoch, slot, seq + 2]], np.int64)}, "UNAVAILABLE", None,
         "evicted"),
        ({spec.EMBEDDING_HANDLE.name: np.array([[epoch ^ 1, slot, seq]], np.int64)}, "UNAVAILABLE", None,
         "arena is gone"),
        ({}, "INVALID_ARGUMENT", spec.IMAGE_EMBEDDINGS_NAME, "missing"),
    ):
        with pytest.raises(Exception) as info:
            infer(url, DECODER, {**inputs, **prompts}, outputs)
        assert info.value.status() == f"StatusCode.{code}", info.value
        assert problem in info.value.message()
        if field:
            assert from_triton(info.value).field == field
