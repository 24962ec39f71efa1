"""Image decoding and resizing as the upstream SAM predictor does them, and a request's whole preprocess.

Upstream (`ResizeLongestSide.apply_image` + `Sam.preprocess`): resize the RGB
uint8 image with PIL bilinear so its longest side is the encoder size
(rounding each side with int(x + 0.5)), normalise with the pixel mean/std,
then zero-pad bottom/right to a square.  Prompts are scaled by the same
per-axis factors (`samtriton.serving.prompts`).  Padding happens after
normalisation, so the pad is 0 in normalised space; doing both here keeps
the encoder graph a plain network.

The encoder's input size and the prompt frame differ for EfficientViT-SAM
L0-L2 (512 vs 1024): the image is resized for the encoder, while the prompts
and the geometry the postprocess uses are in the 1024 frame, as its
predictor computes `input_size` with the 1024 long side.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from samtriton.serving.errors import InvalidInput
from samtriton.serving.prompts import Geometry, Limits, PromptInputs, Prompts, build_prompts
from samtriton.spec import PROMPT_SIZE

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
# Pillow's modes for 16-bit grayscale (PNG opens as I;16, some builds as I).
_WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def resized_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


# EXIF orientations that turn the stored image by 90 degrees (exif_transpose swaps width and height).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def _open_checked(data: bytes, limits: Limits) -> Image.Image:
    """The image opened from its header only, every check that needs no pixels done."""
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
    return img


def image_size(data: bytes, limits: Limits = Limits()) -> tuple[int, int]:
    """(height, width) of the image as `decode_image` returns it (EXIF orientation
    applied), from the header alone: what the prompts need, without decoding pixels."""
    img = _open_checked(data, limits)
    w, h = img.size
    if img.format == "PNG" and "exif" not in img.info and not any(
            marker in data for marker in (b"eXIf", b"tiff:Orientation", b"Raw profile type exif")):
        # No orientation anywhere in the file (EXIF chunk, XMP, ImageMagick's
        # text profile); Pillow's PNG getexif() would decode the pixels to look
        # for an eXIf chunk after the image data.
        return h, w
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        raise InvalidInput("image", "its EXIF data cannot be read") from None
    return (w, h) if orientation in _TRANSPOSING_ORIENTATIONS else (h, w)


def decode_image(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """Encoded JPEG/PNG/WebP bytes -> HxWx3 uint8 RGB, EXIF orientation applied."""
    img = _open_checked(data, limits)
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


@dataclass(frozen=True)
class PreprocessSettings:
    encoder_size: int
    prompt_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    limits: Limits
    # > 0: every prompt padded to this many decoder tokens (GPU target).
    pad_prompt_tokens: int = 0

    @classmethod
    def for_variant(cls, variant, limits: Limits = Limits(), pad_prompt_tokens: int = 0) -> "PreprocessSettings":
        """From a `samtriton.variants.ModelVariant`."""
        return cls(variant.encoder_size, PROMPT_SIZE, tuple(variant.pixel_mean), tuple(variant.pixel_std), limits,
                   pad_prompt_tokens)

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
            "max_points": str(self.limits.max_points),
            "pad_prompt_tokens": str(self.pad_prompt_tokens),
        }

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "PreprocessSettings":
        """The inverse of `to_parameters`, in the python model's initialize()."""
        return cls(
            encoder_size=int(params["encoder_size"]),
            prompt_size=int(params["prompt_size"]),
            pixel_mean=tuple(float(v) for v in params["pixel_mean"].split(",")),
            pixel_std=tuple(float(v) for v in params["pixel_std"].split(",")),
            limits=Limits(int(params["max_image_bytes"]), int(params["max_pixels"]), int(params["max_boxes"]),
                          int(params["max_points"])),
            pad_prompt_tokens=int(params["pad_prompt_tokens"]),
        )


@dataclass(frozen=True)
class Preprocessed:
    pixel_values: np.ndarray  # (3, S, S) float32
    geometry: Geometry
    prompts: Prompts | None  # None: the image alone (`sam_encode`)


def preprocess(image_bytes: bytes, prompts: PromptInputs | None, settings: PreprocessSettings) -> Preprocessed:
    """`prompts=None` prepares the image alone (the `sam_encode` ensemble)."""
    rgb = decode_image(image_bytes, settings.limits)
    geometry = image_geometry(*rgb.shape[:2], settings)
    # Prompts are checked before the image is resized: a bad request fails fast.
    tokens = None if prompts is None else build_prompts(prompts, geometry, settings.limits,
                                                          settings.pad_prompt_tokens)
    return Preprocessed(pixel_values=encoder_input(rgb, settings), geometry=geometry, prompts=tokens)


def image_geometry(h: int, w: int, settings: PreprocessSettings) -> Geometry:
    return Geometry(h, w, *resized_shape(h, w, settings.prompt_size))


def encoder_input(rgb: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """HxWx3 uint8 -> the encoder's (3, S, S) float32 input."""
    resized = resize_longest_side(rgb, settings.encoder_size)
    return normalise_and_pad(resized, settings.encoder_size, settings.pixel_mean, settings.pixel_std)


def prepare_prompts(image_bytes: bytes, prompts: PromptInputs | None,
                    settings: PreprocessSettings) -> tuple[Geometry, Prompts | None]:
    """The served preprocess: the image's geometry from its header and the
    prompts' decoder tokens; the pixels are decoded only on an embedding-cache
    miss (`image_embedding`)."""
    geometry = image_geometry(*image_size(image_bytes, settings.limits), settings)
    tokens = None if prompts is None else build_prompts(prompts, geometry, settings.limits,
                                                          settings.pad_prompt_tokens)
    return geometry, tokens


def settings_fingerprint(settings: PreprocessSettings) -> str:
    """What, besides the image bytes and the model, decides an embedding."""
    return f"{settings.encoder_size}|{settings.pixel_mean}|{settings.pixel_std}"
