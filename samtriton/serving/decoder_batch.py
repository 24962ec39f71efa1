"""Several requests' prompts in one decoder call, and the answers split back per request.

A decoder request holds b images (1 through the ensemble) and, per image, N
prompts of T tokens, M mask inputs and N mask flags.  Requests differ in N,
T and in whether they carry mask inputs; `stack` pads every prompt to the
batch's longest with filler tokens (which the graph keeps out of attention),
points each prompt at its image (with or without its mask input), and builds
the feeds of the CPU target's decoder graph (`PromptMaskDecoderExport`).  `ragged_feeds`
builds what Triton's TensorRT backend feeds the GPU target's graph for the
same requests, for checks of that graph without a GPU; `sample_requests`
has every prompt kind, for the exports, the parity checks and the engines'
accuracy gate.

Torch-free: the python decoder model and the in-process pipeline use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from samtriton import spec
from samtriton.serving.errors import InvalidInput
from samtriton.serving.onnx_runtime import concat
from samtriton.serving.prompts import Geometry, PromptInputs, build_prompts


@dataclass(frozen=True)
class DecoderRequest:
    """One request's decoder inputs, with its leading image axis b."""

    embeddings: np.ndarray  # (b, 256, 64, 64)
    coords: np.ndarray  # (b, N, T, 2)
    labels: np.ndarray  # (b, N, T) int32
    mask_inputs: np.ndarray  # (b, M, 256, 256)
    has_mask_input: np.ndarray  # (b, N)

    @property
    def images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def prompts(self) -> int:
        return int(self.labels.shape[1])

    @classmethod
    def of(cls, embeddings: np.ndarray, prompts) -> "DecoderRequest":
        """One image's embedding (1, 256, 64, 64) and its `samtriton.serving.prompts.Prompts`."""
        return cls(embeddings, prompts.coords[None], prompts.labels[None], prompts.mask_inputs[None],
                   prompts.has_mask_input[None])

    def check(self, max_prompts: int, embeddings_from_arena: bool = False) -> "DecoderRequest":
        """Shapes, values and limits, each error naming the decoder input (a
        request sent to the decoder directly may be anything).  Embeddings read
        from the embedding arena came from the encoder, not a client: their
        values are not scanned."""
        emb, coords, labels = self.embeddings, self.coords, self.labels
        b = emb.shape[0] if emb.ndim == 4 else -1
        if emb.shape[1:] != spec.EMBEDDING_SHAPE or emb.dtype != np.float32:
            raise InvalidInput(spec.IMAGE_EMBEDDINGS_NAME, f"expected FP32 [b, 256, 64, 64], got {list(emb.shape)}")
        if labels.ndim != 3 or labels.shape[0] != b or labels.dtype != np.int32:
            raise InvalidInput(spec.PROMPT_LABELS_NAME, f"expected INT32 [{b}, N, T], got {list(labels.shape)}")
        n, t = labels.shape[1:]
        if coords.shape != (b, n, t, 2) or coords.dtype != np.float32:
            raise InvalidInput(spec.PROMPT_COORDS_NAME, f"expected FP32 {[b, n, t, 2]}, got {list(coords.shape)}")
        if n == 0 or t == 0:
            raise InvalidInput(spec.PROMPT_LABELS_NAME, "at least one prompt with one token is required")
        if b * n > max_prompts:
            raise InvalidInput(spec.PROMPT_LABELS_NAME, f"{b * n} prompts exceeds the limit of {max_prompts}")
        if not np.isin(labels, spec.TOKEN_LABELS).all():
            raise InvalidInput(spec.PROMPT_LABELS_NAME, f"labels must be among {list(spec.TOKEN_LABELS)}")
        if (labels == spec.LABEL_ABSENT).all(axis=2).any():
            raise InvalidInput(spec.PROMPT_LABELS_NAME, "a prompt has only filler tokens")
        if not np.isfinite(coords).all():
            raise InvalidInput(spec.PROMPT_COORDS_NAME, "has a NaN or infinite coordinate")
        if not embeddings_from_arena and not np.isfinite(emb).all():
            raise InvalidInput(spec.IMAGE_EMBEDDINGS_NAME, "has a NaN or infinite value")
        has, masks = self.has_mask_input, self.mask_inputs
        if has.shape != (b, n) or not np.isin(has, (0.0, 1.0)).all():
            raise InvalidInput(spec.HAS_MASK_INPUT_NAME, f"expected [{b}, {n}] of 0.0 / 1.0, got {list(has.shape)}")
        size = spec.LOW_RES_MASK_SIZE
        if (masks.ndim != 4 or masks.shape[0] != b or masks.shape[1] < 1 or masks.shape[2:] != (size, size)
                or masks.dtype != np.float32 or (has.any() and masks.shape[1] != n)):
            expected = f"[{b}, {n if has.any() else 'M >= 1'}, {size}, {size}]"
            raise InvalidInput(spec.MODEL_MASK_INPUTS_NAME, f"expected FP32 {expected}, got {list(masks.shape)}")
        if has.any() and not np.isfinite(masks).all():
            raise InvalidInput(spec.MODEL_MASK_INPUTS_NAME, "has a NaN or infinite value")
        return self


SINGLE_MASK_TOKENS = (0,)  # upstream's single-mask output
MULTIMASK_TOKENS = (1, 2, 3)  # upstream's multimask output, in its order


def mask_tokens(multimask: bool) -> tuple[int, ...]:
    return MULTIMASK_TOKENS if multimask else SINGLE_MASK_TOKENS


@dataclass(frozen=True)
class StackedCall:
    feeds: dict[str, np.ndarray]  # inputs of the CPU decoder graph
    spans: list[tuple[int, int]]  # each request's prompts among the call's
    tokens: tuple[int, ...]  # the mask tokens the call decodes


def _pad_tokens(request: DecoderRequest, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    b, n, t = request.labels.shape
    coords = request.coords.reshape(b * n, t, 2)
    labels = request.labels.reshape(b * n, t)
    if t == tokens:
        return coords, labels
    padded_coords = np.zeros((b * n, tokens, 2), np.float32)
    padded_labels = np.full((b * n, tokens), spec.LABEL_ABSENT, np.int32)
    padded_coords[:, :t] = coords
    padded_labels[:, :t] = labels
    return padded_coords, padded_labels


def stack(requests: list[DecoderRequest], multimask: list[bool]) -> StackedCall:
    """The feeds of one decoder call answering every request in `requests`.

    Only the mask tokens some request asks for are decoded: token 0 for
    single-mask requests, 1-3 for multimask ones, all four for a mix.
    """
    tokens = max(r.labels.shape[2] for r in requests)
    images = sum(r.images for r in requests)
    coords, labels, embeddings, sources, masks, mask_images = [], [], [], [], [], []
    spans, prompt_start, image_start, mask_start = [], 0, 0, 0
    for r in requests:
        b, n = r.images, r.prompts
        c, lab = _pad_tokens(r, tokens)
        coords.append(c)
        labels.append(lab)
        embeddings.append(r.embeddings)
        image_of_prompt = np.repeat(np.arange(image_start, image_start + b, dtype=np.int32), n)
        with_mask = r.has_mask_input.reshape(-1) > 0.5
        if with_mask.any():
            # Only the mask inputs in use enter the call, one per prompt that has one.
            used = r.mask_inputs.reshape(b * n, *r.mask_inputs.shape[2:])[with_mask]
            masks.append(used)
            mask_images.append(image_of_prompt[with_mask])
            rows = image_of_prompt.copy()
            rows[with_mask] = images + mask_start + np.arange(used.shape[0], dtype=np.int32)
            sources.append(rows)
            mask_start += used.shape[0]
        else:
            sources.append(image_of_prompt)
        spans.append((prompt_start, prompt_start + b * n))
        prompt_start += b * n
        image_start += b
    size = spec.LOW_RES_MASK_SIZE
    wanted = set(multimask)
    decoded = mask_tokens(multimask[0]) if len(wanted) == 1 else SINGLE_MASK_TOKENS + MULTIMASK_TOKENS
    feeds = {
        spec.IMAGE_EMBEDDINGS_NAME: concat(embeddings),
        spec.PROMPT_COORDS_NAME: concat(coords),
        spec.PROMPT_LABELS_NAME: concat(labels),
        spec.MASK_INPUTS.name: concat(masks) if masks else np.zeros((0, size, size), np.float32),
        spec.MASK_IMAGE_INDEX_NAME: concat(mask_images) if mask_images else np.zeros(0, np.int32),
        spec.PROMPT_SOURCE_INDEX_NAME: concat(sources),
        spec.MASK_TOKENS_NAME: np.array(decoded, np.int32),
    }
    return StackedCall(feeds, spans, decoded)


def select_candidates(low_res: np.ndarray, iou: np.ndarray, decoded: tuple[int, ...],
                      multimask: bool) -> tuple[np.ndarray, np.ndarray]:
    """From (..., len(decoded), 256, 256) and (..., len(decoded)) for the mask
    tokens `decoded`, what a request asked for: upstream's single-mask
    output (token 0, K = 1) or its multimask output (tokens 1-3, K = 3)."""
    wanted = mask_tokens(multimask)
    if tuple(decoded) == wanted:
        return low_res, iou
    at = [list(decoded).index(t) for t in wanted]
    chosen = slice(at[0], at[-1] + 1)  # consecutive in every layout `stack` decodes
    return low_res[..., chosen, :, :], iou[..., chosen]


def split(low_res: np.ndarray, iou: np.ndarray, call: StackedCall, requests: list[DecoderRequest],
          multimask: list[bool]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The call's (P, K, 256, 256) and (P, K) outputs -> per request (b, N, K', 256, 256), (b, N, K')."""
    out = []
    for (start, end), r, multi in zip(call.spans, requests, multimask):
        masks, scores = select_candidates(low_res[start:end], iou[start:end], call.tokens, multi)
        out.append((np.ascontiguousarray(masks).reshape(r.images, r.prompts, *masks.shape[1:]),
                    np.ascontiguousarray(scores).reshape(r.images, r.prompts, -1)))
    return out


def ragged_feeds(requests: list[DecoderRequest], tokens: int) -> dict[str, np.ndarray]:
    """What Triton's TensorRT backend feeds the GPU target's ragged decoder graph
    for `requests` (one image each): flat prompt tensors, one placeholder mask
    for a request without mask inputs, and the running element counts."""
    coords, labels, masks, has, label_counts, mask_counts = [], [], [], [], [], []
    for r in requests:
        if r.labels.shape[2] > tokens:
            raise ValueError(f"a prompt has {r.labels.shape[2]} tokens; the graph takes {tokens}")
        c, lab = _pad_tokens(r, tokens)
        coords.append(c.reshape(-1))
        labels.append(lab.reshape(-1))
        m = r.mask_inputs.reshape(-1)
        masks.append(m)
        has.append(r.has_mask_input.reshape(-1).astype(np.float32))
        label_counts.append(lab.size)
        mask_counts.append(m.size)
    return {
        spec.IMAGE_EMBEDDINGS_NAME: concat([r.embeddings for r in requests]),
        spec.PROMPT_COORDS_NAME: concat(coords),
        spec.PROMPT_LABELS_NAME: concat(labels),
        spec.MODEL_MASK_INPUTS_NAME: concat(masks),
        spec.HAS_MASK_INPUT_NAME: concat(has),
        spec.LABELS_ACCUMULATED_NAME: np.cumsum(label_counts).astype(np.int32),
        spec.MASKS_ACCUMULATED_NAME: np.cumsum(mask_counts).astype(np.int32),
    }


def _frame_geometry() -> Geometry:
    # An image that already fills the prompt frame: prompts stay as drawn.
    return Geometry(spec.PROMPT_SIZE, spec.PROMPT_SIZE, spec.PROMPT_SIZE, spec.PROMPT_SIZE)


def sample_requests(rng: np.random.Generator, images: np.ndarray | None = None) -> list[DecoderRequest]:
    """Decoder requests with every prompt kind, laid out by the preprocess's own
    `build_prompts`: boxes; points only (1 to 4 points, padded with -1);
    boxes with points and mask inputs; one click with a mask input.  They
    take turns on two images (`images`, random embeddings if None), each
    request carrying its own copy as it would through Triton."""
    size, geometry = spec.PROMPT_SIZE, _frame_geometry()
    if images is None:
        images = rng.standard_normal((2, *spec.EMBEDDING_SHAPE)).astype(np.float32)

    def boxes(n):
        xy0 = rng.uniform(0, size * 0.6, size=(n, 2))
        return np.concatenate([xy0, xy0 + rng.uniform(8, size * 0.4, size=(n, 2))], axis=1).astype(np.float32)

    def points(n, p):
        coords = rng.uniform(0, size - 1, size=(n, p, 2)).astype(np.float32)
        labels = rng.integers(0, 2, size=(n, p)).astype(np.int32)
        labels[:, 0] = 1
        for i in range(n):  # prompt i keeps i + 1 points, the rest is padding
            labels[i, i + 1:] = -1
        return coords, labels

    def masks(n):
        return (rng.standard_normal((n, spec.LOW_RES_MASK_SIZE, spec.LOW_RES_MASK_SIZE)) * 4).astype(np.float32)

    pts, labels = points(4, 4)
    both, both_labels = points(2, 3)
    click, click_labels = points(1, 1)
    prompt_sets = [
        (0, PromptInputs(boxes=boxes(3))),
        (1, PromptInputs(points=pts, point_labels=labels)),
        (0, PromptInputs(boxes=boxes(2), points=both, point_labels=both_labels, mask_inputs=masks(2))),
        (1, PromptInputs(points=click, point_labels=click_labels, mask_inputs=masks(1))),
    ]
    out = []
    for image, inputs in prompt_sets:
        out.append(DecoderRequest.of(images[image:image + 1], build_prompts(inputs, geometry)))
    return out
