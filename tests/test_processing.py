"""The torch-free pre/postprocessing against the upstream (PyTorch) transforms they replace."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from mobile_sam.utils.transforms import ResizeLongestSide
from PIL import Image
from torch.nn import functional as F

from samtriton.serving.errors import InvalidInput
from samtriton.serving.allocator import keep_freed_heap
from samtriton.serving.postprocessing import (decode_rle, encode_rle, masks_from_logits, pack_masks, unpack_masks,
                                              upscaled_logits)
from samtriton.serving.preprocessing import decode_image, normalise_and_pad, resize_longest_side, resized_shape
from samtriton.serving.prompts import Geometry, Limits, PromptInputs, transform_boxes, validate_boxes
from samtriton.variants import SAM_PIXEL_MEAN, SAM_PIXEL_STD

SIZES = [(1, 1), (1, 5000), (427, 643), (517, 391), (1024, 1024), (2000, 3000), (333, 500), (1023, 1025), (7, 1999)]


@pytest.mark.parametrize("h,w", SIZES)
def test_resized_shape_matches_upstream(h, w):
    assert resized_shape(h, w, 1024) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)
    assert resized_shape(h, w, 512) == ResizeLongestSide.get_preprocess_shape(h, w, 512)


@pytest.mark.parametrize("h,w", [(427, 643), (517, 391), (60, 90), (1024, 700)])
def test_resize_normalise_pad_match_upstream(h, w):
    rng = np.random.default_rng(h * w)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    upstream = ResizeLongestSide(1024).apply_image(image)
    ours = resize_longest_side(image, 1024)
    assert np.array_equal(ours, upstream)

    # Sam.preprocess: normalise then pad with zeros, in float32.
    x = torch.as_tensor(upstream).permute(2, 0, 1)[None].float()
    mean = torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1)
    x = (x - mean) / std
    x = F.pad(x, (0, 1024 - x.shape[-1], 0, 1024 - x.shape[-2]))[0].numpy()
    np.testing.assert_array_equal(normalise_and_pad(ours, 1024, SAM_PIXEL_MEAN, SAM_PIXEL_STD), x)


def test_box_transform_matches_upstream():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 600, size=(20, 4)).astype(np.float32)
    for h, w in [(427, 643), (517, 391), (2000, 3000)]:
        g = Geometry(h, w, *resized_shape(h, w, 1024))
        upstream = ResizeLongestSide(1024).apply_boxes_torch(torch.from_numpy(boxes), (h, w)).numpy()
        np.testing.assert_allclose(transform_boxes(boxes, g), upstream, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize(
    "h,w",
    [(427, 643), (517, 391), (333, 500), (1024, 1024), (1500, 700), (31, 17), (2, 3000)],
)
def test_masks_match_upstream_postprocess(h, w):
    """Same masks as Sam.postprocess_masks (two bilinear resizes with a crop) > 0."""
    rng = np.random.default_rng(h + w)
    # Smooth-ish logits with plenty of zero crossings, like random-weight decoders give.
    low = rng.normal(size=(4, 256, 256)).astype(np.float32)
    low = F.avg_pool2d(torch.from_numpy(low)[:, None], 3, 1, 1)[:, 0].numpy()
    g = Geometry(h, w, *resized_shape(h, w, 1024))
    ref = F.interpolate(torch.from_numpy(low)[:, None], (1024, 1024), mode="bilinear", align_corners=False)
    ref = ref[..., : g.input_h, : g.input_w]
    ref = F.interpolate(ref, (h, w), mode="bilinear", align_corners=False)[:, 0].numpy() > 0
    ours = masks_from_logits(low, g, 1024)
    assert ours.shape == ref.shape and ours.dtype == bool
    disagree = (ours != ref).mean()
    assert disagree < 1e-4, f"{disagree:.2e} of pixels differ"


def _upscaled(logits, geometry, frame, transposed=False) -> np.ndarray:
    parts = list(upscaled_logits(logits, geometry, frame, transposed=transposed))
    assert [i for i, _ in parts] == list(range(len(logits)))
    return np.concatenate([part for _, part in parts])


@pytest.mark.parametrize("low,frame", [(256, 1024), (256, 512), (64, 512), (3, 6), (2, 8)])
def test_frame_upsampling_matches_torch(low, frame):
    """The power-of-two upsampling (256 -> 1024 in serving) gives torch's values, edges
    included, in both layouts, for crops on either axis (only the low-res rows and columns a
    crop reads are upsampled)."""
    rng = np.random.default_rng(low + frame)
    logits = (rng.normal(size=(3, low, low)) * 4).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(logits)[:, None], (frame, frame), mode="bilinear", align_corners=False)[:, 0]
    # Landscape, portrait, odd crops on both axes, one row, the whole frame.
    crops = {(frame, frame * 2 // 3), (frame // 3 + 1, frame), (frame - 1, frame - 3), (1, frame), (frame, frame)}
    # float32 rounding of two-tap sums, in ulps of the inputs: the two layouts run the two
    # passes in opposite orders (measured: up to 1.5 ulps).
    atol = 2 * np.spacing(np.abs(logits).max())
    for keep_h, keep_w in sorted(crops):
        g = Geometry(keep_h, keep_w, keep_h, keep_w)
        want = ref[:, :keep_h, :keep_w].numpy()
        np.testing.assert_allclose(_upscaled(logits, g, frame), want, rtol=0, atol=atol,
                                   err_msg=f"crop {keep_h}x{keep_w}")
        np.testing.assert_allclose(_upscaled(logits, g, frame, transposed=True).transpose(0, 2, 1), want, rtol=0,
                                   atol=atol, err_msg=f"crop {keep_h}x{keep_w}, transposed")


@pytest.mark.parametrize("low,frame", [(256, 768), (200, 1024), (256, 256)])
def test_frame_upsampling_refuses_other_ratios(low, frame):
    """Every variant's frame is 1024 over 256 low-res; any other ratio is said, not approximated."""
    logits = np.zeros((1, low, low), np.float32)
    with pytest.raises(ValueError, match=f"upsampling {low} -> {frame}"):
        list(upscaled_logits(logits, Geometry(frame, frame, frame, frame), frame))


@pytest.mark.parametrize("h,w", [(683, 1024), (517, 391)])
def test_masks_come_column_major_for_rle_or_row_major(h, w):
    """masks_from_logits' answer is the (H, W, N) column-major layout COCO RLE reads (no copy), or
    C-contiguous when asked: the same masks either way."""
    low = np.random.default_rng(0).normal(size=(2, 256, 256)).astype(np.float32)
    g = Geometry(h, w, *resized_shape(h, w, 1024))
    masks = masks_from_logits(low, g)
    assert masks.shape == (2, h, w)
    assert np.shares_memory(np.asfortranarray(masks.transpose(1, 2, 0)), masks)
    assert np.array_equal(decode_rle(encode_rle(masks)), masks)
    rows = masks_from_logits(low, g, column_major=False)
    assert rows.shape == (2, h, w) and rows.flags.c_contiguous
    assert 0.2 < rows.mean() < 0.8  # both answers have masks to compare, not blanks
    assert np.array_equal(rows, masks)


def test_keep_freed_heap_applies_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip(f"mallopt is glibc's; this C library is {platform.libc_ver()[0] or 'unknown'}")
    assert keep_freed_heap()


def test_rle_json_is_what_json_dumps_writes():
    """encode_rle writes each RLE's JSON itself: json.dumps' bytes, the backslashes in COCO's
    counts escaped (a run of 44 pixels is written as one)."""
    import json

    from pycocotools import mask as mask_utils

    flat = np.ones(100, bool)
    flat[:44] = False
    masks = np.stack([flat.reshape(10, 10, order="F"), np.random.default_rng(2).random((10, 10)) > 0.5])
    encoded = encode_rle(masks)
    assert b"\\\\" in encoded[0]  # one escaped backslash, so the escaping is exercised
    for mask, answer in zip(masks, encoded):
        counts = mask_utils.encode(np.asfortranarray(mask).view(np.uint8))["counts"].decode("ascii")
        assert answer == json.dumps({"size": [10, 10], "counts": counts}).encode()
    assert np.array_equal(decode_rle(encoded), masks)


def test_rle_round_trip_and_coco_format():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 37, 53)) > 0.6
    encoded = encode_rle(masks)
    assert len(encoded) == 3
    import json

    first = json.loads(encoded[0])
    assert first["size"] == [37, 53] and isinstance(first["counts"], str)
    assert np.array_equal(decode_rle(encoded), masks)
    assert encode_rle(np.zeros((0, 5, 5), bool)) == []
    # Masks of two images cannot share one array.
    with pytest.raises(ValueError, match=r"different sizes: \[\(37, 53\), \(53, 37\)\]"):
        decode_rle(encoded[:1] + encode_rle(masks[:1].transpose(0, 2, 1)))


@pytest.mark.parametrize("shape", [(3, 37, 53), (2, 3, 5, 8), (1, 1, 1), (0, 4, 9)])
def test_packed_masks_round_trip(shape):
    """masks_packed: each row 8 pixels a byte, the first pixel in the highest bit, a partial last
    byte zero-padded; unpacked with the width, the masks come back exactly (any layout packs alike)."""
    masks = np.random.default_rng(3).random(shape) > 0.5
    packed = pack_masks(masks)
    assert packed.dtype == np.uint8 and packed.shape == (*shape[:-1], -(-shape[-1] // 8))
    if masks.size:
        assert packed.reshape(-1)[0] >> 7 == masks.reshape(-1)[0]
    # The format written out by hand: each row zero-padded to whole bytes, pixel 8k + j weighing 2^(7 - j).
    width = packed.shape[-1] * 8
    padded = np.zeros((*shape[:-1], width), np.uint16)
    padded[..., :shape[-1]] = masks
    by_hand = (padded.reshape(*shape[:-1], packed.shape[-1], 8) << np.arange(7, -1, -1, dtype=np.uint16)).sum(axis=-1)
    assert np.array_equal(packed, by_hand)
    # The postprocess packs the column-major masks it also RLE-encodes: the same bytes.
    assert np.array_equal(pack_masks(np.asfortranarray(masks)), packed)
    back = unpack_masks(packed, shape[-1])
    assert back.dtype == bool and np.array_equal(back, masks)


def test_unpacking_refuses_the_wrong_width():
    packed = pack_masks(np.ones((2, 4, 53), bool))
    assert unpack_masks(packed, 49).shape == (2, 4, 49)  # 53 and 49 both need 7 bytes a row
    with pytest.raises(ValueError, match=r"uint8 \[2, 4, 7\] do not hold rows of 60 pixels"):
        unpack_masks(packed, 60)
    with pytest.raises(ValueError, match="do not hold rows"):
        unpack_masks(packed.astype(np.int32), 53)


def _png(mode: str, size=(40, 30), **info) -> bytes:
    img = Image.new(mode, size)
    buf = io.BytesIO()
    img.save(buf, "PNG", **info)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "1"])
def test_decode_any_mode_to_rgb(mode):
    rgb = decode_image(_png(mode))
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8


def test_decode_rejects_pixel_bomb_before_decoding():
    data = _png("L", size=(5000, 5000))
    with pytest.raises(InvalidInput, match="pixels exceeds"):
        decode_image(data, Limits(max_pixels=1_000_000))


def test_decode_rejects_oversized_bytes():
    with pytest.raises(InvalidInput, match="image: .* exceeds"):
        decode_image(_png("RGB"), Limits(max_image_bytes=10))


def test_box_validation_messages():
    g = Geometry(100, 200, 512, 1024)
    ok = validate_boxes(np.array([[0, 0, 200, 100], [-5, -5, 3, 3]], np.float32), g)
    assert ok.shape == (2, 4)
    with pytest.raises(InvalidInput, match=r"^boxes: box 1 .*x1 < x0"):
        validate_boxes(np.array([[0, 0, 5, 5], [9, 0, 5, 5]], np.float32), g)
    with pytest.raises(InvalidInput, match=r"^boxes: .*limit of 2"):
        validate_boxes(np.zeros((3, 4), np.float32), g, Limits(max_boxes=2))
    with pytest.raises(InvalidInput, match=r"^boxes: expected shape"):
        validate_boxes(np.zeros((3,), np.float32), g)
    with pytest.raises(InvalidInput, match=r"^boxes: expected FP32"):
        validate_boxes(np.zeros((1, 4), np.float64), g)


def test_shutdown_drain_counts_requests_in_the_ensembles():
    from samtriton.server import in_flight_from_metrics

    def metrics(**counts):
        lines = ["# HELP nv_inference_request_success ...", "# TYPE nv_inference_request_success counter"]
        for key, n in counts.items():
            model, metric = key.split("__")
            name = {"ok": "nv_inference_request_success", "errors": "samtriton_request_errors_total"}.get(metric)
            if metric.startswith("failed_"):
                name, reason = "nv_inference_request_failure", metric.split("_", 1)[1].upper()
                lines.append(f'{name}{{model="{model}",reason="{reason}",version="1"}} {n}')
            else:
                lines.append(f'{name}{{model="{model}",version="1"}} {n}')
        return "\n".join(lines)

    # 6 through preprocess, 1 of them refused there; 2 finished in postprocess,
    # 1 sam_encode done, 1 failed in the image embedding: 1 in flight.
    busy, _ = in_flight_from_metrics(metrics(
        mobilesam_preprocess__ok=6, mobilesam_preprocess__errors=1, postprocess__ok=2,
        sam_encode__ok=1, mobilesam_image_embedding__failed_rejected=1))
    assert busy == 1
    # Error responses of the image embedding (e.g. the encoder's queue was full) end requests too;
    # the encoder's own failures reach them that way and are not counted twice.
    assert in_flight_from_metrics(metrics(
        mobilesam_preprocess__ok=3, postprocess__ok=2, mobilesam_image_embedding__errors=1,
        mobilesam_image_encoder__failed_rejected=1))[0] == 0
    # Several variants add up; the metric families Triton lists without a model are ignored.
    two, _ = in_flight_from_metrics(metrics(
        mobilesam_preprocess__ok=2, vit_b_preprocess__ok=3, postprocess__ok=2, sam_encode_vit_b__ok=1)
        + "\nnv_cpu_utilization 0.5\nnv_gpu_utilization{gpu_uuid=\"x\"} 0")
    assert two == 2
    assert in_flight_from_metrics("")[0] == 0
    # sam_everything requests pass no preprocess: its per-instance gauges count them.
    gauges = "\n".join(f'samtriton_everything_in_flight{{instance="{m}_{i}",model="{m}"}} {n}'
                       for m, i, n in (("sam_everything", 0, 1), ("sam_everything", 1, 0),
                                       ("sam_everything_vit_b", 0, 1)))
    assert in_flight_from_metrics(metrics(mobilesam_preprocess__ok=2, postprocess__ok=1) + "\n" + gauges)[0] == 3


def test_decode_names_pil_decompression_bomb():
    from PIL import Image as PILImage

    data = _png("1", size=(20000, 20000))  # 1-bit: a small file, 400 MP
    assert PILImage.MAX_IMAGE_PIXELS * 2 < 20000 * 20000
    with pytest.raises(InvalidInput, match="^image: "):
        decode_image(data, Limits(max_pixels=10**12))


@pytest.mark.parametrize("h,w", [(427, 643), (517, 391), (300, 300)])
def test_efficientvit_l0_preprocess_matches_its_predictor(h, w):
    """512 encoder input, 1024 prompt frame: pixels as EfficientViT-SAM's own
    transform makes them, boxes and input size as its predictor computes them."""
    from efficientsam.models.efficientvit.sam import EfficientViTSamPredictor
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    from samtriton.serving.preprocessing import PreprocessSettings, preprocess
    from samtriton.variants import get_variant

    rng = np.random.default_rng(h + w)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    boxes = np.array([[5, 7, w * 0.6, h * 0.7], [w * 0.2, h * 0.1, w, h]], dtype=np.float32)
    settings = PreprocessSettings.for_variant(get_variant("efficientvit-sam-l0"))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    points = np.array([[[3, 4], [w * 0.5, h * 0.25]], [[w - 1, h - 1], [0, 0]]], dtype=np.float32)
    labels = np.array([[1, 0], [1, -1]], dtype=np.int32)
    ours = preprocess(buf.getvalue(), PromptInputs(boxes=boxes, points=points, point_labels=labels), settings)

    sam = create_efficientvit_sam_model("efficientvit-sam-l0", pretrained=False)
    predictor = EfficientViTSamPredictor(sam)
    pixels = sam.transform(image).numpy()  # SamResize(512), ToTensor, Normalize, SamPad(512)
    predictor.original_size, predictor.input_size = (h, w), ResizeLongestSide.get_preprocess_shape(h, w, 1024)
    assert ours.pixel_values.shape == pixels.shape == (3, 512, 512)
    # ToTensor/Normalize divide by 255 first: equal up to float32 rounding.
    np.testing.assert_allclose(ours.pixel_values, pixels, atol=2e-5)
    assert (ours.geometry.input_h, ours.geometry.input_w) == tuple(predictor.input_size)
    # Tokens: each prompt's points, then its box corners, in the predictor's frame.
    corners = predictor.apply_boxes(boxes).reshape(-1, 2, 2)
    np.testing.assert_allclose(ours.prompts.coords[0, :2], predictor.apply_coords(points[0]), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(ours.prompts.coords[0, 2:4], corners[0], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(ours.prompts.coords[1, :1], predictor.apply_coords(points[1, :1]), rtol=1e-6,
                               atol=1e-4)
    np.testing.assert_allclose(ours.prompts.coords[1, 1:3], corners[1], rtol=1e-6, atol=1e-4)
    assert ours.prompts.labels.tolist() == [[1, 0, 2, 3], [1, 2, 3, -10]]


def test_16_bit_grayscale_is_scaled_not_clipped():
    wide = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    rgb = decode_image(buf.getvalue())
    assert rgb.shape == (16, 16, 3)
    np.testing.assert_array_equal(rgb[..., 0], (wide >> 8).astype(np.uint8))
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
