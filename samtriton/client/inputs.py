"""Turn the image and prompt arguments users pass into what goes on the wire."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Prompt:
    """One object to segment: a box, points (with labels), or both, optionally
    refined by a previous answer's low-res logits (256 x 256).

    >>> Prompt(points=[[120, 80], [300, 90]], labels=[1, 0])
    >>> Prompt(box=[10, 20, 200, 240], points=[[50, 60]], mask_input=previous.low_res_logits[0, 0])

    Labels: 1 foreground (the default), 0 background.
    """

    box: object = None
    points: object = None
    labels: object = None
    mask_input: object = None


@dataclass(frozen=True)
class WirePrompts:
    """A request's prompt tensors, as the `sam` ensemble takes them (None: not sent)."""

    boxes: np.ndarray | None = None  # (N, 4) float32
    points: np.ndarray | None = None  # (N, P, 2) float32
    point_labels: np.ndarray | None = None  # (N, P) int32, -1 pads
    mask_inputs: np.ndarray | None = None  # (N, 256, 256) float32

    def __len__(self) -> int:
        return int((self.boxes if self.boxes is not None else self.point_labels).shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in vars(self).items() if v is not None}


def _per_prompt_points(points) -> list[np.ndarray]:
    """Points of each prompt: (N, P, 2), (P, 2) for one prompt, (2,) for one
    click, or a list of per-prompt lists of any lengths."""
    try:
        array = np.asarray(points, dtype=np.float32)
    except (TypeError, ValueError):
        array = None  # ragged: one entry per prompt
    if array is not None and array.ndim in (1, 2, 3):
        if array.ndim == 1:
            array = array[np.newaxis, np.newaxis]
        elif array.ndim == 2:
            array = array[np.newaxis]
        if array.shape[-1] != 2:
            raise InvalidInputError(f"points: expected x, y pairs, got shape {list(array.shape)}", "points")
        return list(array)
    out = []
    for i, prompt in enumerate(points):
        try:
            p = np.asarray(prompt, dtype=np.float32).reshape(-1, 2)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"points: prompt {i} is not a list of x, y pairs ({e})", "points") from e
        out.append(p)
    return out


def _per_prompt_labels(labels, points: list[np.ndarray]) -> list[np.ndarray]:
    """Labels as (N, P), (P,) for one prompt, (N,) for N one-point prompts, or per-prompt lists."""
    if labels is None:
        return [np.ones(len(p), np.int32) for p in points]
    try:
        array = np.asarray(labels, dtype=np.int32)
    except (TypeError, ValueError):  # ragged: one list per prompt
        rows = [np.asarray(r, dtype=np.int32).reshape(-1) for r in labels]
    else:
        if array.ndim == 2:
            rows = list(array)
        elif array.ndim <= 1 and len(points) == 1:
            rows = [array.reshape(-1)]
        elif array.ndim == 1 and all(len(p) == 1 for p in points):
            rows = list(array.reshape(-1, 1))
        else:
            rows = []
    if len(rows) != len(points) or any(len(r) != len(p) for r, p in zip(rows, points)):
        raise InvalidInputError("point_labels: expected one label per point, prompt by prompt", "point_labels")
    return rows


def as_points(points, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Points (see `_per_prompt_points`) and labels (1 foreground, 0 background;
    all 1 if None) -> (N, P, 2) float32 and (N, P) int32, prompts with fewer
    points padded with label -1."""
    per_prompt = _per_prompt_points(points)
    per_labels = _per_prompt_labels(labels, per_prompt)
    n, p = len(per_prompt), max((len(x) for x in per_prompt), default=0)
    if n == 0 or p == 0:
        raise InvalidInputError("points: expected at least one point", "points")
    out_points = np.zeros((n, p, 2), np.float32)
    out_labels = np.full((n, p), -1, np.int32)
    for i, (xy, lab) in enumerate(zip(per_prompt, per_labels)):
        out_points[i, : len(xy)] = xy
        out_labels[i, : len(lab)] = lab
    return out_points, out_labels


def as_mask_inputs(mask_input, prompts: int) -> np.ndarray:
    """(N, 256, 256), (N, 1, 256, 256) as upstream passes them, or (256, 256) for one prompt."""
    try:
        array = np.asarray(mask_input, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"mask_inputs: cannot be read as numbers ({e})", "mask_inputs") from e
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.shape != (prompts, 256, 256):
        raise InvalidInputError(f"mask_inputs: expected ({prompts}, 256, 256) low-res logits (one per prompt), "
                                f"got {list(array.shape)}", "mask_inputs")
    return np.ascontiguousarray(array)


def wire_prompts(boxes=None, points=None, point_labels=None, mask_input=None) -> WirePrompts:
    """The prompt arguments of `segment` / `decode` -> what goes on the wire."""
    if points is None and point_labels is not None:
        raise InvalidInputError("points: point_labels were given without points", "points")
    if boxes is None and points is None:
        raise InvalidInputError("boxes: give boxes, points, or both", "boxes")
    box_array = None if boxes is None else as_boxes(boxes)
    point_array = label_array = None
    if points is not None:
        point_array, label_array = as_points(points, point_labels)
    if box_array is not None and point_array is not None and box_array.shape[0] != point_array.shape[0]:
        raise InvalidInputError(f"points: {point_array.shape[0]} prompts of points for {box_array.shape[0]} boxes "
                                "(one row of points per box)", "points")
    n = box_array.shape[0] if box_array is not None else point_array.shape[0]
    masks = None if mask_input is None else as_mask_inputs(mask_input, n)
    return WirePrompts(box_array, point_array, label_array, masks)


def group_prompts(prompts) -> list[tuple[list[int], WirePrompts]]:
    """`Prompt`s of any kinds -> one request per kind (box or not, mask input or
    not), each with the positions of its prompts: a `sam` request's prompts
    share their kinds, as in the upstream predictor's batched call."""
    groups: dict[tuple[bool, bool, bool], list[int]] = {}
    prompts = list(prompts)
    if not prompts:
        raise InvalidInputError("prompts: expected at least one Prompt", "prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, Prompt):
            raise InvalidInputError(f"prompts: item {i} is a {type(p).__name__}, expected a Prompt", "prompts")
        if p.box is None and p.points is None:
            raise InvalidInputError(f"prompts: prompt {i} has neither a box nor points", "prompts")
        groups.setdefault((p.box is not None, p.points is not None, p.mask_input is not None), []).append(i)
    out = []
    for (has_box, has_points, has_mask), members in groups.items():
        chosen = [prompts[i] for i in members]
        points = [np.asarray(p.points, np.float32).reshape(-1, 2) for p in chosen] if has_points else None
        labels = None
        if has_points:  # per prompt: its own labels, or all foreground
            labels = [np.ones(len(xy), np.int32) if p.labels is None else np.asarray(p.labels, np.int32).reshape(-1)
                      for p, xy in zip(chosen, points)]
        out.append((members, wire_prompts(
            boxes=[p.box for p in chosen] if has_box else None, points=points, point_labels=labels,
            mask_input=[p.mask_input for p in chosen] if has_mask else None)))
    return out
