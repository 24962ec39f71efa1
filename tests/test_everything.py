"""Segment everything (`sam_everything*`) against each variant's own upstream automatic mask
generator on the same random-weight checkpoint, over gRPC and HTTP; its parameters, its use
of the encoder cache and the decoder's batching, and cancellation, on a real tritonserver."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from samtriton import spec
from samtriton.client import InvalidInputError, SamClient
from samtriton.sample_image import sample_scene
from samtriton.serving.postprocessing import mask_ious
from samtriton.variants import get_variant
from tests.test_batching_and_cache import _stats

pytestmark = pytest.mark.integration

# Random weights give low predicted IoUs (~0.1) and flat logits (stability ~0 at offset 1),
# so "keep everything" cases lower the thresholds, and one lowers the offset instead.
KEEP_ALL = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
CASES = {
    "grid 4x4, every candidate, small regions removed": dict(KEEP_ALL, min_mask_region_area=50),
    "grid 6x6, IoU + stability filters, NMS 0.7": dict(points_per_side=6, pred_iou_thresh=0.05,
                                                       stability_score_thresh=0.3, stability_score_offset=0.02),
    # Random masks all span the image, so NMS keeps one; without it the stability filter keeps a subset.
    "grid 6x6, stability >= 0.6 at offset 0.02, no NMS": dict(points_per_side=6, stability_score_thresh=0.6,
                                                              stability_score_offset=0.02, box_nms_thresh=1.0,
                                                              pred_iou_thresh=0.0),
    "grid 4x4, one crop layer": dict(KEEP_ALL, crop_n_layers=1, crop_nms_thresh=1.0),
    "upstream's thresholds on an 8x8 grid": dict(points_per_side=8),
}
# The cases whose thresholds let random weights keep masks (the others compare counts, 0 = 0 or 1 = 1).
KEEP_MASKS = {"grid 4x4, every candidate, small regions removed", "grid 6x6, stability >= 0.6 at offset 0.02, no NMS",
              "grid 4x4, one crop layer"}
BOTH_PROTOCOLS = {"grid 4x4, every candidate, small regions removed", "grid 4x4, one crop layer"}
MODELS = ("mobilesam", "efficientvit-sam-l0")


def _png(seed: int, w: int = 320, h: int = 240) -> bytes:
    scene, _ = sample_scene(w, h, seed=seed)
    buf = io.BytesIO()
    scene.save(buf, format="PNG")
    return buf.getvalue()


IMAGE = _png(3)


def _model(name: str) -> str:
    return spec.model_names(get_variant(name).slug).everything


def assert_matches_upstream(result, reference: list[dict]):
    """Same count; in order, mask IoU >= 0.99 for >= 98 %, scores within 1e-3, the rest equal (a
    pixel may flip where a logit sits at the threshold: areas within 1 %, boxes equal for 98 %)."""
    assert len(result) == len(reference), (len(result), len(reference))
    if not reference:
        return
    theirs = mask_utils.decode([r["segmentation"] for r in reference]).transpose(2, 0, 1).astype(bool)
    ious = mask_ious(result.masks, theirs)
    assert (ious >= 0.99).mean() >= 0.98, np.sort(ious)[:5]
    np.testing.assert_allclose(result.scores, [r["predicted_iou"] for r in reference], atol=1e-3)
    np.testing.assert_allclose(result.stability_scores, [r["stability_score"] for r in reference], atol=1e-3)
    assert (result.bboxes == np.array([r["bbox"] for r in reference])).all(axis=1).mean() >= 0.98
    np.testing.assert_allclose(result.areas, [r["area"] for r in reference], rtol=1e-2)
    np.testing.assert_array_equal(result.crop_boxes, [r["crop_box"] for r in reference])
    np.testing.assert_allclose(result.point_coords, [r["point_coords"][0] for r in reference], atol=1e-3)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_upstream_generator(triton_server, upstream_predictors, model, case):
    params = CASES[case]
    reference = upstream_predictors(model).generate(IMAGE, **params)
    assert len(reference) > 1 or case not in KEEP_MASKS
    protocols = ("grpc", "http") if case in BOTH_PROTOCOLS else ("grpc",)
    for protocol in protocols:
        with SamClient(triton_server.url(protocol), protocol=protocol, everything_model_name=_model(model)) as c:
            result = c.segment_everything(IMAGE, **params)
        assert_matches_upstream(result, reference)
        assert np.isnan(result.prompt_boxes).all()
        if "crop" in case:
            assert len(reference) and {tuple(r["crop_box"]) for r in reference} == {(0, 0, 320, 240)}


def _upstream_box_prompts(predictor, image_bytes: bytes, boxes: np.ndarray, pred_iou_thresh: float,
                          stability_score_thresh: float, stability_score_offset: float, box_nms_thresh: float):
    """Detector boxes as prompts (MobileSAMv2's object-aware mode) with the upstream generator's
    own filters, from segment_anything's utilities: one mask per box."""
    from segment_anything.utils import amg
    from torchvision.ops.boxes import batched_nms

    h, w = predictor._set_image(image_bytes)
    box_t = predictor._to_frame(boxes, (h, w), boxes=True)
    with torch.no_grad():
        logits, iou, _ = predictor.predictor.predict_torch(None, None, boxes=box_t, multimask_output=False,
                                                           return_logits=True)
    data = amg.MaskData(masks=logits.flatten(0, 1), iou_preds=iou.flatten(0, 1),
                        prompt_boxes=torch.from_numpy(boxes))
    if pred_iou_thresh > 0:
        data.filter(data["iou_preds"] > pred_iou_thresh)
    data["stability_score"] = amg.calculate_stability_score(data["masks"], 0.0, stability_score_offset)
    if stability_score_thresh > 0:
        data.filter(data["stability_score"] >= stability_score_thresh)
    data["masks"] = data["masks"] > 0.0
    data["boxes"] = amg.batched_mask_to_box(data["masks"])
    data.filter(~amg.is_box_near_crop_edge(data["boxes"], [0, 0, w, h], [0, 0, w, h]))
    data["rles"] = amg.mask_to_rle_pytorch(data["masks"])
    del data["masks"]
    data.filter(batched_nms(data["boxes"].float(), data["iou_preds"], torch.zeros(len(data["boxes"])),
                            box_nms_thresh))
    return [{"segmentation": amg.coco_encode_rle(rle), "area": amg.area_from_rle(rle),
             "bbox": amg.box_xyxy_to_xywh(data["boxes"][i]).tolist(), "predicted_iou": data["iou_preds"][i].item(),
             "stability_score": data["stability_score"][i].item(), "crop_box": [0, 0, w, h],
             "prompt_box": data["prompt_boxes"][i].tolist()} for i, rle in enumerate(data["rles"])]


@pytest.mark.parametrize("model", MODELS)
def test_box_prompts_match_upstream_filters(triton_server, upstream_predictors, model):
    rng = np.random.default_rng(4)
    xy = rng.uniform(0, 200, (12, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 110, (12, 2))], 1).astype(np.float32)
    params = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=0.02, box_nms_thresh=1.0)
    reference = _upstream_box_prompts(upstream_predictors(model), IMAGE, boxes, **params)
    with SamClient(triton_server.grpc_url, everything_model_name=_model(model)) as c:
        result = c.segment_everything(IMAGE, boxes=boxes, **params)
    assert len(result) == len(reference) > 1
    theirs = mask_utils.decode([r["segmentation"] for r in reference]).transpose(2, 0, 1).astype(bool)
    assert (mask_ious(result.masks, theirs) >= 0.99).mean() >= 0.98
    np.testing.assert_allclose(result.scores, [r["predicted_iou"] for r in reference], atol=1e-3)
    np.testing.assert_allclose(result.stability_scores, [r["stability_score"] for r in reference], atol=1e-3)
    assert (result.bboxes == np.array([r["bbox"] for r in reference])).all(axis=1).mean() >= 0.98
    np.testing.assert_allclose(result.prompt_boxes, [r["prompt_box"] for r in reference], atol=1e-4)
    assert np.isnan(result.point_coords).all()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_parameters_name_the_parameter(triton_server, protocol):
    bad = [
        (dict(points_per_side=0), "parameters.points_per_side"),
        (dict(points_per_side=2.5), "parameters.points_per_side"),
        (dict(pred_iou_thresh=1.5), "parameters.pred_iou_thresh"),
        (dict(box_nms_thresh="high"), "parameters.box_nms_thresh"),
        (dict(crop_n_layers=7), "parameters.crop_n_layers"),
        (dict(points_per_sid=8), "parameters.points_per_sid"),
        (dict(min_mask_region_area=-3), "parameters.min_mask_region_area"),
    ]
    with SamClient(triton_server.url(protocol), protocol=protocol) as c:
        for params, field in bad:
            with pytest.raises(InvalidInputError) as info:
                c.segment_everything(IMAGE, **params)
            assert info.value.field == field, (params, str(info.value))
        with pytest.raises(InvalidInputError) as info:
            c.segment_everything(IMAGE, boxes=[[10, 10, 50, 50]], crop_n_layers=1)
        assert info.value.field == "parameters.crop_n_layers"
        with pytest.raises(InvalidInputError) as info:
            c.segment_everything(IMAGE, boxes=[[10, 10, float("nan"), 50]])
        assert info.value.field == "boxes"
        with pytest.raises(InvalidInputError) as info:
            c.segment_everything(b"not an image")
        assert info.value.field == "image"
        assert len(c.segment_everything(IMAGE, **dict(KEEP_ALL, points_per_side=2))) == 12


def test_embedding_cache_and_decoder_requests(triton_server):
    """A second request on the same image runs no encoder (the embedding cache `sam`
    shares), and two at once each send the decoder their prompts in requests of 8.
    (They need not share executions: each keeps one decoder request in flight and
    Triton's batcher hands a lone queued request to the decoder as soon as it is
    free; cross-request batching is tested in test_batching_and_cache.)"""
    image = _png(21)
    params = dict(KEEP_ALL, points_per_side=6)
    encoder = spec.model_names("mobilesam").image_encoder
    decoder = spec.model_names("mobilesam").mask_decoder
    embedding = spec.model_names("mobilesam").image_embedding
    with SamClient(triton_server.grpc_url) as c:
        first = c.segment_everything(image, **params)
        enc_before, dec_before = _stats(triton_server, encoder), _stats(triton_server, decoder)
        events_before = triton_server.embedding_cache_events(embedding)
        results = [None, None]

        def run(i):
            with SamClient(triton_server.grpc_url) as own:
                results[i] = own.segment_everything(image, **params)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    enc_after, dec_after = _stats(triton_server, encoder), _stats(triton_server, decoder)
    events = triton_server.embedding_cache_events(embedding)
    assert enc_after["execution_count"] == enc_before["execution_count"]
    assert events["hit"] == events_before["hit"] + 2 and events["miss"] == events_before["miss"]
    requests = dec_after["inference_count"] - dec_before["inference_count"]
    # 36 points in requests of 8 prompts: 5 per everything-request.
    assert requests == 10, requests
    for r in results:
        assert r.rles == first.rles
        np.testing.assert_array_equal(r.scores, first.scores)


def test_a_cancelled_request_stops_using_the_decoder(triton_server):
    """gRPC deadline: the model notices between decoder requests and stops; box requests go on."""
    import tritonclient.grpc as g

    decoder = spec.model_names("mobilesam").mask_decoder
    image = _png(33)
    client = g.InferenceServerClient(triton_server.grpc_url)
    inputs = [g.InferInput(spec.IMAGE.name, [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([image], dtype=np.object_))
    started = _stats(triton_server, decoder)["inference_count"]
    with pytest.raises(Exception, match="Deadline"):
        client.infer(spec.EVERYTHING, inputs, parameters={"points_per_side": 32}, client_timeout=4)
    client.close()
    time.sleep(1.0)  # the requests in flight at the deadline finish
    at_deadline = _stats(triton_server, decoder)["inference_count"]
    time.sleep(5.0)
    after = _stats(triton_server, decoder)["inference_count"]
    # 1024 points are 128 decoder requests of 8; the model stopped, at most its one request in flight after.
    assert at_deadline - started < 128 and after - at_deadline <= 1, (started, at_deadline, after)
    with SamClient(triton_server.grpc_url) as c:
        assert len(c.segment(image, [[10, 10, 100, 100]])) == 1
