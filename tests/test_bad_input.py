"""Bad requests (images, boxes, points, labels, mask inputs, parameters) get INVALID_ARG
naming the field, over gRPC and HTTP, and the server stays READY.

Requests are built with tritonclient directly (not the SDK, which catches some
of these before sending) so the server's own checks are what is tested.
"""

from __future__ import annotations

import numpy as np
import pytest

from samtriton.client import InvalidInputError, SamClient
from samtriton.client.errors import from_triton
from samtriton.sample_image import sample_scene
from tests.conftest import encode, mask_iou

pytestmark = pytest.mark.integration

SCENE, SCENE_BOXES = sample_scene(320, 240, seed=9)
GOOD_JPEG = encode(SCENE, "JPEG", quality=90)
GOOD_BOXES = np.array([[20, 20, 200, 180]], np.float32)


def _truncated_jpeg() -> bytes:
    return GOOD_JPEG[: len(GOOD_JPEG) // 2]


# name -> (image bytes, boxes array, wire dtype of boxes, parameters, field named in the error)
CASES = {
    "not-an-image": (b"this is not an image at all", GOOD_BOXES, "FP32", None, "image"),
    "empty-image": (b"", GOOD_BOXES, "FP32", None, "image"),
    "truncated-jpeg": (_truncated_jpeg(), GOOD_BOXES, "FP32", None, "image"),
    "gif-not-accepted": (encode(SCENE, "GIF"), GOOD_BOXES, "FP32", None, "image"),
    "boxes-shape-n-by-3": (GOOD_JPEG, np.zeros((2, 3), np.float32), "FP32", None, "boxes"),
    "boxes-fp64": (GOOD_JPEG, GOOD_BOXES.astype(np.float64), "FP64", None, "boxes"),
    "boxes-int32": (GOOD_JPEG, GOOD_BOXES.astype(np.int32), "INT32", None, "boxes"),
    "boxes-nan": (GOOD_JPEG, np.array([[1, 1, 50, 50], [np.nan, 0, 5, 5]], np.float32), "FP32", None, "boxes"),
    "boxes-inf": (GOOD_JPEG, np.array([[0, 0, np.inf, 5]], np.float32), "FP32", None, "boxes"),
    "boxes-x1-lt-x0": (GOOD_JPEG, np.array([[100, 10, 50, 60]], np.float32), "FP32", None, "boxes"),
    "boxes-y1-lt-y0": (GOOD_JPEG, np.array([[10, 100, 50, 60]], np.float32), "FP32", None, "boxes"),
    "boxes-outside-image": (GOOD_JPEG, np.array([[400, 300, 500, 380]], np.float32), "FP32", None, "boxes"),
    "boxes-negative-outside": (GOOD_JPEG, np.array([[-90, -90, -10, -5]], np.float32), "FP32", None, "boxes"),
    "zero-boxes": (GOOD_JPEG, np.zeros((0, 4), np.float32), "FP32", None, "boxes"),
    "too-many-boxes": (GOOD_JPEG, np.tile(GOOD_BOXES, (257, 1)), "FP32", None, "boxes"),
    "unknown-output-parameter": (GOOD_JPEG, GOOD_BOXES, "FP32", {"outputs": "scores,logits"}, "parameters.outputs"),
    "multimask-not-a-bool": (GOOD_JPEG, GOOD_BOXES, "FP32", {"multimask_output": "yes"},
                             "parameters.multimask_output"),
}

# Prompts beyond boxes: name -> (prompt inputs {name: (array, wire dtype)}, field named in the error).
ONE_CLICK = np.array([[[100, 80]]], np.float32)
CLICKS = np.array([[[100, 80], [150, 90]], [[30, 40], [0, 0]]], np.float32)
CLICK_LABELS = np.array([[1, 0], [1, -1]], np.int32)


def _prompts(**inputs):
    return {k: (v, "INT32" if v.dtype == np.int32 else "FP32") for k, v in inputs.items()}


PROMPT_CASES = {
    "point-nan": (_prompts(points=np.array([[[np.nan, 10]]], np.float32), point_labels=np.ones((1, 1), np.int32)),
                  "points"),
    "point-inf": (_prompts(points=np.array([[[5, np.inf]]], np.float32), point_labels=np.ones((1, 1), np.int32)),
                  "points"),
    "label-7": (_prompts(points=ONE_CLICK, point_labels=np.full((1, 1), 7, np.int32)), "point_labels"),
    "labels-p-mismatch": (_prompts(points=CLICKS, point_labels=np.ones((2, 3), np.int32)), "point_labels"),
    "labels-n-mismatch": (_prompts(points=CLICKS, point_labels=np.ones((1, 2), np.int32)), "point_labels"),
    "all-labels-padding": (_prompts(points=CLICKS, point_labels=np.full((2, 2), -1, np.int32)), "point_labels"),
    "one-prompt-all-padding": (_prompts(points=CLICKS, point_labels=np.array([[1, 0], [-1, -1]], np.int32)),
                               "point_labels"),
    "points-without-labels": (_prompts(points=CLICKS), "point_labels"),
    "labels-without-points": (_prompts(point_labels=CLICK_LABELS), "points"),
    "no-prompt-at-all": ({}, "boxes"),
    "point-outside-image": (_prompts(points=np.array([[[400, 20]]], np.float32), point_labels=np.ones((1, 1), np.int32)),
                            "points"),
    "points-wrong-rank": (_prompts(points=np.zeros((2, 2), np.float32), point_labels=np.ones((2, 1), np.int32)),
                          "points"),
    "labels-fp32": ({"points": (CLICKS, "FP32"), "point_labels": (CLICK_LABELS.astype(np.float32), "FP32")},
                    "point_labels"),
    "too-many-points": (_prompts(points=np.full((1, 33, 2), 5, np.float32), point_labels=np.ones((1, 33), np.int32)),
                        "points"),
    "boxes-and-points-n-differ": (_prompts(boxes=np.tile(GOOD_BOXES, (3, 1)), points=CLICKS,
                                           point_labels=CLICK_LABELS), "points"),
    "mask-inputs-wrong-size": (_prompts(points=CLICKS, point_labels=CLICK_LABELS,
                                        mask_inputs=np.zeros((2, 128, 128), np.float32)), "mask_inputs"),
    "mask-inputs-wrong-count": (_prompts(points=CLICKS, point_labels=CLICK_LABELS,
                                         mask_inputs=np.zeros((1, 256, 256), np.float32)), "mask_inputs"),
    "mask-inputs-nan": (_prompts(points=CLICKS, point_labels=CLICK_LABELS,
                                 mask_inputs=np.full((2, 256, 256), np.nan, np.float32)), "mask_inputs"),
    "mask-inputs-only": (_prompts(mask_inputs=np.zeros((1, 256, 256), np.float32)), "boxes"),
}


def _module(protocol):
    if protocol == "grpc":
        import tritonclient.grpc as m
    else:
        import tritonclient.http as m
    return m


def _infer_raw(server, protocol, image_bytes, boxes, box_dtype, parameters, prompts=None):
    """A `sam` request with tritonclient alone; `prompts` ({name: (array, dtype)})
    replaces the boxes when given."""
    m = _module(protocol)
    client = m.InferenceServerClient(server.url(protocol))
    try:
        image = m.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([image_bytes], dtype=np.object_))
        inputs = [image]
        for name, (array, dtype) in (prompts if prompts is not None else {"boxes": (boxes, box_dtype)}).items():
            tensor = m.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [m.InferRequestedOutput("scores"), m.InferRequestedOutput("masks_rle")]
        return client.infer("sam", inputs, outputs=outputs, parameters=parameters)
    finally:
        client.close()


def _assert_invalid_arg(m, call, field, label):
    with pytest.raises(m.InferenceServerException) as info:
        call()
    status = str(info.value.status())
    assert status in ("StatusCode.INVALID_ARGUMENT", "400"), f"{status}: {info.value.message()}"
    error = from_triton(info.value)
    assert isinstance(error, InvalidInputError)
    assert field in info.value.message(), info.value.message()
    assert error.field == field, (error.field, info.value.message())
    print(f"\n{label}: {info.value.message()}")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_invalid_arg_naming_the_field(triton_server, protocol, case):
    image_bytes, boxes, dtype, params, field = CASES[case]
    _assert_invalid_arg(_module(protocol), lambda: _infer_raw(triton_server, protocol, image_bytes, boxes, dtype, params),
                        field, f"{protocol} {case}")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_bad_prompt_is_invalid_arg_naming_the_field(triton_server, protocol, case):
    prompts, field = PROMPT_CASES[case]
    _assert_invalid_arg(_module(protocol), lambda: _infer_raw(triton_server, protocol, GOOD_JPEG, None, None, None,
                                                              prompts), field, f"{protocol} {case}")


def test_server_stays_ready_and_serves_after_bad_requests(triton_server):
    for case in ("not-an-image", "boxes-nan", "zero-boxes"):
        image_bytes, boxes, dtype, params, _ = CASES[case]
        with pytest.raises(Exception):
            _infer_raw(triton_server, "grpc", image_bytes, boxes, dtype, params)
    with SamClient(triton_server.grpc_url) as client:
        assert client.is_ready()
        result = client.segment(GOOD_JPEG, GOOD_BOXES)
    assert result.masks.shape == (1, 240, 320) and result.masks.any()


def test_sdk_raises_typed_error_with_field(triton_server):
    with SamClient(triton_server.http_url, protocol="http") as client:
        with pytest.raises(InvalidInputError) as info:
            client.segment(GOOD_JPEG, [[10, 10, 5, 50]])
    assert info.value.field == "boxes"
    assert info.value.__cause__ is not None  # chained from the tritonclient error


def test_bad_requests_fail_alone_among_concurrent_good_ones(triton_server):
    """Good and bad requests (boxes and clicks) in flight together: each bad one
    gets INVALID_ARG naming its field, every good one its masks (the same as
    when sent alone)."""
    from concurrent.futures import ThreadPoolExecutor

    with SamClient(triton_server.grpc_url) as client:
        alone = client.segment(GOOD_JPEG, GOOD_BOXES)
    bad_cases = ["not-an-image", "boxes-nan", "truncated-jpeg", "boxes-x1-lt-x0"]

    def good(_):
        with SamClient(triton_server.grpc_url) as client:
            return client.segment(GOOD_JPEG, GOOD_BOXES)

    def bad(case):
        image_bytes, boxes, dtype, params, field = CASES[case]
        try:
            _infer_raw(triton_server, "grpc", image_bytes, boxes, dtype, params)
        except Exception as e:  # noqa: BLE001 - inspected below
            return from_triton(e), field
        return None, field

    def bad_prompt(case):
        prompts, field = PROMPT_CASES[case]
        try:
            _infer_raw(triton_server, "grpc", GOOD_JPEG, None, None, None, prompts)
        except Exception as e:  # noqa: BLE001 - inspected below
            return from_triton(e), field
        return None, field

    def good_clicks(_):
        with SamClient(triton_server.grpc_url) as client:
            return client.segment(GOOD_JPEG, points=CLICKS, point_labels=CLICK_LABELS)

    with SamClient(triton_server.grpc_url) as client:
        clicks_alone = client.segment(GOOD_JPEG, points=CLICKS, point_labels=CLICK_LABELS)
    with ThreadPoolExecutor(max_workers=12) as pool:
        good_futures = [pool.submit(good, i) for i in range(4)]
        click_futures = [pool.submit(good_clicks, i) for i in range(4)]
        bad_futures = [pool.submit(bad, c) for c in bad_cases]
        bad_futures += [pool.submit(bad_prompt, c) for c in ("point-nan", "label-7", "labels-p-mismatch",
                                                              "mask-inputs-wrong-count", "all-labels-padding")]
        goods = [f.result(timeout=300) for f in good_futures]
        clicks = [f.result(timeout=300) for f in click_futures]
        bads = [f.result(timeout=300) for f in bad_futures]
    for result in clicks:
        np.testing.assert_allclose(result.scores, clicks_alone.scores, atol=1e-5)
        assert mask_iou(result.masks, clicks_alone.masks).min() >= 0.999
    # Concurrent requests share encoder batches; batched GEMMs round differently
    # in the last bits, so compare with a tolerance rather than bit for bit.
    for result in goods:
        print(f"\nmax |score - alone| {np.abs(result.scores - alone.scores).max():.2e}, "
              f"mask IoU {mask_iou(result.masks, alone.masks).min():.6f}")
        np.testing.assert_allclose(result.scores, alone.scores, atol=1e-5)
        assert mask_iou(result.masks, alone.masks).min() >= 0.999
    for error, field in bads:
        assert isinstance(error, InvalidInputError) and error.field == field, (error, field)
