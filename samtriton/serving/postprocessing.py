"""Low-resolution mask logits -> binary masks at the original image size.

The upstream predictor upsamples the 256x256 logits bilinearly to the padded
prompt frame (1024 for every variant), crops the padding, resizes bilinearly to the original size
(`F.interpolate(..., mode="bilinear", align_corners=False)` both times) and
thresholds at 0.  Random-weight decoders produce high-frequency masks, so any
shortcut here (one resize instead of two, another interpolation) costs whole
percent of IoU; this module runs the same two steps in OpenCV's `resize`
(INTER_LINEAR), whose sampling rule is torch's: half-pixel centres, the
source coordinate clamped at the edges, two taps an axis, no antialiasing.
The values agree with torch's to float32 rounding (tests/test_processing.py).

OpenCV is what makes a cache hit cheap: one 683x1024 mask takes 0.8 ms in it
against 5.4-8.9 ms for numpy's strided multiply-adds, which this module used
before, on one core of the Intel Xeon in perf/README.md.  It runs on one
thread: the postprocess shares the cores with the encoder's and decoder's
processes.

The first step upsamples by a whole power of two (256 -> 1024), where
torch's float32 source coordinates are exact and so equal OpenCV's double
ones; any other ratio is refused rather than approximated.  The crop is
folded into it: only the low-res rows and columns the kept outputs read are
upsampled, with the same exact factor, which leaves those outputs unchanged.

`masks_from_logits` works with the two image axes swapped by default: its
(N, H, W) answer is then a view whose memory is column-major per mask, the
layout COCO RLE encodes from, so `encode_rle` reads it without a copy.  Masks
that leave as arrays are computed row-major instead.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from samtriton import spec
from samtriton.serving.decoder_batch import select_candidates
from samtriton.serving.prompts import Geometry
from samtriton.spec import PROMPT_SIZE

MASK_THRESHOLD = 0.0


@functools.cache
def _opencv():
    import cv2

    cv2.setNumThreads(1)
    return cv2


def _frame_factor(in_size: int, out_size: int) -> int:
    """The upsampling factor to the prompt frame: a whole power of two, where torch's source coordinates are exact."""
    factor, rest = divmod(out_size, in_size)
    if rest or factor < 2 or factor & (factor - 1):
        raise ValueError(f"upsampling {in_size} -> {out_size}: only whole power-of-two factors are supported")
    return factor


def _read_by_first(keep: int, factor: int, size: int) -> int:
    """How many leading inputs the first `keep` outputs of a `factor`-times upsampling read: output
    k reads inputs floor((k + 0.5) / factor - 0.5) and the one after it."""
    return min(size, -(-keep // factor) + 1)


def candidates(low_res: np.ndarray, iou: np.ndarray, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
    """One request's decoder outputs [1, N, K, 256, 256], [1, N, K] -> the (N, K',
    256, 256), (N, K') candidates it asked for: the CPU decoder already sent
    them (K = 1, or 3 for multimask); a TensorRT engine sends all four mask
    tokens (K = 4) and they are picked here."""
    low_res = low_res.reshape(-1, *low_res.shape[-3:])
    iou = iou.reshape(-1, iou.shape[-1])
    k = iou.shape[1]
    if k == spec.NUM_MASK_TOKENS:
        return select_candidates(low_res, iou, tuple(range(spec.NUM_MASK_TOKENS)), multimask)
    if k != (3 if multimask else 1) or low_res.shape[1] != k:
        raise ValueError(f"the decoder sent {k} candidates per prompt for multimask_output={multimask}")
    return low_res, iou


def upscaled_logits(low_res: np.ndarray, geometry: Geometry, frame_size: int = PROMPT_SIZE,
                    transposed: bool = False):
    """(N, h, w) float32 logits -> yields (i, (1, H, W) float32 logits of mask i at the original size), one
    mask at a time so the temporaries stay one mask's.  `transposed`: (1, W, H) instead, computed as such."""
    cv2 = _opencv()
    g = geometry
    low_res = low_res.astype(np.float32, copy=False)
    in_rows, in_cols, out_rows, out_cols = g.input_h, g.input_w, g.original_h, g.original_w
    if transposed:  # a small copy (256 x 256 a mask)
        low_res = np.ascontiguousarray(low_res.transpose(0, 2, 1))
        in_rows, in_cols, out_rows, out_cols = in_cols, in_rows, out_cols, out_rows
    _, h, w = low_res.shape
    row_factor, col_factor = _frame_factor(h, frame_size), _frame_factor(w, frame_size)
    # Step 1 reads only the low-res rows and columns the crop keeps: upsampling those by the
    # same exact factor gives the kept outputs unchanged.
    rows, cols = _read_by_first(in_rows, row_factor, h), _read_by_first(in_cols, col_factor, w)
    frame = (cols * col_factor, rows * row_factor)  # OpenCV's sizes are (width, height)
    same_size = (in_rows, in_cols) == (out_rows, out_cols)
    for i in range(low_res.shape[0]):
        # Step 1: low-res -> the padded prompt frame, cropped to the resized image.
        part = cv2.resize(low_res[i, :rows, :cols], frame, interpolation=cv2.INTER_LINEAR)[:in_rows, :in_cols]
        if not same_size:  # step 2: resized image -> original size
            part = cv2.resize(part, (out_cols, out_rows), interpolation=cv2.INTER_LINEAR)
        yield i, part[np.newaxis]


def masks_from_logits(low_res: np.ndarray, geometry: Geometry, frame_size: int = PROMPT_SIZE,
                      column_major: bool = True) -> np.ndarray:
    """(N, 256, 256) float32 logits -> (N, H, W) bool masks at the original size.

    `column_major`: stored column-major per mask (a transposed view: what `encode_rle` reads
    without a copy); otherwise C-contiguous, computed as such, for answers sent or handed over as
    arrays (five 683x1024 masks: 2.0 ms, against 3.5 ms column-major and 2.6 ms more to make
    those contiguous, on the Intel Xeon of perf/README.md).
    """
    h, w = geometry.original_h, geometry.original_w
    out = np.empty((low_res.shape[0], w, h) if column_major else (low_res.shape[0], h, w), dtype=bool)
    for i, part in upscaled_logits(low_res, geometry, frame_size, transposed=column_major):
        np.greater(part, MASK_THRESHOLD, out=out[i : i + 1])
    return out.transpose(0, 2, 1) if column_major else out


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(..., H, W) bool -> (..., H, ceil(W / 8)) uint8: each row's pixels 8 to a byte, the first
    in the highest bit (`spec.MASKS_PACKED`).  Row-major masks pack fastest (five 683x1024
    masks: 0.4 ms on the Intel Xeon of perf/README.md)."""
    return np.packbits(masks, axis=-1)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of `pack_masks`: (..., H, ceil(W / 8)) uint8 and W -> (..., H, W) bool."""
    if packed.dtype != np.uint8 or packed.ndim < 2 or packed.shape[-1] != -(-width // 8):
        raise ValueError(f"packed masks {packed.dtype} {list(packed.shape)} do not hold rows of {width} pixels")
    return np.unpackbits(packed, axis=-1, count=width).view(bool)


def encode_rle(masks: np.ndarray) -> list[bytes]:
    """(N, H, W) bool -> one COCO compressed RLE per mask, as JSON bytes {"size": [h, w], "counts": str}."""
    from pycocotools import mask as mask_utils

    out = []
    # One mask a call: each mask of masks_from_logits' answer is column-major already, so
    # asfortranarray is a view; another array is copied one mask at a time, never as a whole stack
    # (segment-everything encodes a hundred full-size masks at once).
    for mask in masks:
        r = mask_utils.encode(np.asfortranarray(mask).view(np.uint8))
        out.append(_rle_json(r["size"], r["counts"]))
    return out


def _rle_json(size, counts: bytes) -> bytes:
    """`json.dumps({"size": size, "counts": counts.decode()}).encode()`, byte for byte, without
    json's per-character escape scan (0.8 ms for a random 683x1024 mask's 350,000 characters):
    COCO's compressed counts are characters 48-111 ('0'-'o'), where the backslash is the only
    character JSON escapes."""
    return b'{"size": [%d, %d], "counts": "%s"}' % (int(size[0]), int(size[1]), counts.replace(b"\\", b"\\\\"))


def decode_rle(encoded: list[bytes | str]) -> np.ndarray:
    """Inverse of `encode_rle`: JSON COCO RLEs, all of one size -> (N, H, W) bool, column-major per
    mask (the layout RLE decodes to; `np.ascontiguousarray` gives a row-major copy)."""
    from pycocotools import mask as mask_utils

    rles = []
    for item in encoded:
        rle = json.loads(item)
        rles.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].encode("ascii")})
    if not rles:
        return np.zeros((0, 0, 0), dtype=bool)
    h, w = rles[0]["size"]
    if any(r["size"] != [h, w] for r in rles):
        raise ValueError(f"RLE masks of different sizes: {sorted({tuple(r['size']) for r in rles})}")
    out = np.empty((len(rles), w, h), dtype=bool)
    # One mask a call, into the answer's own memory: given the list, pycocotools builds an (h, w, N)
    # uint8 stack that the bool answer then copies (5 random-weight 683x1024 masks: 3.3 ms against
    # 2.9 this way).  Its (h, w) column-major answer, transposed, has out[i]'s layout: a plain copy.
    for i, rle in enumerate(rles):
        out[i] = mask_utils.decode(rle).T.view(bool)
    return out.transpose(0, 2, 1)


def warm_up(geometry: Geometry = Geometry(768, 1024, 768, 1024), masks: int = 4, rounds: int = 2) -> None:
    """Run both mask layouts and the RLE encoding on made-up logits, so that a process pays OpenCV's
    and pycocotools' imports and first calls, and its heap's first growth, before its first request
    (the postprocess's first two requests after a start took 38-103 ms, against 11-14 ms after)."""
    ramp = np.linspace(-1.0, 1.0, spec.LOW_RES_MASK_SIZE, dtype=np.float32)
    low_res = np.broadcast_to(ramp[np.newaxis, np.newaxis, :] * ramp[np.newaxis, :, np.newaxis],
                              (masks, spec.LOW_RES_MASK_SIZE, spec.LOW_RES_MASK_SIZE))
    for _ in range(rounds):
        encode_rle(masks_from_logits(low_res, geometry))
        masks_from_logits(low_res, geometry, column_major=False)


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each pair of (N, ...) bool masks; two empty masks count as equal (1.0)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    union = (a | b).sum(axis=1)
    return np.where(union > 0, (a & b).sum(axis=1) / np.maximum(union, 1), 1.0)
