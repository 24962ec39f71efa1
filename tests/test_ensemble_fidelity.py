"""The served ensemble against the upstream predictor in-process, on the same random checkpoint."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from samtriton.client import SamClient
from samtriton.sample_image import sample_scene
from tests.conftest import encode, mask_iou, random_boxes

pytestmark = pytest.mark.integration

MIN_MEAN_IOU = 0.99
MAX_SCORE_DIFF = 1e-3


def _exif_rotated_jpeg() -> bytes:
    # Stored landscape, EXIF orientation 6: viewers (and the server) show it portrait.
    img, _ = sample_scene(420, 300, seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=90, exif=exif.tobytes())


def _images() -> dict[str, bytes]:
    scene, _ = sample_scene(643, 427, seed=1)  # odd size, landscape
    portrait, _ = sample_scene(391, 517, seed=2)
    rgba = portrait.convert("RGBA")
    alpha = np.full((517, 391), 255, np.uint8)
    alpha[:, :100] = 60  # partly transparent: must be ignored, as `.convert("RGB")` does
    rgba.putalpha(Image.fromarray(alpha))
    gray, _ = sample_scene(500, 333, seed=3)
    return {
        "landscape-jpeg-643x427": encode(scene, "JPEG", quality=90),
        "portrait-png-alpha-391x517": encode(rgba, "PNG"),
        "grayscale-png-500x333": encode(gray.convert("L"), "PNG"),
        "exif-rotated-jpeg": _exif_rotated_jpeg(),
        "webp-lossless": encode(scene.resize((320, 213)), "WEBP", lossless=True),
    }


IMAGES = _images()
# mobilesam (the default, `sam`): every image with 1, 5 and 47 boxes.
# efficientvit-sam-l0 (512 encoder input, 1024 prompt frame): every image.
# sam-vit-b: two images (its encoder takes ~14 s served + ~26 s upstream per
# image on 2 CPU cores).
CASES = (
    [("mobilesam", name, n) for name in IMAGES for n in ((1, 5, 47) if "webp" not in name else (5,))]
    + [("efficientvit-sam-l0", name, 5) for name in IMAGES]
    + [("efficientvit-sam-l0", "landscape-jpeg-643x427", 47)]
    + [("sam-vit-b", "landscape-jpeg-643x427", 5), ("sam-vit-b", "exif-rotated-jpeg", 3)]
)


@pytest.mark.parametrize("model,image_name,n_boxes", CASES, ids=[f"{m}-{n}-{b}boxes" for m, n, b in CASES])
def test_served_masks_match_upstream_predictor(triton_server, upstream_predictors, model, image_name, n_boxes):
    image_bytes = IMAGES[image_name]
    width, height = ImageOps.exif_transpose(Image.open(io.BytesIO(image_bytes))).size
    boxes = random_boxes(np.random.default_rng(n_boxes * 7 + len(image_name)), n_boxes, width, height)

    # The default variant through the `sam` alias, the others by name.
    with SamClient(triton_server.grpc_url, protocol="grpc", model=None if model == "mobilesam" else model) as client:
        served = client.segment(image_bytes, boxes)
    ref_masks, ref_scores = upstream_predictors(model).predict(image_bytes, boxes)

    assert served.masks.shape == ref_masks.shape == (n_boxes, height, width)
    ious = mask_iou(served.masks, ref_masks)
    score_diff = np.abs(served.scores - ref_scores).max()
    print(f"\n{model} {image_name} {n_boxes} boxes: mean IoU {ious.mean():.5f} min IoU {ious.min():.5f} "
          f"max |score diff| {score_diff:.2e} mask pixels {int(ref_masks.sum())}")
    # Guard against a vacuous comparison: random weights still give non-empty masks.
    assert ref_masks.any()
    assert ious.mean() >= MIN_MEAN_IOU
    assert score_diff <= MAX_SCORE_DIFF


def test_variants_answer_with_their_own_weights(triton_server):
    """The ensembles of different variants are really different models, and `sam`
    is the default's: same image and boxes, same masks only where expected."""
    image_bytes = IMAGES["landscape-jpeg-643x427"]
    boxes = random_boxes(np.random.default_rng(5), 4, 643, 427)
    results = {}
    for model in (None, "mobilesam", "efficientvit-sam-l0"):
        with SamClient(triton_server.grpc_url, model=model) as client:
            results[model] = client.segment(image_bytes, boxes)
    assert np.array_equal(results[None].masks, results["mobilesam"].masks)
    assert np.array_equal(results[None].scores, results["mobilesam"].scores)
    assert not np.allclose(results["mobilesam"].scores, results["efficientvit-sam-l0"].scores)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("transport", ["packed", "rle", "dense"])
def test_protocols_and_mask_transports_agree(triton_server, protocol, transport):
    image_bytes = IMAGES["landscape-jpeg-643x427"]
    boxes = random_boxes(np.random.default_rng(11), 3, 643, 427)
    with SamClient(triton_server.grpc_url, protocol="grpc") as client:
        baseline = client.segment(image_bytes, boxes, mask_transport="rle")
    with SamClient(triton_server.url(protocol), protocol=protocol) as client:
        other = client.segment(image_bytes, boxes, mask_transport=transport)
    assert other.masks.dtype == bool and other.masks.shape == (3, 427, 643)
    assert np.array_equal(other.masks, baseline.masks)
    assert np.array_equal(other.scores, baseline.scores)
    assert len(baseline.rles) == 3 and other.rles == (baseline.rles if transport == "rle" else [])


def test_mask_transports_agree_with_multimask(triton_server):
    """Three candidates per prompt: the packed masks keep the candidate axis, the RLEs come three a prompt."""
    image_bytes = IMAGES["landscape-jpeg-643x427"]
    points = np.array([[[200.0, 150.0]], [[420.0, 300.0]]], np.float32)
    with SamClient(triton_server.grpc_url) as client:
        answers = {t: client.segment(image_bytes, points=points, multimask=True, mask_transport=t)
                   for t in ("packed", "rle", "dense")}
    packed = answers["packed"]
    assert packed.masks.shape == (2, 3, 427, 643) and packed.masks.dtype == bool
    assert packed.masks.any(axis=(-1, -2)).all()
    for other in (answers["rle"], answers["dense"]):
        assert np.array_equal(other.masks, packed.masks)
        assert np.array_equal(other.scores, packed.scores)
    assert [len(r) for r in answers["rle"].rles] == [3, 3]


def test_sdk_accepts_path_pil_and_array(triton_server, tmp_path):
    scene, boxes = sample_scene(400, 300, seed=5)
    path = tmp_path / "scene.png"
    scene.save(path)
    with SamClient(triton_server.grpc_url) as client:
        results = [client.segment(x, boxes[:2]) for x in (path, str(path), scene, np.asarray(scene), path.read_bytes())]
    for r in results[1:]:
        assert np.array_equal(r.masks, results[0].masks)
        assert np.array_equal(r.scores, results[0].scores)
    assert results[0].masks.shape == (2, 300, 400)
