"""What a segmentation request returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SegmentationResult:
    masks: np.ndarray  # (N, H, W) bool, at the original image size
    scores: np.ndarray  # (N,) float32, the decoder's predicted IoU
    boxes: np.ndarray  # (N, 4) float32, the boxes as sent
    rles: list[bytes] = field(default_factory=list)  # COCO compressed RLE (JSON), when fetched

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def areas(self) -> np.ndarray:
        return self.masks.reshape(len(self), -1).sum(axis=1)
