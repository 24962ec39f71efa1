"""Image decoding, resizing and box transformation, as the upstream SAM predictor does them.

Upstream (`ResizeLongestSide.apply_image` + `Sam.preprocess`): resize the RGB
uint8 image with PIL bilinear so its longest side is the encoder size
(rounding each side with int(x + 0.5)), normalise with the pixel mean/std,
then zero-pad bottom/right to a square.  Boxes are scaled by the same per-axis
factors.  Padding happens after normalisation, so the pad is 0 in normalised
space; doing both here keeps the encoder graph a plain network.

The encoder's input size and the prompt frame differ for EfficientViT-SAM
L0-L2 (512 vs 1024): the image is resized for the encoder, while the boxes
and the geometry the postprocess uses are in the 1024 frame, as its
predictor computes `input_size` with the 1024 long side.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from samtriton.serving.errors import InvalidInput
from samtriton.spec import PROMPT_SIZE

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
# Pillow's modes for 16-bit grayscale (PNG opens as I;16, some builds as I).
_WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_boxes: int = 256


@dataclass(frozen=True)
class Geometry:
    original_h: int
    original_w: int
    input_h: int  # resized size before padding, in the prompt frame
    input_w: int

    def as_array(self) -> np.ndarray:
        return np.array([self.original_h, self.original_w, self.input_h, self.input_w], dtype=np.int32)

    @classmethod
    def from_array(cls, values) -> "Geometry":
        a = [int(v) for v in np.asarray(values).reshape(-1)]
        return cls(*a)


def resized_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def decode_image(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """Encoded JPEG/PNG/WebP bytes -> HxWx3 uint8 RGB, EXIF orientation applied."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput("image", f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidInput("image", "empty")
    if len(data) > limits.max_image_bytes:
        raise InvalidInput("image", f"{len(data)} bytes exceeds the limit of {limits.max_image_bytes} bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise InvalidInput("image", f"too many pixels ({e})") from None
    except Exception:
        raise InvalidInput("image", "not a decodable image (expected JPEG, PNG or WebP bytes)") from None
    if img.format not in ALLOWED_FORMATS:
        raise InvalidInput("image", f"format {img.format} is not accepted; use one of {', '.join(ALLOWED_FORMATS)}")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise InvalidInput("image", f"has no pixels ({w}x{h})")
    # Checked before decoding the pixels: the header is enough, and a
    # decompression bomb must not get to allocate.
    if w * h > limits.max_pixels:
        raise InvalidInput("image", f"{w}x{h} = {w * h} pixels exceeds the limit of {limits.max_pixels}")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in _WIDE_GRAY_MODES:
            # 16-bit grayscale: PIL's convert() clips values above 255 (an
            # almost white image); scale to 8 bits as OpenCV's imread does.
            wide = np.asarray(img, dtype=np.uint32)
            img = Image.fromarray(np.clip(wide >> 8, 0, 255).astype(np.uint8), mode="L")
        if img.mode != "RGB":
            # Palette images with a transparent index go through RGBA so PIL
            # does not warn; the alpha channel is then dropped, as the
            # reference does with `.convert("RGB")`.
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)
    except Exception as e:
        raise InvalidInput("image", f"cannot be decoded ({e})") from None


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, long_side)
    if (new_h, new_w) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def normalise_and_pad(resized: np.ndarray, size: int, mean, std) -> np.ndarray:
    """HxWx3 uint8 -> 3 x size x size float32, normalised then zero padded."""
    h, w = resized.shape[:2]
    out = np.zeros((3, size, size), dtype=np.float32)
    valid = out[:, :h, :w]
    # In place: no 12 MB temporaries; the same float32 (x - mean) / std as upstream.
    np.subtract(resized.transpose(2, 0, 1), np.asarray(mean, dtype=np.float32).reshape(3, 1, 1), out=valid)
    np.divide(valid, np.asarray(std, dtype=np.float32).reshape(3, 1, 1), out=valid)
    return out


def validate_boxes(boxes, geometry: Geometry, limits: Limits = Limits()) -> np.ndarray:
    """Check xyxy boxes in original pixels; returns them as float32 (N, 4)."""
    boxes = np.asarray(boxes)
    if boxes.dtype != np.float32:
        raise InvalidInput("boxes", f"expected FP32, got {boxes.dtype}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InvalidInput("boxes", f"expected shape [N, 4] (x0, y0, x1, y1), got {list(boxes.shape)}")
    n = boxes.shape[0]
    if n == 0:
        raise InvalidInput("boxes", "at least one box is required")
    if n > limits.max_boxes:
        raise InvalidInput("boxes", f"{n} boxes exceeds the limit of {limits.max_boxes} per request")
    bad = ~np.isfinite(boxes).all(axis=1)
    if bad.any():
        raise InvalidInput("boxes", f"box {int(np.argmax(bad))} has a NaN or infinite coordinate")
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        i = int(np.argmax(inverted))
        raise InvalidInput("boxes", f"box {i} {boxes[i].tolist()} has x1 < x0 or y1 < y0 (expected x0, y0, x1, y1)")
    outside = (
        (boxes[:, 2] < 0) | (boxes[:, 3] < 0) | (boxes[:, 0] > geometry.original_w) | (boxes[:, 1] > geometry.original_h)
    )
    if outside.any():
        i = int(np.argmax(outside))
        raise InvalidInput(
            "boxes",
            f"box {i} {boxes[i].tolist()} lies wholly outside the "
            f"{geometry.original_w}x{geometry.original_h} image",
        )
    return boxes


def transform_boxes(boxes: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Original-pixel boxes -> the prompt frame (ResizeLongestSide.apply_boxes)."""
    scale = np.array(
        [
            geometry.input_w / geometry.original_w,
            geometry.input_h / geometry.original_h,
            geometry.input_w / geometry.original_w,
            geometry.input_h / geometry.original_h,
        ],
        dtype=np.float64,
    )
    return (boxes.astype(np.float64) * scale).astype(np.float32)


@dataclass(frozen=True)
class PreprocessSettings:
    encoder_size: int
    prompt_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    limits: Limits

    @classmethod
    def for_variant(cls, variant, limits: Limits = Limits()) -> "PreprocessSettings":
        """From a `samtriton.variants.ModelVariant`."""
        return cls(variant.encoder_size, PROMPT_SIZE, tuple(variant.pixel_mean), tuple(variant.pixel_std), limits)

    def to_parameters(self) -> dict[str, str]:
        """The preprocess model's config.pbtxt parameters (`samtriton build` writes them)."""
        return {
            "encoder_size": str(self.encoder_size),
            "prompt_size": str(self.prompt_size),
            "pixel_mean": ",".join(repr(v) for v in self.pixel_mean),
            "pixel_std": ",".join(repr(v) for v in self.pixel_std),
            "max_image_bytes": str(self.limits.max_image_bytes),
            "max_pixels": str(self.limits.max_pixels),
            "max_boxes": str(self.limits.max_boxes),
        }

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "PreprocessSettings":
        """The inverse of `to_parameters`, in the python model's initialize()."""
        return cls(
            encoder_size=int(params["encoder_size"]),
            prompt_size=int(params["prompt_size"]),
            pixel_mean=tuple(float(v) for v in params["pixel_mean"].split(",")),
            pixel_std=tuple(float(v) for v in params["pixel_std"].split(",")),
            limits=Limits(int(params["max_image_bytes"]), int(params["max_pixels"]), int(params["max_boxes"])),
        )


@dataclass(frozen=True)
class Preprocessed:
    pixel_values: np.ndarray  # (3, S, S) float32
    model_boxes: np.ndarray  # (N, 4) float32, prompt frame
    geometry: Geometry


def preprocess(image_bytes: bytes, boxes, settings: PreprocessSettings) -> Preprocessed:
    """`boxes=None` prepares the image alone (the `sam_encode` ensemble)."""
    rgb = decode_image(image_bytes, settings.limits)
    h, w = rgb.shape[:2]
    new_h, new_w = resized_shape(h, w, settings.prompt_size)
    geometry = Geometry(h, w, new_h, new_w)
    if boxes is None:
        model_boxes = np.zeros((0, 4), dtype=np.float32)
    else:
        model_boxes = transform_boxes(validate_boxes(boxes, geometry, settings.limits), geometry)
    resized = resize_longest_side(rgb, settings.encoder_size)
    return Preprocessed(
        pixel_values=normalise_and_pad(resized, settings.encoder_size, settings.pixel_mean, settings.pixel_std),
        model_boxes=model_boxes,
        geometry=geometry,
    )
