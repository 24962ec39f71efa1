"""Turn the image and box arguments users pass into what goes on the wire."""

from __future__ import annotations

import io
import os

import numpy as np

from samtriton.client.errors import InvalidInputError


def encode_image(image) -> bytes:
    """A path, encoded bytes, a PIL image or an HxWx3 uint8 array -> encoded bytes.

    Files and bytes are sent as they are (the server decodes them); pixels are
    encoded as PNG, which is lossless, so the server sees exactly these pixels.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidInputError(
                f"image: expected an HxWx3 uint8 array, got {image.dtype} {list(image.shape)}", "image"
            )
        pil = Image.fromarray(image, mode="RGB")
    else:
        raise InvalidInputError(
            f"image: expected a path, bytes, a PIL image or an HxWx3 uint8 array, got {type(image).__name__}",
            "image",
        )
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def as_boxes(boxes) -> np.ndarray:
    """(N, 4) xyxy in original pixels, as float32; shape errors are caught before sending."""
    try:
        array = np.asarray(boxes, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"boxes: cannot be read as numbers ({e})", "boxes") from e
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[np.newaxis]
    if array.ndim != 2 or array.shape[1] != 4:
        raise InvalidInputError(f"boxes: expected shape (N, 4) as x0, y0, x1, y1, got {list(array.shape)}", "boxes")
    return np.ascontiguousarray(array)
