"""A request's prompts (boxes, points, previous masks) -> the decoder's sparse tokens.

Every check names the request field it is about (INVALID_ARG for that
request only).  The tokens follow the upstream prompt encoder
(`PromptEncoder.forward`): a prompt's points first, in their order; then the
two box corners (labels 2, 3) when the prompt has a box, or SAM's one padding
point (label -1, the not-a-point embedding) when it has none.  Points a client
labels -1 are padding of the request's [N, P] array and are dropped, so a
prompt answers as if sent alone with only its own points.  Prompts of one
request are padded to the same token count with filler (`LABEL_ABSENT`),
which the decoder graph keeps out of every attention.

Coordinates go to the prompt frame (longest side `PROMPT_SIZE`) as
`ResizeLongestSide.apply_coords` scales them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from samtriton import spec
from samtriton.serving.errors import InvalidInput

_PADDING = -1  # a wire label: not a point of this prompt


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    # Prompts per request (boxes or point sets), and points per prompt.
    max_boxes: int = 256
    max_points: int = 32


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


@dataclass(frozen=True)
class PromptInputs:
    """The prompt tensors of one request, as received (None: not sent)."""

    boxes: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    mask_inputs: np.ndarray | None = None


@dataclass(frozen=True)
class Prompts:
    """One request's prompts as the decoder takes them (prompt frame)."""

    coords: np.ndarray  # (N, T, 2) float32
    labels: np.ndarray  # (N, T) int32, spec.TOKEN_LABELS
    mask_inputs: np.ndarray  # (M, 256, 256) float32: M = N, or a zero placeholder (M = 1)
    has_mask_input: np.ndarray  # (N,) float32, 1.0 or 0.0


def _dtype_check(array: np.ndarray, field: str, dtype, wire: str) -> None:
    if array.dtype != dtype:
        raise InvalidInput(field, f"expected {wire}, got {array.dtype}")


def _check_prompt_count(n: int, field: str, one: str, many: str, limits: Limits) -> None:
    if n == 0:
        raise InvalidInput(field, f"at least one {one} is required")
    if n > limits.max_boxes:
        raise InvalidInput(field, f"{n} {many} exceeds the limit of {limits.max_boxes} per request")


def validate_boxes(boxes, geometry: Geometry, limits: Limits = Limits()) -> np.ndarray:
    """Check xyxy boxes in original pixels; returns them as float32 (N, 4)."""
    boxes = np.asarray(boxes)
    _dtype_check(boxes, "boxes", np.float32, "FP32")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InvalidInput("boxes", f"expected shape [N, 4] (x0, y0, x1, y1), got {list(boxes.shape)}")
    _check_prompt_count(boxes.shape[0], "boxes", "box", "boxes", limits)
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


def validate_points(points, labels, geometry: Geometry, limits: Limits = Limits()) -> tuple[np.ndarray, np.ndarray]:
    """Check [N, P, 2] xy points and their [N, P] labels; returns (points, labels)."""
    if points is None:
        raise InvalidInput("points", "missing: point_labels were sent without points")
    if labels is None:
        raise InvalidInput("point_labels", "missing: points were sent without point_labels (1 foreground, "
                           "0 background, -1 padding)")
    points, labels = np.asarray(points), np.asarray(labels)
    _dtype_check(points, "points", np.float32, "FP32")
    _dtype_check(labels, "point_labels", np.int32, "INT32")
    if points.ndim != 3 or points.shape[2] != 2:
        raise InvalidInput("points", f"expected shape [N, P, 2] (x, y per point), got {list(points.shape)}")
    n, p = points.shape[:2]
    if labels.shape != (n, p):
        raise InvalidInput("point_labels", f"expected shape [N, P] = {[n, p]} to match points, got {list(labels.shape)}")
    _check_prompt_count(n, "points", "prompt", "prompts", limits)
    if p == 0:
        raise InvalidInput("points", "expected at least one point per prompt (P >= 1)")
    if p > limits.max_points:
        raise InvalidInput("points", f"{p} points per prompt exceeds the limit of {limits.max_points}")
    bad = ~np.isfinite(points).all(axis=2)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise InvalidInput("points", f"prompt {i} point {j} has a NaN or infinite coordinate")
    unknown = ~np.isin(labels, list(spec.WIRE_POINT_LABELS))
    if unknown.any():
        i, j = np.argwhere(unknown)[0]
        raise InvalidInput("point_labels", f"prompt {i} point {j} has label {int(labels[i, j])}; expected 1 "
                           "(foreground), 0 (background) or -1 (padding)")
    x, y = points[..., 0], points[..., 1]
    outside = (labels != _PADDING) & ((x < 0) | (y < 0) | (x > geometry.original_w) | (y > geometry.original_h))
    if outside.any():
        i, j = np.argwhere(outside)[0]
        raise InvalidInput("points", f"prompt {i} point {j} {points[i, j].tolist()} lies outside the "
                           f"{geometry.original_w}x{geometry.original_h} image (points are x, y in its pixels)")
    return points, labels


def validate_mask_inputs(masks, prompts: int) -> np.ndarray:
    masks = np.asarray(masks)
    _dtype_check(masks, "mask_inputs", np.float32, "FP32")
    size = spec.LOW_RES_MASK_SIZE
    if masks.shape != (prompts, size, size):
        raise InvalidInput("mask_inputs", f"expected shape [N, {size}, {size}] = {[prompts, size, size]} (one "
                           f"low_res_logits mask per prompt), got {list(masks.shape)}")
    if not np.isfinite(masks).all():
        raise InvalidInput("mask_inputs", "has a NaN or infinite value")
    return masks


def transform_coords(coords: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Original-pixel (..., 2) xy -> the prompt frame (ResizeLongestSide.apply_coords)."""
    scale = np.array([geometry.input_w / geometry.original_w, geometry.input_h / geometry.original_h])
    return (coords.astype(np.float64) * scale).astype(np.float32)


def transform_boxes(boxes: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Original-pixel boxes -> the prompt frame (ResizeLongestSide.apply_boxes)."""
    return transform_coords(boxes.reshape(-1, 2, 2), geometry).reshape(-1, 4)


def build_prompts(inputs: PromptInputs, geometry: Geometry, limits: Limits = Limits(),
                  pad_tokens: int = 0) -> Prompts:
    """Validate a request's prompt inputs and lay out its decoder tokens.

    `pad_tokens` > 0 pads every prompt to exactly that many tokens (the GPU
    target's engines need one token count for all requests); 0 pads to the
    request's longest prompt.
    """
    if inputs.boxes is None and inputs.points is None and inputs.point_labels is None:
        raise InvalidInput("boxes", "missing: a request needs boxes, points (with point_labels), or both")
    boxes = None if inputs.boxes is None else validate_boxes(inputs.boxes, geometry, limits)
    points = labels = None
    if inputs.points is not None or inputs.point_labels is not None:
        points, labels = validate_points(inputs.points, inputs.point_labels, geometry, limits)
    n = boxes.shape[0] if boxes is not None else points.shape[0]
    if boxes is not None and points is not None and points.shape[0] != n:
        raise InvalidInput("points", f"has {points.shape[0]} prompts but boxes has {n}: one row of points per box")
    masks = None if inputs.mask_inputs is None else validate_mask_inputs(inputs.mask_inputs, n)

    # Per prompt: its own points (padding dropped), then box corners or SAM's padding point.
    real = labels != _PADDING if labels is not None else np.zeros((n, 0), bool)
    counts = real.sum(axis=1)
    if boxes is None and (counts == 0).any():
        i = int(np.argmax(counts == 0))
        raise InvalidInput("point_labels", f"prompt {i} has no point (every label is -1, padding) and there is "
                           "no box: nothing to segment")
    tail = 2 if boxes is not None else 1
    needed = int(counts.max(initial=0)) + tail
    tokens = max(needed, pad_tokens)
    if pad_tokens and needed > pad_tokens:  # only if max_points and pad_tokens disagree
        raise InvalidInput("points", f"needs {needed} tokens per prompt; this model takes at most {pad_tokens}")
    coords = np.zeros((n, tokens, 2), np.float32)
    token_labels = np.full((n, tokens), spec.LABEL_ABSENT, np.int32)
    if points is not None:
        # Each prompt's own points first, in their order (a stable sort of "is padding").
        order = np.argsort(~real, axis=1, kind="stable")[:, :tokens]
        k = order.shape[1]
        coords[:, :k] = np.take_along_axis(transform_coords(points, geometry), order[..., None], axis=1)
        token_labels[:, :k] = np.take_along_axis(labels, order, axis=1)
        beyond = np.arange(tokens)[None, :] >= counts[:, None]
        coords[beyond] = 0.0
        token_labels[beyond] = spec.LABEL_ABSENT
    rows = np.arange(n)
    if boxes is not None:
        corners = transform_boxes(boxes, geometry).reshape(n, 2, 2)
        coords[rows, counts] = corners[:, 0]
        coords[rows, counts + 1] = corners[:, 1]
        token_labels[rows, counts] = spec.LABEL_BOX_TOP_LEFT
        token_labels[rows, counts + 1] = spec.LABEL_BOX_BOTTOM_RIGHT
    else:
        token_labels[rows, counts] = spec.LABEL_NOT_A_POINT  # coordinates (0, 0), as upstream pads
    size = spec.LOW_RES_MASK_SIZE
    if masks is None:
        return Prompts(coords, token_labels, np.zeros((1, size, size), np.float32), np.zeros(n, np.float32))
    return Prompts(coords, token_labels, masks, np.ones(n, np.float32))
