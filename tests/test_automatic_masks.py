"""The numpy pieces of segment-everything against upstream's own utilities (segment_anything.utils.amg,
torchvision's NMS, OpenCV's connected components), on inputs built to hit their edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils import amg
from torchvision.ops.boxes import batched_nms

from samtriton.serving import automatic_masks as am
from samtriton.serving.errors import InvalidInput


@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_point_grid(n):
    np.testing.assert_array_equal(am.point_grid(n), amg.build_point_grid(n))


def test_layer_point_grids():
    params = am.GeneratorParameters(points_per_side=16, crop_n_layers=2, crop_n_points_downscale_factor=2)
    ours = am.layer_point_grids(params)
    for a, b in zip(ours, amg.build_all_layer_point_grids(16, 2, 2), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size", [(480, 640), (427, 643), (1000, 333), (64, 64)])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_crop_boxes(size, layers):
    boxes, idx = amg.generate_crop_boxes(size, layers, 512 / 1500)
    assert am.crop_boxes(*size, layers, 512 / 1500) == list(zip(boxes, idx))


def test_nms_matches_torchvision_with_ties_and_degenerate_boxes():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 400))
        xy = rng.integers(0, 60, (n, 2))
        wh = rng.integers(0, 30, (n, 2))  # zero-size boxes too
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        scores = rng.choice([0.25, 0.5, 0.75, 1.0], n).astype(np.float32)  # many ties
        if trial % 2:
            scores = rng.random(n).astype(np.float32)
        threshold = float(rng.choice([0.0, 0.3, 0.7, 1.0]))
        expected = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.zeros(n), threshold)
        np.testing.assert_array_equal(am.nms(boxes, scores, threshold), expected.numpy())


def test_mask_boxes_and_stability_and_crop_edge():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (12, 37, 53)).astype(np.float32)
    logits[3] = -5  # empty mask
    logits[4, :, :] = -5
    logits[4, 10, 20] = 5  # a single pixel
    masks = logits > 0
    np.testing.assert_array_equal(am.mask_boxes(masks), amg.batched_mask_to_box(torch.from_numpy(masks)).numpy())
    expected = amg.calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    np.testing.assert_array_equal(am.stability_scores(logits, 1.0), expected)
    boxes = rng.integers(0, 300, (200, 4))
    boxes[:, 2:] += boxes[:, :2]
    for crop in ([0, 0, 640, 480], [100, 50, 500, 400], [239, 159, 640, 480]):
        expected = amg.is_box_near_crop_edge(torch.from_numpy(boxes), crop, [0, 0, 640, 480]).numpy()
        np.testing.assert_array_equal(am.near_crop_edge(boxes, crop, [0, 0, 640, 480]), expected)


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions_matches_opencv(mode):
    rng = np.random.default_rng(2)
    for _ in range(20):
        mask = rng.random((40, 50)) > rng.uniform(0.3, 0.8)
        for area in (1, 3, 10, 400, 5000):
            ours, changed = am.remove_small_regions(mask, area, mode)
            theirs, their_changed = amg.remove_small_regions(mask, area, mode)
            assert changed == their_changed
            np.testing.assert_array_equal(ours, theirs)


def test_parameters_are_validated_by_name():
    limits = am.EverythingLimits()
    p = am.GeneratorParameters.from_request({"points_per_side": 8, "pred_iou_thresh": "0.5", "outputs": "x"},
                                            limits)
    assert (p.points_per_side, p.pred_iou_thresh, p.box_nms_thresh) == (8, 0.5, 0.7)
    bad = [
        ({"points_per_side": 0}, "points_per_side"),
        ({"points_per_side": 2.5}, "points_per_side"),
        ({"points_per_side": "many"}, "points_per_side"),
        ({"points_per_side": 65}, "points_per_side"),
        ({"pred_iou_thresh": 1.5}, "pred_iou_thresh"),
        ({"stability_score_thresh": float("nan")}, "stability_score_thresh"),
        ({"box_nms_thresh": True}, "box_nms_thresh"),
        ({"crop_n_layers": 3}, "crop_n_layers"),
        ({"crop_overlap_ratio": -0.1}, "crop_overlap_ratio"),
        ({"min_mask_region_area": -1}, "min_mask_region_area"),
        ({"points_per_side": 4, "crop_n_layers": 2, "crop_n_points_downscale_factor": 4},
         "crop_n_points_downscale_factor"),
    ]
    for values, field in bad:
        with pytest.raises(InvalidInput) as info:
            am.GeneratorParameters.from_request(values, limits)
        assert info.value.field == f"parameters.{field}", (values, str(info.value))
