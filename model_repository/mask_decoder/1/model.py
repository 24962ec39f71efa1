"""Triton python model: the ONNX box mask decoder in an ONNX Runtime session (CPU target).

All requests handed to one `execute()` are decoded in one session call: their
embeddings are stacked, every box carries the index of its request's image,
and the outputs are split back per request.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from samtriton import spec
from samtriton.serving.onnx_runtime import decode
from samtriton.serving.triton_helpers import error_response, input_array, onnx_session, tensor


class TritonPythonModel:
    def initialize(self, args):
        self.session = onnx_session(args)

    def execute(self, requests):
        embeddings, boxes, index, counts = [], [], [], []
        try:
            for request in requests:
                req_boxes = input_array(request, spec.MODEL_BOXES.name)
                index.append(np.full(req_boxes.shape[0], len(embeddings), dtype=np.int32))
                embeddings.append(input_array(request, spec.IMAGE_EMBEDDINGS_NAME).reshape(-1, *spec.EMBEDDING_SHAPE))
                boxes.append(req_boxes)
                counts.append(req_boxes.shape[0])
            low_res, iou = decode(
                self.session, np.concatenate(embeddings), np.concatenate(boxes), np.concatenate(index)
            )
        except Exception as e:
            return [error_response(e, "mask_decoder") for _ in requests]
        responses = []
        start = 0
        for n in counts:
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        tensor(spec.LOW_RES_MASKS.name, low_res[start : start + n]),
                        tensor(spec.IOU_PREDICTIONS.name, iou[start : start + n]),
                    ]
                )
            )
            start += n
        return responses
