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


def draw_overlay(image, masks: np.ndarray, boxes: np.ndarray | None = None, alpha: float = 0.5,
                 points: np.ndarray | None = None, point_labels: np.ndarray | None = None) -> Image.Image:
    """Masks (N, H, W) tinted over the image, each prompt's box outlined and its
    clicks dotted (foreground filled, background hollow), in the mask's colour."""
    base = np.asarray(load_rgb(image), dtype=np.float32)
    if masks.shape[0] and masks.shape[1:] != base.shape[:2]:
        raise ValueError(f"masks are {masks.shape[1:]}, image is {base.shape[:2]}")
    out = base.copy()
    for i, mask in enumerate(masks):
        color = PALETTE[i % len(PALETTE)]
        out[mask] = (1 - alpha) * out[mask] + alpha * color
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    width = max(2, pil.width // 400)
    for i, box in enumerate(np.asarray(boxes) if boxes is not None else []):
        if np.isfinite(box).all():
            draw.rectangle([float(v) for v in box], outline=_color(i), width=width)
    if points is not None:
        radius = 3 * width
        for i, (prompt, labels) in enumerate(zip(np.asarray(points), np.asarray(point_labels))):
            for (x, y), label in zip(prompt, labels):
                if label < 0:
                    continue  # padding
                shape = [x - radius, y - radius, x + radius, y + radius]
                draw.ellipse(shape, fill=_color(i) if label == 1 else None, outline=(255, 255, 255), width=width)
    return pil


def _color(i: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in PALETTE[i % len(PALETTE)])
