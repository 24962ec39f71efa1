"""Prompts beyond boxes, without a server: the preprocess's token layout and checks,
the decoder's cross-request batching, candidate selection, and the SDK's prompt
arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mobile_sam.utils.transforms import ResizeLongestSide

from samtriton import spec
from samtriton.client import InvalidInputError, Prompt
from samtriton.client.inputs import as_mask_inputs, as_points, group_prompts, wire_prompts
from samtriton.client.protocol import merge_results, plan_requests
from samtriton.client.result import SegmentationResult
from samtriton.serving import decoder_batch
from samtriton.serving.errors import InvalidInput
from samtriton.serving.postprocessing import candidates
from samtriton.serving.preprocessing import resized_shape
from samtriton.serving.prompts import Geometry, Limits, PromptInputs, build_prompts, transform_coords
from samtriton.serving.request_parameters import multimask_output, requested_outputs

ABSENT, PAD = spec.LABEL_ABSENT, spec.LABEL_NOT_A_POINT
G = Geometry(400, 600, *resized_shape(400, 600, 1024))  # landscape: 600x400 -> 1024x683
SCALE = np.array([G.input_w / G.original_w, G.input_h / G.original_h])  # per axis, as upstream


def _points(*prompts):
    """Ragged per-prompt [(x, y, label), ...] -> (N, P, 2), (N, P) padded with -1."""
    p = max(len(x) for x in prompts)
    coords = np.zeros((len(prompts), p, 2), np.float32)
    labels = np.full((len(prompts), p), -1, np.int32)
    for i, prompt in enumerate(prompts):
        for j, (x, y, lab) in enumerate(prompt):
            coords[i, j], labels[i, j] = (x, y), lab
    return coords, labels


@pytest.mark.parametrize("h,w", [(400, 600), (517, 391), (2000, 3000), (7, 1999)])
def test_point_transform_matches_upstream(h, w):
    rng = np.random.default_rng(h)
    coords = rng.uniform(0, min(h, w), size=(5, 3, 2)).astype(np.float32)
    g = Geometry(h, w, *resized_shape(h, w, 1024))
    upstream = ResizeLongestSide(1024)
    np.testing.assert_allclose(transform_coords(coords, g), upstream.apply_coords(coords, (h, w)), rtol=1e-6)
    torch_coords = upstream.apply_coords_torch(torch.from_numpy(coords), (h, w)).numpy()
    np.testing.assert_allclose(transform_coords(coords, g), torch_coords, rtol=1e-6, atol=1e-4)


def test_points_only_prompts_get_sams_padding_point_and_drop_client_padding():
    coords, labels = _points([(10, 20, 1)], [(30, 40, 0), (50, 60, -1), (70, 80, 1)])
    p = build_prompts(PromptInputs(points=coords, point_labels=labels), G)
    # Prompt 1's padding point (-1) is gone; its two points keep their order.
    assert p.labels.tolist() == [[1, PAD, ABSENT], [0, 1, PAD]]
    np.testing.assert_allclose(p.coords[0, 0], np.array([10, 20]) * SCALE, rtol=1e-6)
    np.testing.assert_allclose(p.coords[1, :2], np.array([[30, 40], [70, 80]]) * SCALE, rtol=1e-6)
    assert (p.coords[0, 1:] == 0).all() and (p.coords[1, 2] == 0).all()  # upstream pads at (0, 0)
    assert p.has_mask_input.tolist() == [0.0, 0.0] and p.mask_inputs.shape == (1, 256, 256)


def test_boxes_and_box_plus_points_layout():
    boxes = np.array([[10, 20, 110, 220], [0, 0, 600, 400]], np.float32)
    only = build_prompts(PromptInputs(boxes=boxes), G)
    assert only.labels.tolist() == [[2, 3], [2, 3]]
    np.testing.assert_allclose(only.coords, boxes.reshape(2, 2, 2) * SCALE, rtol=1e-6)
    coords, labels = _points([(50, 60, 1), (70, 80, 0)], [(0, 0, -1), (0, 0, -1)])
    both = build_prompts(PromptInputs(boxes=boxes, points=coords, point_labels=labels), G)
    # Points first, then the corners (upstream's order); prompt 1 is a box alone.
    assert both.labels.tolist() == [[1, 0, 2, 3], [2, 3, ABSENT, ABSENT]]
    np.testing.assert_allclose(both.coords[0, 2:], boxes[0].reshape(2, 2) * SCALE, rtol=1e-6)
    np.testing.assert_allclose(both.coords[1, :2], only.coords[1], rtol=1e-6)


def test_mask_inputs_and_fixed_token_count():
    coords, labels = _points([(10, 20, 1)], [(30, 40, 1)])
    masks = np.random.default_rng(0).standard_normal((2, 256, 256)).astype(np.float32)
    p = build_prompts(PromptInputs(points=coords, point_labels=labels, mask_inputs=masks), G, pad_tokens=6)
    assert p.labels.shape == (2, 6) and p.labels.tolist()[0] == [1, PAD] + [ABSENT] * 4
    assert p.has_mask_input.tolist() == [1.0, 1.0] and np.array_equal(p.mask_inputs, masks)


GOOD_POINTS = _points([(10, 20, 1)], [(30, 40, 1), (50, 60, 0)])


@pytest.mark.parametrize("inputs,field,message", [
    (PromptInputs(), "boxes", "missing"),
    (PromptInputs(points=GOOD_POINTS[0]), "point_labels", "missing"),
    (PromptInputs(point_labels=GOOD_POINTS[1]), "points", "missing"),
    (PromptInputs(points=np.array([[[np.nan, 1]]], np.float32), point_labels=np.ones((1, 1), np.int32)),
     "points", "NaN"),
    (PromptInputs(points=GOOD_POINTS[0], point_labels=np.where(GOOD_POINTS[1] == 0, 7, GOOD_POINTS[1])),
     "point_labels", "label 7"),
    (PromptInputs(points=GOOD_POINTS[0], point_labels=GOOD_POINTS[1][:, :1]), "point_labels", "to match points"),
    (PromptInputs(points=GOOD_POINTS[0], point_labels=GOOD_POINTS[1].astype(np.int64)), "point_labels",
     "expected INT32"),
    (PromptInputs(points=GOOD_POINTS[0][:, :, :1], point_labels=GOOD_POINTS[1]), "points", "[N, P, 2]"),
    (PromptInputs(points=GOOD_POINTS[0], point_labels=-np.ones((2, 2), np.int32)), "point_labels",
     "no point (every label is -1"),
    (PromptInputs(points=np.array([[[700, 20]]], np.float32), point_labels=np.ones((1, 1), np.int32)),
     "points", "outside the 600x400 image"),
    (PromptInputs(points=GOOD_POINTS[0], point_labels=GOOD_POINTS[1],
                  mask_inputs=np.zeros((2, 128, 128), np.float32)), "mask_inputs", "[N, 256, 256]"),
    (PromptInputs(points=GOOD_POINTS[0], point_labels=GOOD_POINTS[1],
                  mask_inputs=np.zeros((1, 256, 256), np.float32)), "mask_inputs", "one low_res_logits mask per"),
    (PromptInputs(points=GOOD_POINTS[0], point_labels=GOOD_POINTS[1],
                  mask_inputs=np.full((2, 256, 256), np.inf, np.float32)), "mask_inputs", "NaN or infinite"),
    (PromptInputs(boxes=np.array([[0, 0, 5, 5]], np.float32), points=GOOD_POINTS[0], point_labels=GOOD_POINTS[1]),
     "points", "has 2 prompts but boxes has 1"),
    (PromptInputs(points=np.zeros((1, 33, 2), np.float32), point_labels=np.ones((1, 33), np.int32)),
     "points", "limit of 32"),
])
def test_bad_prompts_name_their_field(inputs, field, message):
    with pytest.raises(InvalidInput) as info:
        build_prompts(inputs, G)
    assert info.value.field == field and message in str(info.value), str(info.value)
    assert str(info.value).startswith(f"{field}: ")


def test_padding_points_may_lie_anywhere_labelled_ones_may_not():
    coords, labels = _points([(10, 20, 1), (-500, 9000, -1)])
    assert build_prompts(PromptInputs(points=coords, point_labels=labels), G).labels.tolist() == [[1, PAD]]
    assert build_prompts(PromptInputs(points=np.array([[[600, 400]]], np.float32),
                                      point_labels=np.ones((1, 1), np.int32)), G, Limits()).labels.shape == (1, 2)


def _request(n, tokens, masks=False, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.full((1, n, tokens), ABSENT, np.int32)
    labels[..., 0] = 1
    labels[..., 1] = PAD
    coords = rng.uniform(0, 1000, (1, n, tokens, 2)).astype(np.float32)
    emb = rng.standard_normal((1, *spec.EMBEDDING_SHAPE)).astype(np.float32)
    mask = rng.standard_normal((1, n if masks else 1, 256, 256)).astype(np.float32)
    return decoder_batch.DecoderRequest(emb, coords, labels, mask, np.full((1, n), float(masks), np.float32))


def test_stack_points_every_prompt_at_its_image_and_mask():
    requests = [_request(2, 3), _request(1, 5, masks=True, seed=1), _request(3, 2, masks=True, seed=2)]
    call = decoder_batch.stack(requests, [False, False, False])
    f = call.feeds
    assert f[spec.PROMPT_LABELS_NAME].shape == (6, 5) and f[spec.PROMPT_COORDS_NAME].shape == (6, 5, 2)
    # The 3-token request is filled up to 5 with filler; nothing else changes.
    assert (f[spec.PROMPT_LABELS_NAME][:2, 3:] == ABSENT).all()
    np.testing.assert_array_equal(f[spec.PROMPT_COORDS_NAME][:2, :3], requests[0].coords[0])
    assert f[spec.IMAGE_EMBEDDINGS_NAME].shape[0] == 3
    # Sources: images 0..2 without mask; rows 3.. are (image, mask) pairs in order.
    assert f[spec.PROMPT_SOURCE_INDEX_NAME].tolist() == [0, 0, 3, 4, 5, 6]
    assert f[spec.MASK_IMAGE_INDEX_NAME].tolist() == [1, 2, 2, 2]
    np.testing.assert_array_equal(f[spec.MASK_INPUTS.name][1:], requests[2].mask_inputs[0])
    assert call.spans == [(0, 2), (2, 3), (3, 6)] and f[spec.MASK_TOKENS_NAME].tolist() == [0]
    # No request with masks: the graph gets none (M = 0), not placeholders.
    assert decoder_batch.stack(requests[:1], [True]).feeds[spec.MASK_INPUTS.name].shape == (0, 256, 256)


@pytest.mark.parametrize("multimask,decoded", [([False, False], (0,)), ([True, True], (1, 2, 3)),
                                               ([True, False], (0, 1, 2, 3))])
def test_only_the_mask_tokens_asked_for_are_decoded_and_split_back(multimask, decoded):
    requests = [_request(2, 3), _request(1, 2, seed=1)]
    call = decoder_batch.stack(requests, multimask)
    assert call.tokens == decoded
    k = len(decoded)
    low_res = np.arange(3 * k, dtype=np.float32).reshape(3, k, 1, 1) * np.ones((1, 1, 256, 256), np.float32)
    iou = np.arange(3 * k, dtype=np.float32).reshape(3, k)
    out = decoder_batch.split(low_res, iou, call, requests, multimask)
    for (masks, scores), multi, (start, end) in zip(out, multimask, call.spans):
        want = [decoded.index(t) for t in ((1, 2, 3) if multi else (0,))]
        assert masks.shape == (1, end - start, len(want), 256, 256) and scores.shape == (1, end - start, len(want))
        np.testing.assert_array_equal(scores[0], iou[start:end][:, want])


def test_postprocess_picks_from_all_four_tokens():
    iou = np.array([[[0.1, 0.2, 0.3, 0.4]]], np.float32)
    low_res = np.arange(4, dtype=np.float32).reshape(1, 1, 4, 1, 1) * np.ones((1, 1, 4, 256, 256), np.float32)
    masks, scores = candidates(low_res, iou, multimask=False)
    assert scores.tolist() == [[pytest.approx(0.1)]] and masks.shape == (1, 1, 256, 256) and masks[0, 0, 0, 0] == 0
    masks, scores = candidates(low_res, iou, multimask=True)
    assert scores.shape == (1, 3) and masks[0, :, 0, 0].tolist() == [1, 2, 3]
    # The CPU decoder's own selection passes through; a mismatch is an error, not a guess.
    assert candidates(low_res[:, :, :1], iou[:, :, :1], False)[1].shape == (1, 1)
    with pytest.raises(ValueError):
        candidates(low_res[:, :, :1], iou[:, :, :1], True)


@pytest.mark.parametrize("field,mutate,message", [
    (spec.PROMPT_LABELS_NAME, lambda r: {"labels": np.full_like(r.labels, 9)}, "labels must be among"),
    (spec.PROMPT_LABELS_NAME, lambda r: {"labels": np.full_like(r.labels, ABSENT)}, "only filler"),
    (spec.PROMPT_COORDS_NAME, lambda r: {"coords": r.coords[..., :1]}, "expected FP32"),
    (spec.PROMPT_COORDS_NAME, lambda r: {"coords": np.full_like(r.coords, np.nan)}, "NaN"),
    (spec.HAS_MASK_INPUT_NAME, lambda r: {"has_mask_input": np.full_like(r.has_mask_input, 0.5)}, "0.0 / 1.0"),
    (spec.MODEL_MASK_INPUTS_NAME, lambda r: {"has_mask_input": np.ones_like(r.has_mask_input)}, "expected FP32"),
    (spec.IMAGE_EMBEDDINGS_NAME, lambda r: {"embeddings": r.embeddings[:, :3]}, "expected FP32"),
])
def test_decoder_checks_a_direct_request(field, mutate, message):
    from dataclasses import replace

    good = _request(2, 3)
    assert good.check(max_prompts=4) is good
    with pytest.raises(InvalidInput) as info:
        replace(good, **mutate(good)).check(max_prompts=4)
    assert info.value.field == field and message in str(info.value), str(info.value)
    with pytest.raises(InvalidInput, match="limit of 1"):
        good.check(max_prompts=1)


def test_ragged_feeds_are_what_the_tensorrt_backend_concatenates():
    requests = [_request(2, 3), _request(1, 2, masks=True, seed=1)]
    feeds = decoder_batch.ragged_feeds(requests, tokens=4)
    assert feeds[spec.PROMPT_LABELS_NAME].shape == (12,) and feeds[spec.PROMPT_COORDS_NAME].shape == (24,)
    assert feeds[spec.LABELS_ACCUMULATED_NAME].tolist() == [8, 12]
    assert feeds[spec.MASKS_ACCUMULATED_NAME].tolist() == [65536, 131072]  # a placeholder, then one mask
    assert feeds[spec.HAS_MASK_INPUT_NAME].tolist() == [0, 0, 1]
    with pytest.raises(ValueError):
        decoder_batch.ragged_feeds(requests, tokens=2)


def test_request_parameters():
    assert multimask_output(None) is False and multimask_output(json.dumps({"multimask_output": True})) is True
    for bad in ("yes", 1, None):
        with pytest.raises(InvalidInput, match="^parameters.multimask_output: "):
            multimask_output(json.dumps({"multimask_output": bad}))
    assert spec.LOW_RES_LOGITS.name in requested_outputs(None)
    assert requested_outputs(json.dumps({"outputs": "scores,low_res_logits"})) == {"scores", "low_res_logits"}


def test_sdk_prompt_arguments():
    points, labels = as_points([[[1, 2], [3, 4]], [[5, 6]]], [[1, 0], [1]])
    assert labels.tolist() == [[1, 0], [1, -1]] and points.shape == (2, 2, 2)
    assert as_points([10, 20])[1].tolist() == [[1]]  # one click, foreground by default
    assert as_points([[[1, 2]], [[3, 4]]], [1, 0])[1].tolist() == [[1], [0]]  # one label per one-point prompt
    assert as_mask_inputs(np.zeros((2, 1, 256, 256)), 2).shape == (2, 256, 256)
    for call, field in [(lambda: wire_prompts(), "boxes"),
                        (lambda: wire_prompts(point_labels=[1]), "points"),
                        (lambda: as_points([[1, 2], [3, 4]], [1]), "point_labels"),
                        (lambda: wire_prompts(boxes=[[0, 0, 1, 1]], points=[[[1, 1]], [[2, 2]]]), "points"),
                        (lambda: as_mask_inputs(np.zeros((64, 64)), 1), "mask_inputs"),
                        (lambda: group_prompts([Prompt()]), "prompts")]:
        with pytest.raises(InvalidInputError) as info:
            call()
        assert info.value.field == field
    with pytest.raises(ValueError, match="either prompts"):
        plan_requests(boxes=[[0, 0, 1, 1]], prompts=[Prompt(box=[0, 0, 1, 1])])


def test_mixed_prompt_kinds_go_out_per_kind_and_come_back_in_order():
    prompts = [Prompt(box=[0, 0, 5, 5]), Prompt(points=[[1, 1], [2, 2]], labels=[1, 0]),
               Prompt(box=[1, 1, 4, 4], points=[[2, 2]]), Prompt(points=[[3, 3]])]
    plan = group_prompts(prompts)
    assert [members for members, _ in plan] == [[0], [1, 3], [2]]
    assert plan[1][1].point_labels.tolist() == [[1, 0], [1, -1]]

    def fake(members, wire):  # a result whose masks/scores say which prompt they answer
        n = len(members)
        return members, SegmentationResult(
            masks=np.array(members)[:, None, None] * np.ones((n, 2, 2), int) == np.arange(4)[0],
            scores=np.array(members, np.float32), boxes=wire.boxes, points=wire.points,
            point_labels=wire.point_labels, rles=[str(m) for m in members])

    merged = merge_results([fake(m, w) for m, w in plan], multimask=False, low_res_logits=False)
    assert merged.scores.tolist() == [0, 1, 2, 3] and merged.rles == ["0", "1", "2", "3"]
    assert np.isnan(merged.boxes[1]).all() and merged.boxes[2].tolist() == [1, 1, 4, 4]
    assert merged.point_labels.tolist() == [[-1, -1], [1, 0], [1, -1], [1, -1]]


def _grpc_result(**arrays):
    """A tritonclient gRPC InferResult holding `arrays`, as the server's ModelInferResponse carries them."""
    from tritonclient.grpc import InferResult, service_pb2
    from tritonclient.utils import np_to_triton_dtype

    response = service_pb2.ModelInferResponse(model_name=spec.ENSEMBLE)
    for name, array in arrays.items():
        response.outputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=list(array.shape))
        response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return InferResult(response)


def test_packed_masks_response_is_unpacked_or_refused():
    from samtriton.client import SamTritonError
    from samtriton.client.protocol import segment_response
    from samtriton.serving.postprocessing import pack_masks

    wire = wire_prompts([[0, 0, 5, 5], [1, 1, 9, 6]], None, None, None)
    masks = np.random.default_rng(4).random((2, 7, 13)) > 0.5
    scores = np.array([0.5, 0.25], np.float32)
    result = segment_response(_grpc_result(scores=scores, masks_packed=pack_masks(masks),
                                           image_size=np.array([7, 13], np.int32)), wire, "packed")
    assert result.masks.dtype == bool and np.array_equal(result.masks, masks) and result.rles == []
    for size in ([8, 13], [7, 17], [7]):  # another height, a width of other bytes, not (h, w)
        with pytest.raises(SamTritonError, match="masks_packed"):
            segment_response(_grpc_result(scores=scores, masks_packed=pack_masks(masks),
                                          image_size=np.array(size, np.int32)), wire, "packed")
    with pytest.raises(SamTritonError, match="missing masks_packed or image_size"):
        segment_response(_grpc_result(scores=scores, masks_packed=pack_masks(masks)), wire, "packed")
