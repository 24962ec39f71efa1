"""ONNX Runtime sessions for the encoder and decoder, and the calls the Triton models make.

Both the python-backend models and the in-process pipeline go through these
functions, so "served vs in-process" compares the same computation.
"""

from __future__ import annotations

import numpy as np

from samtriton import spec


def make_session(path: str, intra_op_threads: int = 0, inter_op_threads: int = 1, memory_arena: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = memory_arena
    opts.intra_op_num_threads = intra_op_threads  # 0: one per core
    opts.inter_op_num_threads = inter_op_threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def concat(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along the first axis, without copying when there is only one."""
    out = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    return np.ascontiguousarray(out)


def encode(session, pixel_values: np.ndarray) -> np.ndarray:
    """(B, 3, S, S) -> (B, 256, 64, 64)."""
    return session.run(None, {spec.PIXEL_VALUES_NAME: np.ascontiguousarray(pixel_values, dtype=np.float32)})[0]


def decode(session, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of several images in one call (`decoder_batch.stack`'s feeds) ->
    ((P, 4, 256, 256) logits, (P, 4) iou predictions), one per mask token."""
    low_res, iou = session.run([spec.LOW_RES_MASKS_NAME, spec.IOU_PREDICTIONS_NAME], feeds)
    return low_res, iou
