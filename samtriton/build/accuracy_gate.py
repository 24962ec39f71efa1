"""The accuracy gate: a reduced-precision step against the fp32 ONNX Runtime reference.

One gate for both targets: a TensorRT engine (GPU, fp16) and an OpenVINO
bf16 (or fp32) graph (CPU) are judged the same way, on a fixed set built from
the repository's own checkpoint:

- the decoder is fed every prompt kind (boxes, points, box + points, mask
  inputs) on two images' embeddings;
- an encoder is judged through the fp32 reference decoder: its embeddings and
  the reference encoder's go through the same decoder and prompts, so what is
  measured is what a user sees, masks and scores.

It passes with a mean low-res mask IoU (all four mask tokens, logits > 0) of
at least 0.97 and no score further than 0.05 from the reference's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from samtriton import spec
from samtriton.serving import decoder_batch
from samtriton.serving.postprocessing import mask_ious

# feeds -> outputs by name
Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class GateError(RuntimeError):
    """A step failed the accuracy gate; nothing was written for it."""


@dataclass(frozen=True)
class GateReport:
    min_mask_iou: float
    mean_mask_iou: float
    max_score_diff: float
    max_embedding_diff: float | None = None

    MIN_MEAN_IOU = 0.97
    MAX_SCORE_DIFF = 0.05
    # Config parameter names of the figures (see to_parameters).
    PARAMETERS = ("gate_mean_mask_iou", "gate_min_mask_iou", "gate_max_score_diff")

    def passed(self) -> bool:
        return self.mean_mask_iou >= self.MIN_MEAN_IOU and self.max_score_diff <= self.MAX_SCORE_DIFF

    def line(self) -> str:
        emb = "" if self.max_embedding_diff is None else f", embeddings max |diff| {self.max_embedding_diff:.3g}"
        return (f"mask IoU vs fp32 ONNX Runtime: mean {self.mean_mask_iou:.4f} (gate >= {self.MIN_MEAN_IOU}), "
                f"min {self.min_mask_iou:.4f}; scores max |diff| {self.max_score_diff:.3g} "
                f"(gate <= {self.MAX_SCORE_DIFF}){emb}")

    def to_parameters(self) -> dict[str, str]:
        values = (self.mean_mask_iou, self.min_mask_iou, self.max_score_diff)
        return {name: f"{value:.4f}" for name, value in zip(self.PARAMETERS, values)}


def sample_pixels(encoder_size: int, pixel_mean, pixel_std, seed: int = 1) -> np.ndarray:
    """Two encoder inputs: the sample scene preprocessed as a request's image is,
    and noise (an encoder that only holds on smooth images should not pass)."""
    from samtriton.sample_image import sample_scene
    from samtriton.serving.preprocessing import normalise_and_pad, resize_longest_side

    img, _ = sample_scene()
    scene = normalise_and_pad(resize_longest_side(np.asarray(img), encoder_size), encoder_size, pixel_mean, pixel_std)
    noise = np.random.default_rng(seed).standard_normal((3, encoder_size, encoder_size)).astype(np.float32)
    return np.stack([scene, noise])


def decoder_feeds(tokens: int | None, images: np.ndarray | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The fixed prompts on `images` (random embeddings if None) as the decoder
    graph takes them: the CPU graph's stacked call (tokens None; every mask
    token) or, for TensorRT, the flat ragged layout of `tokens` tokens a prompt."""
    requests = decoder_batch.sample_requests(np.random.default_rng(seed), images)
    if tokens is None:
        return decoder_batch.stack(requests, [True, False] * (len(requests) // 2)).feeds
    return decoder_batch.ragged_feeds(requests, tokens)


def compare(got: dict[str, np.ndarray], ref: dict[str, np.ndarray],
            embedding_diff: float | None = None) -> GateReport:
    size = spec.LOW_RES_MASK_SIZE ** 2
    ious = mask_ious(got[spec.LOW_RES_MASKS_NAME].reshape(-1, size) > 0,
                     ref[spec.LOW_RES_MASKS_NAME].reshape(-1, size) > 0)
    score_diff = float(np.abs(got[spec.IOU_PREDICTIONS_NAME].astype(np.float32)
                              - ref[spec.IOU_PREDICTIONS_NAME]).max())
    return GateReport(float(ious.min()), float(ious.mean()), score_diff, embedding_diff)


def judge_encoder(candidate: Run, reference: Run, reference_decoder: Run, pixels: np.ndarray,
                  tokens: int | None = None) -> GateReport:
    """`pixels`: (2, 3, S, S) encoder inputs, `sample_pixels`."""
    return judge_embeddings(embed(candidate, pixels), embed(reference, pixels), reference_decoder, tokens)


def judge_embeddings(emb_got: np.ndarray, emb_ref: np.ndarray, reference_decoder: Run,
                     tokens: int | None = None) -> GateReport:
    """An encoder's embeddings against the reference's, through the reference decoder
    (`judge_encoder`, for callers that free one encoder before running the other)."""
    return compare(reference_decoder(decoder_feeds(tokens, emb_got)), reference_decoder(decoder_feeds(tokens, emb_ref)),
                   float(np.abs(emb_got - emb_ref).max()))


def embed(run: Run, pixels: np.ndarray) -> np.ndarray:
    """Embeddings of `pixels`, one image per call: ViT-B's activations at batch 2 cost GBs."""
    return np.concatenate([run({spec.PIXEL_VALUES_NAME: p[np.newaxis]})[spec.IMAGE_EMBEDDINGS_NAME].astype(np.float32)
                           for p in pixels])


def judge_decoder(candidate: Run, reference: Run, tokens: int | None = None) -> GateReport:
    feeds = decoder_feeds(tokens)
    return compare(candidate(feeds), reference(feeds))


def session_runner(session) -> Run:
    """A Run over anything with ONNX Runtime's `run(None, feeds)` and output names."""
    names = getattr(session, "output_names", None) or [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(None, feeds)))
