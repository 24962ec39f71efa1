"""What a segmentation request returns."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass
class SegmentationResult:
    """Masks, scores and the prompts they answer, one entry per prompt.

    With `multimask` every prompt has three candidates (upstream's multimask
    output, in its order): masks (N, 3, H, W), scores (N, 3), rles N x 3.
    """

    masks: np.ndarray  # (N, H, W) bool at the original image size, or (N, 3, H, W)
    scores: np.ndarray  # (N,) or (N, 3) float32, the decoder's predicted IoU
    boxes: np.ndarray | None  # (N, 4) float32 as sent; NaN rows for prompts without a box; None: no boxes
    # COCO compressed RLE (JSON) per mask (per candidate), when fetched (mask_transport="rle")
    rles: list = field(default_factory=list)
    points: np.ndarray | None = None  # (N, P, 2) float32 as sent, padded
    point_labels: np.ndarray | None = None  # (N, P) int32: 1 foreground, 0 background, -1 padding
    # (N, K, 256, 256) float32 (K = 1, or 3 with multimask), when asked for: feed
    # one of them back as the next request's mask_input.
    low_res_logits: np.ndarray | None = None
    multimask: bool = False

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def areas(self) -> np.ndarray:
        """(N,) or (N, 3) pixel counts."""
        return self.masks.reshape(*self.scores.shape, -1).sum(axis=-1)

    def best(self) -> "SegmentationResult":
        """One mask per prompt: the multimask candidate with the highest score (as
        upstream's examples pick it); the result itself without multimask."""
        if not self.multimask:
            return self
        pick = np.argmax(self.scores, axis=1)
        rows = np.arange(len(self))
        rles = [self.rles[i][k] for i, k in enumerate(pick)] if self.rles else []
        logits = None if self.low_res_logits is None else self.low_res_logits[rows, pick][:, np.newaxis]
        return replace(self, masks=self.masks[rows, pick], scores=self.scores[rows, pick], rles=rles,
                       low_res_logits=logits, multimask=False)


@dataclass
class EverythingResult:
    """What `segment_everything` returns: one row per mask, in the order of the upstream
    automatic mask generator (see `annotations()` for its record format)."""

    rles: list  # COCO compressed RLE per mask, JSON {"size": [h, w], "counts": str}
    scores: np.ndarray  # (M,) float32 predicted IoU
    stability_scores: np.ndarray  # (M,) float32
    bboxes: np.ndarray  # (M, 4) int32 XYWH of the mask's pixels
    areas: np.ndarray  # (M,) int32 pixels
    point_coords: np.ndarray  # (M, 2) float32 the grid point; NaN rows for box prompts
    prompt_boxes: np.ndarray  # (M, 4) float32 the box prompt, xyxy; NaN rows for grid points
    crop_boxes: np.ndarray  # (M, 4) int32 XYWH of the crop the mask came from

    def __len__(self) -> int:
        return len(self.rles)

    @property
    def masks(self) -> np.ndarray:
        """(M, H, W) bool, decoded from the RLEs (M = 0: shape (0, 0, 0))."""
        from samtriton.serving.postprocessing import decode_rle

        return decode_rle(self.rles)

    def annotations(self) -> list[dict]:
        """Records as `SamAutomaticMaskGenerator(output_mode="coco_rle").generate` returns them,
        plus `prompt_box` (None for a grid point)."""
        import json

        records = []
        for i, rle in enumerate(self.rles):
            point = self.point_coords[i]
            box = self.prompt_boxes[i]
            records.append({
                "segmentation": json.loads(rle),
                "area": int(self.areas[i]),
                "bbox": [int(v) for v in self.bboxes[i]],
                "predicted_iou": float(self.scores[i]),
                "point_coords": [] if np.isnan(point).any() else [[float(v) for v in point]],
                "stability_score": float(self.stability_scores[i]),
                "crop_box": [int(v) for v in self.crop_boxes[i]],
                "prompt_box": None if np.isnan(box).any() else [float(v) for v in box],
            })
        return records
