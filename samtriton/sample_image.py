"""A synthetic photo-like scene for the demo and tests (no image files to download)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def sample_scene(width: int = 800, height: int = 533, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """An RGB image with a few distinct objects, and one box around each object (xyxy)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    sky = np.stack([120 + 80 * y, 170 + 50 * y, 235 - 40 * y], axis=-1) * np.ones((1, width, 1), np.float32)
    pixels = sky + rng.normal(0, 4, size=sky.shape)
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    w, h = width, height
    ground = int(h * 0.68)
    draw.rectangle([0, ground, w, h], fill=(86, 140, 62))
    objects = [
        ("sun", [0.78 * w, 0.08 * h, 0.92 * w, 0.08 * h + 0.14 * w], "ellipse", (250, 215, 60)),
        ("house", [0.12 * w, 0.40 * h, 0.38 * w, ground], "rectangle", (180, 90, 60)),
        ("door", [0.22 * w, 0.52 * h, 0.28 * w, ground], "rectangle", (90, 50, 30)),
        ("tree", [0.55 * w, 0.30 * h, 0.70 * w, 0.60 * h], "ellipse", (40, 110, 45)),
        ("trunk", [0.605 * w, 0.58 * h, 0.645 * w, ground + 6], "rectangle", (100, 70, 40)),
        ("ball", [0.78 * w, 0.74 * h, 0.86 * w, 0.74 * h + 0.08 * w], "ellipse", (220, 40, 40)),
    ]
    boxes = []
    for _name, box, shape, color in objects:
        getattr(draw, shape)(box, fill=color)
        boxes.append(box)
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    return img, np.array(boxes, dtype=np.float32)
