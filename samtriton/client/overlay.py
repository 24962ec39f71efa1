"""Draw masks and boxes over the image, for humans to look at."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageOps

PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    ],
    dtype=np.float32,
)


def load_rgb(image) -> Image.Image:
    """The image as the server sees it: EXIF orientation applied, RGB."""
    if isinstance(image, np.ndarray):
        return Image.fromarray(image, mode="RGB")
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, (bytes, bytearray)):
        pil = Image.open(io.BytesIO(image))
    else:
        pil = Image.open(image)
    return ImageOps.exif_transpose(pil).convert("RGB")


def draw_overlay(image, masks: np.ndarray, boxes: np.ndarray, alpha: float = 0.5) -> Image.Image:
    base = np.asarray(load_rgb(image), dtype=np.float32)
    if masks.shape[1:] != base.shape[:2]:
        raise ValueError(f"masks are {masks.shape[1:]}, image is {base.shape[:2]}")
    out = base.copy()
    for i, mask in enumerate(masks):
        color = PALETTE[i % len(PALETTE)]
        out[mask] = (1 - alpha) * out[mask] + alpha * color
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for i, box in enumerate(np.asarray(boxes)):
        color = tuple(int(c) for c in PALETTE[i % len(PALETTE)])
        draw.rectangle([float(v) for v in box], outline=color, width=max(2, pil.width // 400))
    return pil
