"""Segment everything: the upstream automatic mask generator's algorithm in numpy.

The reference is `SamAutomaticMaskGenerator` (segment-anything; MobileSAM and
EfficientViT-SAM ship the same code): a grid of single-point prompts per crop
of the image, decoded with multimask output, then per batch of points
  1. keep candidates whose predicted IoU > pred_iou_thresh,
  2. the stability score (IoU of the logits thresholded at +-offset) >= stability_score_thresh,
  3. binarise, take each mask's box, drop masks whose box touches a crop edge that is not an image edge,
per crop a box NMS on the predicted IoU, across crops a box NMS preferring
smaller crops, and optionally small holes and islands removed with one more
NMS.  Every step keeps upstream's arithmetic and order (torchvision's NMS
sorts stably by descending score; the masks are flattened prompt-major), so
the served masks come back in the order upstream returns them.

Nothing here imports torch: this runs in the served `sam_everything` model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from itertools import product

import numpy as np

from samtriton.serving.errors import InvalidInput

MASK_THRESHOLD = 0.0
# A mask whose box lies within this many pixels of a crop edge (that is not an
# image edge) is a piece of an object cut by the crop.
CROP_EDGE_TOLERANCE = 20.0


@dataclass(frozen=True)
class GeneratorParameters:
    """The upstream generator's knobs, with its names and defaults (request parameters)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_request(cls, parameters: dict, limits: "EverythingLimits") -> "GeneratorParameters":
        """The generator's parameters among a request's parameters (the others are not its concern)."""
        values = {}
        for f in fields(cls):
            if f.name in parameters:
                kind = int if f.type in (int, "int") else float
                values[f.name] = _number(parameter_field(f.name), parameters[f.name], kind)
        params = cls(**values)
        params.check(limits)
        return params

    def check(self, limits: "EverythingLimits") -> None:
        _in_range("points_per_side", self.points_per_side, 1, limits.max_points_per_side)
        _in_range("points_per_batch", self.points_per_batch, 1, limits.max_points_per_batch)
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            _in_range(name, getattr(self, name), 0.0, 1.0)
        _in_range("stability_score_offset", self.stability_score_offset, 0.0, 1e6)
        _in_range("crop_n_layers", self.crop_n_layers, 0, limits.max_crop_n_layers)
        _in_range("crop_overlap_ratio", self.crop_overlap_ratio, 0.0, 0.99)
        _in_range("crop_n_points_downscale_factor", self.crop_n_points_downscale_factor, 1, 16)
        _in_range("min_mask_region_area", self.min_mask_region_area, 0, 1 << 30)
        for layer in range(self.crop_n_layers + 1):
            if int(self.points_per_side / (self.crop_n_points_downscale_factor ** layer)) < 1:
                raise InvalidInput(parameter_field("crop_n_points_downscale_factor"),
                                   f"leaves crop layer {layer} without points (points_per_side "
                                   f"{self.points_per_side} / {self.crop_n_points_downscale_factor}^{layer} < 1)")


@dataclass(frozen=True)
class EverythingLimits:
    """Bounds on one request's work (a grid of 128 x 128 points on 2 layers of crops is hours on a CPU)."""

    max_points_per_side: int = 64
    max_points_per_batch: int = 1024
    max_crop_n_layers: int = 2


def _number(name: str, raw, kind):
    """A request parameter (int64, double or string on the wire) as an int or a finite float."""
    if isinstance(raw, bool):
        raise InvalidInput(name, f"expected a number, got the bool {raw}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InvalidInput(name, f"expected a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise InvalidInput(name, f"expected a finite number, got {raw!r}")
    if kind is int:
        if value != int(value):
            raise InvalidInput(name, f"expected an integer, got {raw!r}")
        return int(value)
    return value


def parameter_field(name: str) -> str:
    """How errors name a request parameter (as the `sam` ensemble's `parameters.multimask_output`)."""
    return f"parameters.{name}"


def _in_range(name: str, value, low, high) -> None:
    if not low <= value <= high:
        raise InvalidInput(parameter_field(name), f"{value} is outside [{low}, {high}]")


# --- prompts: point grids and crops ------------------------------------------

def point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) xy in [0, 1]: cell centres, rows of constant y."""
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def layer_point_grids(params: GeneratorParameters) -> list[np.ndarray]:
    return [point_grid(int(params.points_per_side / (params.crop_n_points_downscale_factor ** layer)))
            for layer in range(params.crop_n_layers + 1)]


def crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float) -> list[tuple[list[int], int]]:
    """[(xyxy crop box, layer)]: the whole image, then 2^k x 2^k overlapping crops per layer k."""
    crops = [([0, 0, width, height], 0)]
    short_side = min(height, width)

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for layer in range(n_layers):
        per_side = 2 ** (layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_w, crop_h = crop_len(width, per_side, overlap), crop_len(height, per_side, overlap)
        xs = [int((crop_w - overlap) * i) for i in range(per_side)]
        ys = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in product(xs, ys):  # x outer, as upstream
            crops.append(([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)], layer + 1))
    return crops


def batches(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


# --- filtering ---------------------------------------------------------------

def stability_scores(logits: np.ndarray, offset: float) -> np.ndarray:
    """(K, H, W) logits -> (K,) float32: |logits > +offset| / |logits > -offset|."""
    high = (logits > MASK_THRESHOLD + offset).sum(axis=(1, 2), dtype=np.int64)
    low = (logits > MASK_THRESHOLD - offset).sum(axis=(1, 2), dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 is NaN, as upstream's (filtered out by >=)
        return (high.astype(np.float32) / low.astype(np.float32)).astype(np.float32)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) bool -> (K, 4) int64 xyxy of the inclusive pixel extent; [0, 0, 0, 0] for an empty mask."""
    boxes = np.zeros((masks.shape[0], 4), dtype=np.int64)
    if masks.shape[0] == 0:
        return boxes
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    present = rows.any(axis=1)
    h, w = masks.shape[1:]
    boxes[:, 0] = np.argmax(cols, axis=1)
    boxes[:, 1] = np.argmax(rows, axis=1)
    boxes[:, 2] = w - 1 - np.argmax(cols[:, ::-1], axis=1)
    boxes[:, 3] = h - 1 - np.argmax(rows[:, ::-1], axis=1)
    boxes[~present] = 0
    return boxes


def near_crop_edge(boxes: np.ndarray, crop_box: list[int], image_box: list[int]) -> np.ndarray:
    """(K, 4) boxes in crop coordinates -> (K,) True where a side lies on a crop edge that is not an image edge."""
    x0, y0 = crop_box[0], crop_box[1]
    full = (boxes + np.array([x0, y0, x0, y0])).astype(np.float32)
    near_crop = np.abs(full - np.asarray(crop_box, np.float32)) <= CROP_EDGE_TOLERANCE
    near_image = np.abs(full - np.asarray(image_box, np.float32)) <= CROP_EDGE_TOLERANCE
    return (near_crop & ~near_image).any(axis=1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """torchvision.ops.nms on the CPU: indices kept, by stably descending score.

    Float32 arithmetic, and `iou > threshold` compared in double precision, as its kernel.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for rank, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[rank + 1:]
        rest = rest[~suppressed[rest]]
        if rest.size == 0:
            continue
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[iou.astype(np.float64) > iou_threshold]] = True
    return np.asarray(keep, dtype=np.int64)


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a bool mask: (labels, sizes), label 0 the background."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.reshape(-1), minlength=count + 1)
    return labels, sizes


def remove_small_regions(mask: np.ndarray, area: int, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes ("holes") or drop islands ("islands") smaller than `area` pixels; (mask, changed)."""
    fill_holes = mode == "holes"
    work = (~mask) if fill_holes else mask
    labels, sizes = _components(work)
    small = [i for i in range(1, len(sizes)) if sizes[i] < area]
    if not small:
        return mask, False
    keep = [0] + small
    if not fill_holes:
        keep = [i for i in range(len(sizes)) if i not in keep]
        if not keep:  # every island is small: keep the largest
            keep = [int(np.argmax(sizes[1:])) + 1]
    return np.isin(labels, keep), True


# --- the accumulated result --------------------------------------------------

@dataclass
class Masks:
    """Kept masks so far: RLE per mask plus its figures (boxes xyxy in image pixels)."""

    rles: list  # bytes, COCO RLE JSON at the image size
    areas: np.ndarray  # (M,) int64 pixels
    scores: np.ndarray  # (M,) float32 predicted IoU
    stability: np.ndarray  # (M,) float32
    boxes: np.ndarray  # (M, 4) int64 xyxy
    points: np.ndarray  # (M, 2) float64 xy; NaN for box prompts
    prompt_boxes: np.ndarray  # (M, 4) float32 xyxy; NaN for point prompts
    crop_boxes: np.ndarray  # (M, 4) int64 xyxy

    @classmethod
    def empty(cls) -> "Masks":
        return cls([], np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32),
                   np.zeros((0, 4), np.int64), np.zeros((0, 2)), np.zeros((0, 4), np.float32),
                   np.zeros((0, 4), np.int64))

    def __len__(self) -> int:
        return len(self.rles)

    def take(self, index: np.ndarray) -> "Masks":
        index = np.asarray(index, dtype=np.int64)
        return Masks([self.rles[i] for i in index], *(getattr(self, f)[index] for f in _MASK_ARRAYS))

    @classmethod
    def concat(cls, parts: list["Masks"]) -> "Masks":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls([r for p in parts for r in p.rles],
                   *(np.concatenate([getattr(p, f) for p in parts]) for f in _MASK_ARRAYS))


def filter_candidates(low_res: np.ndarray, iou: np.ndarray, points: np.ndarray, prompt_boxes: np.ndarray,
                      crop_box: list[int], image_hw: tuple[int, int], crop_geometry, params: GeneratorParameters,
                      upscale, encode) -> Masks:
    """One decoder answer, (N, K, 256, 256) logits and (N, K) predicted IoUs for N prompts of a crop -> the
    masks that pass upstream's per-batch filters, boxes in crop pixels (`finish_crop` moves them).

    `points` (N, 2) / `prompt_boxes` (N, 4) are each prompt's source in crop pixels (NaN where none);
    `upscale(low_res, geometry)` yields logits at the crop's size, `encode(masks)` COCO RLEs.
    """
    k = iou.shape[1]
    low_res = low_res.reshape(-1, *low_res.shape[-2:])
    scores = iou.reshape(-1).astype(np.float32)
    points = np.repeat(points, k, axis=0)
    prompt_boxes = np.repeat(prompt_boxes, k, axis=0)
    keep = np.arange(scores.shape[0])
    if params.pred_iou_thresh > 0.0:
        keep = keep[scores > np.float32(params.pred_iou_thresh)]
    image_h, image_w = image_hw
    x0, y0, x1, y1 = crop_box
    parts = []
    for start, logits in upscale(low_res[keep], crop_geometry):
        index = keep[start:start + logits.shape[0]]
        stability = stability_scores(logits, params.stability_score_offset)
        passed = np.arange(index.shape[0])
        if params.stability_score_thresh > 0.0:
            passed = passed[stability >= np.float32(params.stability_score_thresh)]
        masks = logits[passed] > MASK_THRESHOLD
        del logits
        boxes = mask_boxes(masks)
        inside = ~near_crop_edge(boxes, crop_box, [0, 0, image_w, image_h])
        masks, boxes, passed = masks[inside], boxes[inside], passed[inside]
        areas = masks.sum(axis=(1, 2), dtype=np.int64)  # before the paste: the crop is smaller
        if (x0, y0, x1, y1) != (0, 0, image_w, image_h):
            full = np.zeros((masks.shape[0], image_h, image_w), dtype=bool)
            full[:, y0:y1, x0:x1] = masks
            masks = full
        chosen = index[passed]
        parts.append(Masks(encode(masks), areas, scores[chosen], stability[passed], boxes, points[chosen],
                           prompt_boxes[chosen], np.zeros((len(chosen), 4), np.int64)))
    return Masks.concat(parts)


def finish_crop(masks: Masks, crop_box: list[int], params: GeneratorParameters) -> Masks:
    """All of a crop's masks: box NMS on the predicted IoU, then boxes and points into image pixels."""
    kept = masks.take(nms(masks.boxes.astype(np.float32), masks.scores, params.box_nms_thresh))
    x0, y0 = crop_box[0], crop_box[1]
    kept.boxes = kept.boxes + np.array([x0, y0, x0, y0])
    kept.points = kept.points + np.array([x0, y0], dtype=np.float64)
    kept.prompt_boxes = kept.prompt_boxes + np.array([x0, y0, x0, y0], dtype=np.float32)
    kept.crop_boxes = np.tile(np.asarray(crop_box, np.int64), (len(kept), 1))
    return kept


_MASK_ARRAYS = ("areas", "scores", "stability", "boxes", "points", "prompt_boxes", "crop_boxes")


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    out = np.array(boxes, copy=True)
    out[:, 2] = out[:, 2] - out[:, 0]
    out[:, 3] = out[:, 3] - out[:, 1]
    return out


def crop_nms(masks: Masks, threshold: float) -> Masks:
    """Across crops: duplicates resolved in favour of the smaller crop (score 1 / crop area)."""
    c = masks.crop_boxes
    scores = (1.0 / ((c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]))).astype(np.float32)
    return masks.take(nms(masks.boxes.astype(np.float32), scores, threshold))


def clean_small_regions(masks: Masks, min_area: int, nms_threshold: float, decode, encode) -> Masks:
    """Upstream's postprocess_small_regions: fill small holes, drop small islands, then an
    NMS that prefers the masks the cleaning left unchanged.  `decode`/`encode` convert RLEs."""
    if len(masks) == 0:
        return masks
    cleaned, unchanged = [], []
    for rle in masks.rles:
        mask = decode([rle])[0]
        mask, holes = remove_small_regions(mask, min_area, "holes")
        mask, islands = remove_small_regions(mask, min_area, "islands")
        cleaned.append(mask)
        unchanged.append(not (holes or islands))
    stacked = np.stack(cleaned)
    boxes = mask_boxes(stacked)
    keep = nms(boxes.astype(np.float32), np.asarray(unchanged, np.float32), nms_threshold)
    rles, areas, new_boxes = list(masks.rles), masks.areas.copy(), masks.boxes.copy()
    for i in keep:
        if not unchanged[i]:
            rles[i] = encode(stacked[i:i + 1])[0]
            areas[i] = int(stacked[i].sum())
            new_boxes[i] = boxes[i]
    updated = Masks(rles, areas, masks.scores, masks.stability, new_boxes, masks.points, masks.prompt_boxes,
                    masks.crop_boxes)
    return updated.take(keep)
