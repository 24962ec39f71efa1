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
    rles: list = field(default_factory=list)  # COCO compressed RLE (JSON) per mask (per candidate), when fetched
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
