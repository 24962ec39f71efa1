"""The one definition of the Triton models' names, tensors, dtypes and shapes.

Config files are generated from this module (`samtriton.build.configs`), the
python models look their tensor names up here, and the SDK builds requests from
it, so a renamed tensor cannot drift between the pieces.

Shapes are Triton `dims`: without the batch dimension for models whose
`max_batch_size` is > 0, full shapes otherwise.  Nothing heavy is imported
here: the serving path must stay free of torch.
"""

from __future__ import annotations

from dataclasses import dataclass


ENSEMBLE = "sam"
ENCODE_ENSEMBLE = "sam_encode"  # preprocess + encoder only: warms the embedding cache
PREPROCESS = "preprocess"
IMAGE_ENCODER = "image_encoder"
MASK_DECODER = "mask_decoder"
POSTPROCESS = "postprocess"

# Triton's data types as the KServe v2 protocol names them on the wire.
WIRE_DTYPES = {"TYPE_FP32": "FP32", "TYPE_INT32": "INT32", "TYPE_UINT8": "UINT8", "TYPE_STRING": "BYTES"}

# SAM-family mask decoders emit 256x256 low-resolution logits per prompt and
# take 256-channel 64x64 image embeddings, whatever the encoder's input size.
EMBEDDING_SHAPE = (256, 64, 64)
LOW_RES_MASK_SIZE = 256


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False
    allow_ragged_batch: bool = False

    @property
    def wire_dtype(self) -> str:
        return WIRE_DTYPES[self.data_type]


# --- the ensemble, i.e. the public API of the served model -----------------
IMAGE = TensorSpec("image", "TYPE_STRING", (1,))
BOXES = TensorSpec("boxes", "TYPE_FP32", (-1, 4))
# The preprocess also serves `sam_encode`, whose requests carry no boxes.
BOXES_OPTIONAL = TensorSpec("boxes", "TYPE_FP32", (-1, 4), optional=True)
SCORES = TensorSpec("scores", "TYPE_FP32", (-1,))
MASKS_RLE = TensorSpec("masks_rle", "TYPE_STRING", (-1,))
MASKS = TensorSpec("masks", "TYPE_UINT8", (-1, -1, -1))

# --- internal tensors between the steps --------------------------------------
# original (h, w) then resized-before-padding (h, w): what the postprocess needs
# to undo the resize, as the upstream predictor's original_size / input_size.
IMAGE_GEOMETRY = TensorSpec("image_geometry", "TYPE_INT32", (4,))
# The decoder batches requests with different box counts (Triton ragged
# batching): per request it sees [1, n, ...]; the other steps see the same
# full shapes with the leading 1 spelled out.
MODEL_BOXES_NAME = "model_boxes"
LOW_RES_MASKS_NAME = "low_res_masks"
IOU_PREDICTIONS_NAME = "iou_predictions"
MODEL_BOXES = TensorSpec(MODEL_BOXES_NAME, "TYPE_FP32", (1, -1, 4))
MODEL_BOXES_RAGGED = TensorSpec(MODEL_BOXES_NAME, "TYPE_FP32", (-1, 4), allow_ragged_batch=True)
LOW_RES_MASKS = TensorSpec(LOW_RES_MASKS_NAME, "TYPE_FP32", (1, -1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE))
LOW_RES_MASKS_BATCHED = TensorSpec(LOW_RES_MASKS_NAME, "TYPE_FP32", (-1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE))
IOU_PREDICTIONS = TensorSpec(IOU_PREDICTIONS_NAME, "TYPE_FP32", (1, -1))
IOU_PREDICTIONS_BATCHED = TensorSpec(IOU_PREDICTIONS_NAME, "TYPE_FP32", (-1,))
# Input of the ONNX decoder graph only (the python model builds it).
BOX_IMAGE_INDEX = TensorSpec("box_image_index", "TYPE_INT32", (-1,))


PIXEL_VALUES_NAME = "pixel_values"
IMAGE_EMBEDDINGS_NAME = "image_embeddings"


def pixel_values(image_size: int, batched: bool) -> TensorSpec:
    """Normalised, zero-padded encoder input (CHW)."""
    dims = (3, image_size, image_size)
    return TensorSpec(PIXEL_VALUES_NAME, "TYPE_FP32", dims if batched else (1, *dims))


def image_embeddings(batched: bool) -> TensorSpec:
    return TensorSpec(IMAGE_EMBEDDINGS_NAME, "TYPE_FP32", EMBEDDING_SHAPE if batched else (1, *EMBEDDING_SHAPE))


@dataclass(frozen=True)
class ModelIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def model_io(image_size: int) -> dict[str, ModelIO]:
    """Inputs and outputs of every model in the repository, for one encoder size.

    The image encoder and mask decoder batch across requests (max_batch_size
    > 0, dims without the batch axis); the other steps see one request's full
    shapes.  Triton's ensemble connects the two kinds when full shapes agree
    ([1, 3, S, S] == batch 1 of [3, S, S]).
    """
    return {
        ENSEMBLE: ModelIO(inputs=(IMAGE, BOXES), outputs=(SCORES, MASKS_RLE, MASKS)),
        ENCODE_ENSEMBLE: ModelIO(
            inputs=(IMAGE,), outputs=(IMAGE_GEOMETRY, image_embeddings(batched=False))
        ),
        PREPROCESS: ModelIO(
            inputs=(IMAGE, BOXES_OPTIONAL),
            outputs=(pixel_values(image_size, batched=False), MODEL_BOXES, IMAGE_GEOMETRY),
        ),
        IMAGE_ENCODER: ModelIO(
            inputs=(pixel_values(image_size, batched=True),),
            outputs=(image_embeddings(batched=True),),
        ),
        MASK_DECODER: ModelIO(
            inputs=(image_embeddings(batched=True), MODEL_BOXES_RAGGED),
            outputs=(LOW_RES_MASKS_BATCHED, IOU_PREDICTIONS_BATCHED),
        ),
        POSTPROCESS: ModelIO(
            inputs=(LOW_RES_MASKS, IOU_PREDICTIONS, IMAGE_GEOMETRY),
            outputs=(SCORES, MASKS_RLE, MASKS),
        ),
    }


# The ensembles' wiring: for each step, model input -> ensemble tensor and
# model output -> ensemble tensor.  Internal tensors keep their own names.
def ensemble_steps(ensemble: str, image_size: int) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    io = model_io(image_size)
    if ensemble == ENSEMBLE:
        return [
            (m, {t.name: t.name for t in io[m].inputs}, {t.name: t.name for t in io[m].outputs})
            for m in (PREPROCESS, IMAGE_ENCODER, MASK_DECODER, POSTPROCESS)
        ]
    if ensemble == ENCODE_ENSEMBLE:
        return [
            (PREPROCESS, {IMAGE.name: IMAGE.name},
             {PIXEL_VALUES_NAME: PIXEL_VALUES_NAME, IMAGE_GEOMETRY.name: IMAGE_GEOMETRY.name}),
            (IMAGE_ENCODER, {PIXEL_VALUES_NAME: PIXEL_VALUES_NAME},
             {IMAGE_EMBEDDINGS_NAME: IMAGE_EMBEDDINGS_NAME}),
        ]
    raise KeyError(ensemble)
