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
# The config parameter naming the variant (`samtriton.variants`) a model belongs to.
VARIANT_PARAMETER = "samtriton_model"
ENCODE_ENSEMBLE = "sam_encode"  # preprocess + encoder only: returns the embedding
PREPROCESS = "preprocess"
# The image's embedding from the embedding cache, or from the encoder on a miss
# (python model: decode, resize, normalise, then the image_encoder through BLS).
IMAGE_EMBEDDING = "image_embedding"
IMAGE_ENCODER = "image_encoder"
MASK_DECODER = "mask_decoder"
POSTPROCESS = "postprocess"
# Segment everything: a python model that drives the encoder and the decoder
# through Triton's BLS API (a grid of point prompts, filtered as upstream).
EVERYTHING = "sam_everything"
ROLES = (ENSEMBLE, ENCODE_ENSEMBLE, PREPROCESS, IMAGE_EMBEDDING, IMAGE_ENCODER, MASK_DECODER, POSTPROCESS, EVERYTHING)


@dataclass(frozen=True)
class ModelNames:
    """The Triton model names of one variant, by role."""

    ensemble: str
    encode_ensemble: str
    preprocess: str
    image_embedding: str
    image_encoder: str
    mask_decoder: str
    postprocess: str
    everything: str

    def of(self, role: str) -> str:
        field = {ENSEMBLE: "ensemble", ENCODE_ENSEMBLE: "encode_ensemble", EVERYTHING: "everything"}.get(role, role)
        return getattr(self, field)


def model_names(slug: str) -> ModelNames:
    return ModelNames(
        ensemble=f"{ENSEMBLE}_{slug}",
        encode_ensemble=f"{ENCODE_ENSEMBLE}_{slug}",
        preprocess=f"{slug}_{PREPROCESS}",
        image_embedding=f"{slug}_{IMAGE_EMBEDDING}",
        image_encoder=f"{slug}_{IMAGE_ENCODER}",
        mask_decoder=f"{slug}_{MASK_DECODER}",
        postprocess=POSTPROCESS,
        everything=f"{EVERYTHING}_{slug}",
    )


def default_names(slug: str) -> ModelNames:
    """The aliases: `sam` / `sam_encode` / `sam_everything` over the default variant's steps."""
    names = model_names(slug)
    return ModelNames(ENSEMBLE, ENCODE_ENSEMBLE, names.preprocess, names.image_embedding, names.image_encoder,
                      names.mask_decoder, POSTPROCESS, EVERYTHING)


def role_of(model_name: str) -> str | None:
    """The role of a model name written by `samtriton build` (None if none)."""
    if model_name == ENCODE_ENSEMBLE or model_name.startswith(ENCODE_ENSEMBLE + "_"):
        return ENCODE_ENSEMBLE
    if model_name == EVERYTHING or model_name.startswith(EVERYTHING + "_"):
        return EVERYTHING
    if model_name == POSTPROCESS:
        return POSTPROCESS
    for role in (PREPROCESS, IMAGE_EMBEDDING, IMAGE_ENCODER, MASK_DECODER):
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
# A request carries N prompts; each is a box, a set of points, or both, and
# may add the low-res logits of a previous answer.  Every prompt of one
# request has the same kinds (as in the upstream predictor's batched call).
IMAGE = TensorSpec("image", "TYPE_STRING", (1,))
BOXES = TensorSpec("boxes", "TYPE_FP32", (-1, 4), optional=True)  # [N, 4] xyxy, original pixels
POINTS = TensorSpec("points", "TYPE_FP32", (-1, -1, 2), optional=True)  # [N, P, 2] xy, original pixels
POINT_LABELS = TensorSpec("point_labels", "TYPE_INT32", (-1, -1), optional=True)  # [N, P]
MASK_INPUTS = TensorSpec("mask_inputs", "TYPE_FP32", (-1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE),
                         optional=True)  # [N, 256, 256]: low_res_logits of a previous answer
# Outputs: [N] (or [N, 3] with the request parameter multimask_output, which
# Triton's configs cannot express: dims state the single-mask rank).
SCORES = TensorSpec("scores", "TYPE_FP32", (-1,))
MASKS_RLE = TensorSpec("masks_rle", "TYPE_STRING", (-1,))
MASKS = TensorSpec("masks", "TYPE_UINT8", (-1, -1, -1))
# `masks` with each row's pixels packed 8 to a byte, the first pixel in the
# highest bit (numpy's packbits): [N, H, ceil(W / 8)].  1/8 of `masks` on the
# wire, whatever the mask looks like, and cheap at both ends, where COCO RLE's
# cost and size grow with the mask's edges (a noisy mask's RLE is as large as
# this and took 1.7-2.4 ms a mask to encode and 1.4-3.3 ms to decode here).
MASKS_PACKED = TensorSpec("masks_packed", "TYPE_UINT8", (-1, -1, -1))
# (height, width) of the original image, the masks' size: with `masks_packed`,
# the width its last axis rounds up.
IMAGE_SIZE = TensorSpec("image_size", "TYPE_INT32", (2,))
LOW_RES_LOGITS = TensorSpec("low_res_logits", "TYPE_FP32",
                            (-1, -1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE))  # [N, K, 256, 256], K = 1 or 3

# `sam_everything`: the image (and optionally a detector's boxes as prompts,
# instead of the point grid); the generator's knobs are request parameters
# (`samtriton.serving.automatic_masks.GeneratorParameters`).  One row per mask,
# in the order upstream's generator returns them.
STABILITY_SCORES = TensorSpec("stability_scores", "TYPE_FP32", (-1,))
BBOXES = TensorSpec("bboxes", "TYPE_INT32", (-1, 4))  # XYWH of the mask's pixels, as upstream
AREAS = TensorSpec("areas", "TYPE_INT32", (-1,))  # pixels
POINT_COORDS = TensorSpec("point_coords", "TYPE_FP32", (-1, 2))  # the grid point; NaN for a box prompt
PROMPT_BOXES = TensorSpec("prompt_boxes", "TYPE_FP32", (-1, 4))  # the box prompt (xyxy); NaN for a grid point
CROP_BOXES = TensorSpec("crop_boxes", "TYPE_INT32", (-1, 4))  # XYWH of the crop the mask came from
EVERYTHING_OUTPUTS = (MASKS_RLE, SCORES, STABILITY_SCORES, BBOXES, AREAS, POINT_COORDS, PROMPT_BOXES, CROP_BOXES)

# `point_labels` on the wire: SAM's 1 (foreground) and 0 (background), and -1
# for the padding of prompts with fewer points than the longest one.
WIRE_POINT_LABELS = {1: "foreground", 0: "background", -1: "padding"}

# --- internal tensors between the steps --------------------------------------
# original (h, w) then resized-before-padding (h, w) in the prompt frame: what
# the postprocess needs to undo the resize, as the upstream predictor's
# original_size / input_size.
IMAGE_GEOMETRY = TensorSpec("image_geometry", "TYPE_INT32", (4,))

# The preprocess turns a request's prompts into the decoder's sparse tokens,
# in the prompt frame: for each prompt its points, then SAM's padding point
# (prompts without a box, as upstream) or the two box corners, then filler
# tokens up to the request's longest prompt.  Token labels are those of the
# upstream prompt encoder plus one for the filler, which the decoder graph
# never attends to (so filler never changes a result).
LABEL_NOT_A_POINT = -1  # upstream's padding point: the not-a-point embedding
LABEL_BACKGROUND = 0
LABEL_FOREGROUND = 1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3
LABEL_ABSENT = -10  # filler: masked out of attention
TOKEN_LABELS = (LABEL_ABSENT, LABEL_NOT_A_POINT, LABEL_BACKGROUND, LABEL_FOREGROUND, LABEL_BOX_TOP_LEFT,
                LABEL_BOX_BOTTOM_RIGHT)

PROMPT_COORDS_NAME = "prompt_coords"
PROMPT_LABELS_NAME = "prompt_labels"
MODEL_MASK_INPUTS_NAME = "model_mask_inputs"
HAS_MASK_INPUT_NAME = "has_mask_input"
LOW_RES_MASKS_NAME = "low_res_masks"
IOU_PREDICTIONS_NAME = "iou_predictions"
# A request's prompts, as the preprocess writes them:
PROMPT_COORDS = TensorSpec(PROMPT_COORDS_NAME, "TYPE_FP32", (1, -1, -1, 2))  # [1, N, T, 2]
PROMPT_LABELS = TensorSpec(PROMPT_LABELS_NAME, "TYPE_INT32", (1, -1, -1))  # [1, N, T]
# [1, M, 256, 256]: M = N with mask inputs; otherwise one zero placeholder, so
# that no tensor of a decoder batch is empty (TensorRT profiles need >= 1).
MODEL_MASK_INPUTS = TensorSpec(MODEL_MASK_INPUTS_NAME, "TYPE_FP32", (1, -1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE))
HAS_MASK_INPUT = TensorSpec(HAS_MASK_INPUT_NAME, "TYPE_FP32", (1, -1))  # [1, N]: 1.0 where prompt n has one
# A request's candidates as the postprocess reads them, K per prompt: the CPU
# decoder sends the ones the request asked for (K = 1: upstream's single-mask
# token; K = 3: the multimask tokens); a TensorRT engine cannot choose per
# request and sends all NUM_MASK_TOKENS, of which the postprocess picks.
NUM_MASK_TOKENS = 4
LOW_RES_MASKS = TensorSpec(LOW_RES_MASKS_NAME, "TYPE_FP32", (1, -1, -1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE))
IOU_PREDICTIONS = TensorSpec(IOU_PREDICTIONS_NAME, "TYPE_FP32", (1, -1, -1))

# The decoder batches requests with different prompt counts and token counts
# (Triton ragged batching): per request it sees the tensors above; its config
# states them without the leading 1 (the batch axis).
PROMPT_COORDS_RAGGED = TensorSpec(PROMPT_COORDS_NAME, "TYPE_FP32", (-1, -1, 2), allow_ragged_batch=True)
PROMPT_LABELS_RAGGED = TensorSpec(PROMPT_LABELS_NAME, "TYPE_INT32", (-1, -1), allow_ragged_batch=True)
MODEL_MASK_INPUTS_RAGGED = TensorSpec(MODEL_MASK_INPUTS_NAME, "TYPE_FP32", (-1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE),
                                      allow_ragged_batch=True)
HAS_MASK_INPUT_RAGGED = TensorSpec(HAS_MASK_INPUT_NAME, "TYPE_FP32", (-1,), allow_ragged_batch=True)
LOW_RES_MASKS_BATCHED = TensorSpec(LOW_RES_MASKS_NAME, "TYPE_FP32", (-1, -1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE))
IOU_PREDICTIONS_BATCHED = TensorSpec(IOU_PREDICTIONS_NAME, "TYPE_FP32", (-1, -1))

# Inputs of the CPU target's ONNX decoder graph only (its python model builds
# them from a batch of requests; see PromptMaskDecoderExport): the image of
# each mask input, the source row (image, or image with its mask input) of
# each prompt, and which of the NUM_MASK_TOKENS mask tokens to decode.
MASK_IMAGE_INDEX_NAME = "mask_image_index"
PROMPT_SOURCE_INDEX_NAME = "prompt_source_index"
MASK_TOKENS_NAME = "mask_tokens"
# GPU target: Triton's TensorRT backend concatenates the ragged inputs of a
# batch into flat tensors and passes, as batch inputs of kind
# BATCH_ACCUMULATED_ELEMENT_COUNT, each request's running element count of
# the labels and of the mask inputs; the graph derives every prompt's image
# and mask from them.  There every prompt has the same token count
# (`gpu_prompt_tokens`), so the flat labels reshape to [prompts, T].
LABELS_ACCUMULATED_NAME = "labels_accumulated"
MASKS_ACCUMULATED_NAME = "masks_accumulated"


def gpu_prompt_tokens(max_points: int) -> int:
    """Sparse tokens per prompt on the GPU target: the most points, plus two box corners."""
    return max_points + 2


# Counter the python models export (Triton custom metric, label `model`): the
# error responses they sent.  Triton 2.51 counts those as successes in its own
# statistics, so the shutdown drain needs this to know which requests ended.
REQUEST_ERRORS_METRIC = "samtriton_request_errors_total"
# Counter of `sam_everything` (labels `model`, `stage`): seconds spent per
# stage (image, encoder, decoder, filtering), where Triton's statistics cannot
# tell them apart: the encoder and decoder waits include their queues.
EVERYTHING_SECONDS_METRIC = "samtriton_everything_seconds_total"
# Gauge of `sam_everything` (labels `model`, `instance`): requests being served,
# which the shutdown drain waits for (they pass no preprocess).
EVERYTHING_IN_FLIGHT_METRIC = "samtriton_everything_in_flight"
# Counter of the `image_embedding` models (labels `model`, `event`): embedding
# cache hits, misses, requests that waited for another request's miss of the
# same image (`shared`), and evictions; and a gauge of the bytes it holds.
EMBEDDING_CACHE_EVENTS_METRIC = "samtriton_embedding_cache_events_total"
EMBEDDING_CACHE_BYTES_METRIC = "samtriton_embedding_cache_bytes"
# Environment variable that, when set, overrides every image_embedding model's
# embedding_cache_mb (`samtriton serve --embedding-cache-mb`; 0 turns it off).
EMBEDDING_CACHE_MB_ENV = "SAMTRITON_EMBEDDING_CACHE_MB"
# Environment variable naming a file whose existence tells the preprocess
# that the server is draining: new requests are refused with UNAVAILABLE.
DRAIN_FILE_ENV = "SAMTRITON_DRAIN_FILE"

PIXEL_VALUES_NAME = "pixel_values"
IMAGE_EMBEDDINGS_NAME = "image_embeddings"


# The prompt inputs a `sam` request may carry (at least boxes or points), and what it returns.
PROMPT_INPUTS = (BOXES, POINTS, POINT_LABELS, MASK_INPUTS)
ENSEMBLE_OUTPUTS = (SCORES, MASKS_RLE, MASKS, MASKS_PACKED, IMAGE_SIZE, LOW_RES_LOGITS)


def pixel_values(image_size: int, batched: bool) -> TensorSpec:
    """Normalised, zero-padded encoder input (CHW)."""
    dims = (3, image_size, image_size)
    return TensorSpec(PIXEL_VALUES_NAME, "TYPE_FP32", dims if batched else (1, *dims))


def image_embeddings(batched: bool, optional: bool = False) -> TensorSpec:
    return TensorSpec(IMAGE_EMBEDDINGS_NAME, "TYPE_FP32", EMBEDDING_SHAPE if batched else (1, *EMBEDDING_SHAPE),
                      optional=optional)


# CPU target: where `image_embedding` put an image's embedding in shared memory
# (`samtriton.serving.embedding_arena`): the arena's epoch, the slot and the
# slot's sequence number.  The `sam` ensemble passes it to the decoder in place
# of the 4 MiB embedding; `sam_encode` and direct decoder calls use the tensor.
EMBEDDING_HANDLE = TensorSpec("embedding_handle", "TYPE_INT64", (1, 3))
EMBEDDING_HANDLE_BATCHED = TensorSpec("embedding_handle", "TYPE_INT64", (3,), optional=True)


@dataclass(frozen=True)
class ModelIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def model_io(encoder_size: int, embedding_handoff: bool = False) -> dict[str, ModelIO]:
    """Inputs and outputs of every model role, for one encoder input size.

    `embedding_handoff` (the CPU target): `image_embedding` can answer with an
    `EMBEDDING_HANDLE` as well as the embedding, and the decoder takes either.

    The image encoder and mask decoder batch across requests (max_batch_size
    > 0, dims without the batch axis); the other steps see one request's full
    shapes.  Triton's ensemble connects the two kinds when full shapes agree
    ([1, 3, S, S] == batch 1 of [3, S, S]).
    """
    prompts = (PROMPT_COORDS, PROMPT_LABELS, MODEL_MASK_INPUTS, HAS_MASK_INPUT)
    return {
        ENSEMBLE: ModelIO(inputs=(IMAGE, *PROMPT_INPUTS), outputs=ENSEMBLE_OUTPUTS),
        ENCODE_ENSEMBLE: ModelIO(
            inputs=(IMAGE,), outputs=(IMAGE_GEOMETRY, image_embeddings(batched=False))
        ),
        PREPROCESS: ModelIO(inputs=(IMAGE, *PROMPT_INPUTS), outputs=(IMAGE_GEOMETRY, *prompts)),
        # The geometry is an input so that the step runs after the preprocess
        # accepted the request (a bad one never reaches the encoder), and the
        # decoded image is checked against it.  Run side by side, the two would
        # take 2-3 ms off a cache hit, but Triton 2.51 loses a request whose step
        # fails while another is in flight (tests/test_configs.py).
        IMAGE_EMBEDDING: ModelIO(inputs=(IMAGE, IMAGE_GEOMETRY), outputs=(
            (image_embeddings(batched=False), EMBEDDING_HANDLE) if embedding_handoff
            else (image_embeddings(batched=False),))),
        IMAGE_ENCODER: ModelIO(
            inputs=(pixel_values(encoder_size, batched=True),),
            outputs=(image_embeddings(batched=True),),
        ),
        MASK_DECODER: ModelIO(
            inputs=(*((image_embeddings(batched=True, optional=True), EMBEDDING_HANDLE_BATCHED) if embedding_handoff
                      else (image_embeddings(batched=True),)),
                    PROMPT_COORDS_RAGGED, PROMPT_LABELS_RAGGED, MODEL_MASK_INPUTS_RAGGED, HAS_MASK_INPUT_RAGGED),
            outputs=(LOW_RES_MASKS_BATCHED, IOU_PREDICTIONS_BATCHED),
        ),
        POSTPROCESS: ModelIO(
            inputs=(LOW_RES_MASKS, IOU_PREDICTIONS, IMAGE_GEOMETRY),
            outputs=ENSEMBLE_OUTPUTS,
        ),
        EVERYTHING: ModelIO(inputs=(IMAGE, BOXES), outputs=EVERYTHING_OUTPUTS),
    }


# The ensembles' wiring: for each step, model name, model input -> ensemble
# tensor and model output -> ensemble tensor.  Tensors keep their own names.
# With `embedding_handoff`, `sam` passes the decoder the embedding's handle, not the embedding.
def ensemble_steps(role: str, names: ModelNames, encoder_size: int,
                   embedding_handoff: bool = False) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    io = model_io(encoder_size, embedding_handoff)
    if role == ENSEMBLE:
        passed = EMBEDDING_HANDLE.name if embedding_handoff else IMAGE_EMBEDDINGS_NAME
        left_out = {IMAGE_EMBEDDINGS_NAME, EMBEDDING_HANDLE.name} - {passed}
        return [
            (names.of(r), {t.name: t.name for t in io[r].inputs if t.name not in left_out},
             {t.name: t.name for t in io[r].outputs if t.name not in left_out})
            for r in (PREPROCESS, IMAGE_EMBEDDING, MASK_DECODER, POSTPROCESS)
        ]
    if role == ENCODE_ENSEMBLE:
        return [
            (names.preprocess, {IMAGE.name: IMAGE.name}, {IMAGE_GEOMETRY.name: IMAGE_GEOMETRY.name}),
            (names.image_embedding, {t.name: t.name for t in io[IMAGE_EMBEDDING].inputs},
             {IMAGE_EMBEDDINGS_NAME: IMAGE_EMBEDDINGS_NAME}),
        ]
    raise KeyError(role)
