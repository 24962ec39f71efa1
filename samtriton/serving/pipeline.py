"""The served pipeline run in-process, one request at a time, without Triton.

It reads the same model repository (configs and ONNX files, each step in
the runtime and precision its config names) and calls the same functions as
the python models, so it is the reference for "what a
request gets alone" and the in-process side of served-vs-in-process figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samtriton import spec
from samtriton.serving import decoder_batch
from samtriton.serving.cpu_runtime import StepRuntime, make_session, resolve_configured
from samtriton.serving.onnx_runtime import decode, encode
from samtriton.serving.postprocessing import masks_from_logits
from samtriton.serving.preprocessing import PreprocessSettings, Preprocessed, preprocess
from samtriton.serving.prompts import PromptInputs, Prompts
from samtriton.variants import get_variant


def repository_parameters(repo: Path, model: str) -> dict[str, str]:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())
    return {k: v.string_value for k, v in cfg.parameters.items()}


def repository_names(repo: Path, model: str | None = None) -> spec.ModelNames:
    """The step model names of variant `model` in a built repository (None: its default)."""
    if model is None:
        model = repository_parameters(repo, spec.ENSEMBLE)[spec.VARIANT_PARAMETER]
    return spec.model_names(get_variant(model).slug)


def step_runtime(repo: Path, model: str) -> StepRuntime:
    """The runtime and precision a step model of `repo` runs with on this CPU, as its python model resolves it."""
    return resolve_configured(repository_parameters(repo, model), spec.role_of(model))[0]


@dataclass(frozen=True)
class InProcessResult:
    """What a `sam` request returns: masks (N, H, W) bool or (N, 3, H, W) with
    multimask, scores (N,) or (N, 3), low-res logits (N, K, 256, 256)."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


class InProcessPipeline:
    def __init__(self, model_repository: str | Path, intra_op_threads: int = 0, model: str | None = None):
        repo = Path(model_repository)
        self.names = repository_names(repo, model)
        self.settings = PreprocessSettings.from_parameters(repository_parameters(repo, self.names.preprocess))
        self.encoder, self.decoder = (
            make_session(repo / name / "1" / "model.onnx", step_runtime(repo, name), intra_op_threads)
            for name in (self.names.image_encoder, self.names.mask_decoder))

    def preprocess(self, image_bytes: bytes, prompts: PromptInputs | None = None) -> Preprocessed:
        return preprocess(image_bytes, prompts, self.settings)

    def encode(self, pre: Preprocessed) -> np.ndarray:
        return encode(self.encoder, pre.pixel_values[np.newaxis])

    def decode(self, embeddings: np.ndarray, prompts: Prompts, multimask: bool = False):
        """One image's prompts -> ((N, K, 256, 256) logits, (N, K) scores), K = 1 or 3."""
        request = [decoder_batch.DecoderRequest.of(embeddings, prompts)]
        call = decoder_batch.stack(request, [multimask])
        low_res, iou = decoder_batch.split(*decode(self.decoder, call.feeds), call, request, [multimask])[0]
        return low_res[0], iou[0]

    def run(self, image_bytes: bytes, prompts: PromptInputs, multimask: bool = False) -> InProcessResult:
        pre = self.preprocess(image_bytes, prompts)
        low_res, scores = self.decode(self.encode(pre), pre.prompts, multimask)
        masks = masks_from_logits(low_res.reshape(-1, *low_res.shape[2:]), pre.geometry, self.settings.prompt_size,
                                  column_major=False)
        masks = masks.reshape(*low_res.shape[:2], *masks.shape[1:])
        if not multimask:
            masks, scores = masks[:, 0], scores[:, 0]
        return InProcessResult(masks, scores, low_res)

    def segment(self, image_bytes: bytes, boxes=None, *, points=None, point_labels=None, mask_inputs=None,
                multimask: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(masks, scores) for one request, as `sam` answers it."""
        result = self.run(image_bytes, PromptInputs(boxes, points, point_labels, mask_inputs), multimask)
        return result.masks, result.scores
