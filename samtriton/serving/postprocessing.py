"""Low-resolution mask logits -> binary masks at the original image size.

The upstream predictor upsamples the 256x256 logits bilinearly to the padded
prompt frame (1024 for every variant), crops the padding, resizes bilinearly to the original size
(`F.interpolate(..., mode="bilinear", align_corners=False)` both times) and
thresholds at 0.  Random-weight decoders produce high-frequency masks, so any
shortcut here (one resize instead of two, another interpolation) costs whole
percent of IoU; this module reproduces the two steps with torch's sampling
rule in numpy.  The crop is folded into the first step by computing only the
rows and columns that survive it.

The first step upsamples by a whole power of two (256 -> 1024, the same
for every variant), where torch's source coordinate is exact and the two
taps repeat every `factor` outputs: each axis is `factor` strided
multiply-adds over shifted slices, two products an output instead of a dense
matrix's 256-long dot product, no gathers, no BLAS threads to share with the
decoder's process (one 683x1024 mask: 0.9 ms against 3.8 ms for the matrix
products on one core of the machine in perf/README.md).  The second step maps to an
arbitrary, possibly large, output and runs as two-tap gathers, skipped when the
size does not change.

`masks_from_logits` works with the two image axes swapped: its (N, H, W)
answer is then a view whose memory is column-major per mask, the layout COCO
RLE encodes from, so `encode_rle` reads it without a copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from samtriton import spec
from samtriton.serving.decoder_batch import select_candidates
from samtriton.serving.prompts import Geometry
from samtriton.spec import PROMPT_SIZE

MASK_THRESHOLD = 0.0
# Masks resized per chunk, to bound the float32 temporaries to a few hundred MB.
_CHUNK_ELEMENTS = 48 * 1024 * 1024


@dataclass(frozen=True)
class Taps:
    """Two-tap linear interpolation along one axis: out[i] = w0[i]*x[i0[i]] + w1[i]*x[i1[i]]."""

    i0: np.ndarray
    i1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray


def bilinear_taps(in_size: int, out_size: int, keep: int | None = None) -> Taps:
    """torch's bilinear rule (align_corners=False, no antialias) for one axis.

    `keep` computes only the first `keep` outputs (the crop after upsampling).
    The arithmetic is float32, as torch's CPU kernel does it for float input.
    """
    keep = out_size if keep is None else keep
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(keep, dtype=np.float32)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    return Taps(i0, i1, w0, w1)


def _along(x: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def _periodic_factor(in_size: int, out_size: int) -> int:
    """The upsampling factor, a power of two: there torch's taps repeat exactly."""
    factor, rest = divmod(out_size, in_size)
    # Block 1 (the taps read there) must be clear of both edges: 3 inputs at least.
    if rest or factor < 2 or factor & (factor - 1) or in_size < 3:
        raise ValueError(f"upsampling {in_size} -> {out_size}: only whole power-of-two factors are supported")
    return factor


def _upsample_axis(x: np.ndarray, axis: int, factor: int, keep: int) -> np.ndarray:
    """x upsampled `factor` (a power of two) times along `axis` by torch's rule, the first `keep` outputs.

    Output j*factor + r mixes inputs j-1 and j, or j and j+1, with weights that depend on r only;
    they are read from `bilinear_taps` at block 1, clear of the edges.  The input is padded with
    its edge values, which is torch's clamping at the right edge; at the left edge torch clamps the
    source coordinate itself, so those outputs are the first input exactly.
    """
    n = x.shape[axis]
    blocks = -(-keep // factor)
    taps = bilinear_taps(n, n * factor, keep=2 * factor)
    padded = np.concatenate([_along(x, axis, 0, 1), x, _along(x, axis, n - 1, n)], axis=axis)
    shape = list(x.shape)
    shape[axis:axis + 1] = [blocks, factor]
    out = np.empty(shape, dtype=np.float32)
    phase = [slice(None)] * out.ndim
    for r in range(factor):
        k = factor + r
        first = int(taps.i0[k])  # block 1 reads input 0 (taps j-1, j) or 1 (taps j, j+1): padded j+0 or j+1
        phase[axis + 1] = r
        o = out[tuple(phase)]
        np.multiply(_along(padded, axis, first, first + blocks), taps.w0[k], out=o)
        o += _along(padded, axis, first + 1, first + 1 + blocks) * taps.w1[k]
        if first == 0:
            _along(o, axis, 0, 1)[...] = _along(x, axis, 0, 1)
    shape = list(x.shape)
    shape[axis] = blocks * factor
    return _along(out.reshape(shape), axis, 0, keep)


def _to_frame(low_res: np.ndarray, frame_size: int, keep_rows: int, keep_cols: int) -> np.ndarray:
    """(n, h, w) logits -> (n, keep_rows, keep_cols): the top-left of their upsampling to the frame."""
    _, h, w = low_res.shape
    # Rows first, while the rows are still 256 wide.
    rows = _upsample_axis(low_res, 1, _periodic_factor(h, frame_size), keep_rows)
    return _upsample_axis(rows, 2, _periodic_factor(w, frame_size), keep_cols)


def _resize(x: np.ndarray, rows: Taps, cols: Taps) -> np.ndarray:
    """(N, H, W) -> (N, len(rows), len(cols)); width pass first, as torch's kernel nests it."""
    x = x[:, :, cols.i0] * cols.w0 + x[:, :, cols.i1] * cols.w1
    return x[:, rows.i0, :] * rows.w0[:, None] + x[:, rows.i1, :] * rows.w1[:, None]


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
    """(N, 256, 256) float32 logits -> yields (start, (n, H, W) float32 logits at the original size), a few masks
    at a time so the temporaries stay bounded.  `transposed`: (n, W, H) instead, computed as such."""
    g = geometry
    low_res = low_res.astype(np.float32, copy=False)
    in_rows, in_cols, out_rows, out_cols = g.input_h, g.input_w, g.original_h, g.original_w
    if transposed:  # a small copy (256 x 256 a mask): the passes read it row by row
        low_res = np.ascontiguousarray(low_res.transpose(0, 2, 1))
        in_rows, in_cols, out_rows, out_cols = in_cols, in_rows, out_cols, out_rows
    same_size = (in_rows, in_cols) == (out_rows, out_cols)
    if not same_size:
        down_rows, down_cols = bilinear_taps(in_rows, out_rows), bilinear_taps(in_cols, out_cols)

    per_mask = max(in_rows * in_cols, out_rows * out_cols)
    chunk = max(1, _CHUNK_ELEMENTS // per_mask)
    for start in range(0, low_res.shape[0], chunk):
        # Step 1: low-res -> the padded prompt frame, cropped to the resized image.
        part = _to_frame(low_res[start : start + chunk], frame_size, in_rows, in_cols)
        if not same_size:  # step 2: resized image -> original size
            part = _resize(part, down_rows, down_cols)
        yield start, part


def masks_from_logits(low_res: np.ndarray, geometry: Geometry, frame_size: int = PROMPT_SIZE) -> np.ndarray:
    """(N, 256, 256) float32 logits -> (N, H, W) bool masks at the original size, stored column-major
    per mask (a transposed view: what `encode_rle` reads without a copy)."""
    out = np.empty((low_res.shape[0], geometry.original_w, geometry.original_h), dtype=bool)
    for start, part in upscaled_logits(low_res, geometry, frame_size, transposed=True):
        np.greater(part, MASK_THRESHOLD, out=out[start : start + part.shape[0]])
    return out.transpose(0, 2, 1)


def encode_rle(masks: np.ndarray) -> list[bytes]:
    """(N, H, W) bool -> one COCO compressed RLE per mask, as JSON bytes {"size": [h, w], "counts": str}."""
    from pycocotools import mask as mask_utils

    out = []
    # One mask a call: each mask of masks_from_logits' answer is column-major already, so
    # asfortranarray is a view; another array is copied one mask at a time, never as a whole stack
    # (segment-everything encodes a hundred full-size masks at once).
    for mask in masks:
        r = mask_utils.encode(np.asfortranarray(mask).view(np.uint8))
        out.append(json.dumps({"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}).encode())
    return out


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


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each pair of (N, ...) bool masks; two empty masks count as equal (1.0)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    union = (a | b).sum(axis=1)
    return np.where(union > 0, (a & b).sum(axis=1) / np.maximum(union, 1), 1.0)
