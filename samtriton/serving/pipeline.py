"""The served pipeline run in-process, one request at a time, without Triton.

It reads the same model repository (configs and ONNX files) and calls the
same functions as the python models, so it is the reference for "what a
request gets alone" and the in-process side of served-vs-in-process figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samtriton import spec
from samtriton.serving.onnx_runtime import decode, encode, make_session
from samtriton.serving.postprocessing import masks_from_logits
from samtriton.serving.preprocessing import PreprocessSettings, Preprocessed, preprocess
from samtriton.variants import get_variant


def repository_parameters(repo: Path, model: str) -> dict[str, str]:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())
    return {k: v.string_value for k, v in cfg.parameters.items()}


def repository_names(repo: Path, model: str | None = None) -> spec.ModelNames:
    """The step model names of variant `model` in a built repository (None: its default)."""
    if model is None:
        model = repository_parameters(repo, spec.ENSEMBLE)["samtriton_model"]
    return spec.model_names(get_variant(model).slug)


class InProcessPipeline:
    def __init__(self, model_repository: str | Path, intra_op_threads: int = 0, model: str | None = None):
        repo = Path(model_repository)
        self.names = repository_names(repo, model)
        self.settings = PreprocessSettings.from_parameters(repository_parameters(repo, self.names.preprocess))
        self.encoder = make_session(str(repo / self.names.image_encoder / "1" / "model.onnx"), intra_op_threads)
        self.decoder = make_session(str(repo / self.names.mask_decoder / "1" / "model.onnx"), intra_op_threads)

    def preprocess(self, image_bytes: bytes, boxes=None) -> Preprocessed:
        return preprocess(image_bytes, boxes, self.settings)

    def encode(self, pre: Preprocessed) -> np.ndarray:
        return encode(self.encoder, pre.pixel_values[np.newaxis])

    def decode(self, embeddings: np.ndarray, model_boxes: np.ndarray):
        return decode(self.decoder, embeddings, model_boxes, np.zeros(model_boxes.shape[0], np.int32))

    def segment(self, image_bytes: bytes, boxes) -> tuple[np.ndarray, np.ndarray]:
        """(masks (N, H, W) bool, scores (N,) float32) for one request."""
        pre = self.preprocess(image_bytes, np.asarray(boxes, dtype=np.float32))
        low_res, scores = self.decode(self.encode(pre), pre.model_boxes)
        return masks_from_logits(low_res, pre.geometry, self.settings.prompt_size), scores
