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


# Roles of the models in a repository.  Each model variant gets its own
# preprocess, encoder, decoder and ensembles, named after its slug
# (`model_names`); the postprocess has no weights and is shared.  The
# ensembles named `sam` and `sam_encode` are aliases of the default variant's.
ENSEMBLE = "sam"
ENCODE_ENSEMBLE = "sam_encode"  # preprocess + encoder only: returns the embedding
PREPROCESS = "preprocess"
IMAGE_ENCODER = "image_encoder"
MASK_DECODER = "mask_decoder"
POSTPROCESS = "postprocess"
ROLES = (ENSEMBLE, ENCODE_ENSEMBLE, PREPROCESS, IMAGE_ENCODER, MASK_DECODER, POSTPROCESS)


@dataclass(frozen=True)
class ModelNames:
    """The Triton model names of one variant, by role."""

    ensemble: str
    encode_ensemble: str
    preprocess: str
    image_encoder: str
    mask_decoder: str
    postprocess: str

    def of(self, role: str) -> str:
        field = {ENSEMBLE: "ensemble", ENCODE_ENSEMBLE: "encode_ensemble"}.get(role, role)
        return getattr(self, field)


def model_names(slug: str) -> ModelNames:
    return ModelNames(
        ensemble=f"{ENSEMBLE}_{slug}",
        encode_ensemble=f"{ENCODE_ENSEMBLE}_{slug}",
        preprocess=f"{slug}_{PREPROCESS}",
        image_encoder=f"{slug}_{IMAGE_ENCODER}",
        mask_decoder=f"{slug}_{MASK_DECODER}",
        postprocess=POSTPROCESS,
    )


def default_names(slug: str) -> ModelNames:
    """The aliases: `sam` / `sam_encode` over the default variant's steps."""
    names = model_names(slug)
    return ModelNames(ENSEMBLE, ENCODE_ENSEMBLE, names.preprocess, names.image_encoder, names.mask_decoder,
                      POSTPROCESS)


def role_of(model_name: str) -> str | None:
    """The role of a model name written by `samtriton build` (None if none)."""
    if model_name == ENCODE_ENSEMBLE or model_name.startswith(ENCODE_ENSEMBLE + "_"):
        return ENCODE_ENSEMBLE
    if model_name == POSTPROCESS:
        return POSTPROCESS
    for role in (PREPROCESS, IMAGE_ENCODER, MASK_DECODER):
        if model_name.endswith("_" + role):
            return role
    if model_name == ENSEMBLE or model_name.startswith(ENSEMBLE + "_"):
        return ENSEMBLE
    return None

# Triton's data types as the KServe v2 protocol names them on the wire.
WIRE_DTYPES = {"TYPE_FP32": "FP32", "TYPE_INT32": "INT32", "TYPE_UINT8": "UINT8", "TYPE_STRING": "BYTES"}

# SAM-family mask decoders emit 256x256 low-resolution logits per prompt and
# take 256-channel 64x64 image embeddings, whatever the encoder's input size.
EMBEDDING_SHAPE = (256, 64, 64)
LOW_RES_MASK_SIZE = 256
# Their prompt encoder takes boxes in a frame whose longest side is 1024, and
# the logits are upsampled to that frame before the padding is cropped, for
# every variant (EfficientViT-SAM L0-L2 encode a 512 image nonetheless).
PROMPT_SIZE = 1024


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
# original (h, w) then resized-before-padding (h, w) in the prompt frame: what
# the postprocess needs to undo the resize, as the upstream predictor's
# original_size / input_size.
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
# GPU target: the TensorRT decoder gets the ragged boxes as Triton's TensorRT
# backend delivers them (all requests' boxes in one 1-D tensor) and, as a
# batch_input of kind BATCH_ACCUMULATED_ELEMENT_COUNT, the running element
# count per request; it derives each box's image from that.
BOXES_ACCUMULATED_NAME = "boxes_accumulated"


# Counter the python models export (Triton custom metric, label `model`): the
# error responses they sent.  Triton 2.51 counts those as successes in its own
# statistics, so the shutdown drain needs this to know which requests ended.
REQUEST_ERRORS_METRIC = "samtriton_request_errors_total"
# Environment variable naming a file whose existence tells the preprocess
# that the server is draining: new requests are refused with UNAVAILABLE.
DRAIN_FILE_ENV = "SAMTRITON_DRAIN_FILE"

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


def model_io(encoder_size: int) -> dict[str, ModelIO]:
    """Inputs and outputs of every model role, for one encoder input size.

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
            outputs=(pixel_values(encoder_size, batched=False), MODEL_BOXES, IMAGE_GEOMETRY),
        ),
        IMAGE_ENCODER: ModelIO(
            inputs=(pixel_values(encoder_size, batched=True),),
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


# The ensembles' wiring: for each step, model name, model input -> ensemble
# tensor and model output -> ensemble tensor.  Tensors keep their own names.
def ensemble_steps(role: str, names: ModelNames, encoder_size: int) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    io = model_io(encoder_size)
    if role == ENSEMBLE:
        return [
            (names.of(r), {t.name: t.name for t in io[r].inputs}, {t.name: t.name for t in io[r].outputs})
            for r in (PREPROCESS, IMAGE_ENCODER, MASK_DECODER, POSTPROCESS)
        ]
    if role == ENCODE_ENSEMBLE:
        return [
            (names.preprocess, {IMAGE.name: IMAGE.name},
             {PIXEL_VALUES_NAME: PIXEL_VALUES_NAME, IMAGE_GEOMETRY.name: IMAGE_GEOMETRY.name}),
            (names.image_encoder, {PIXEL_VALUES_NAME: PIXEL_VALUES_NAME},
             {IMAGE_EMBEDDINGS_NAME: IMAGE_EMBEDDINGS_NAME}),
        ]
    raise KeyError(role)
