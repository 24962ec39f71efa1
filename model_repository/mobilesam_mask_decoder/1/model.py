"""Triton python model: the ONNX box mask decoder in an ONNX Runtime session (CPU target).

Triton's dynamic batcher, with ragged batching on `model_boxes`, hands
requests with different box counts to one `execute()`.  They are decoded in
one session call: their embeddings are stacked, every box carries the index
of its image, and the outputs are split back per request.  A request that is
unusable (possible when the model is called directly rather than through the
ensemble) gets INVALID_ARG on its own and leaves the rest of the batch alone.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from samtriton import spec
from samtriton.serving.errors import InvalidInput
from samtriton.serving.onnx_runtime import decode
from samtriton.serving.triton_helpers import (
    ErrorResponses,
    input_array,
    model_parameters,
    onnx_session,
    stack,
    tensor,
)


class TritonPythonModel:
    def initialize(self, args):
        self.error = ErrorResponses(args)
        self.session = onnx_session(args)
        self.max_boxes = int(model_parameters(args)["max_boxes"])

    def _gather(self, request):
        """(embeddings [b, 256, 64, 64], boxes [b, n, 4]) of one request, checked."""
        embeddings = input_array(request, spec.IMAGE_EMBEDDINGS_NAME)
        boxes = input_array(request, spec.MODEL_BOXES_NAME)
        field = spec.MODEL_BOXES_NAME
        if boxes.ndim != 3 or boxes.shape[0] != embeddings.shape[0] or boxes.shape[2] != 4:
            raise InvalidInput(field, f"expected [{embeddings.shape[0]}, N, 4], got {list(boxes.shape)}")
        if boxes.shape[1] == 0:
            raise InvalidInput(field, "at least one box is required")
        if boxes.shape[0] * boxes.shape[1] > self.max_boxes:
            raise InvalidInput(field, f"{boxes.shape[0] * boxes.shape[1]} boxes exceeds the limit of {self.max_boxes}")
        if not np.isfinite(boxes).all():
            raise InvalidInput(field, "has a NaN or infinite coordinate")
        if not np.isfinite(embeddings).all():
            raise InvalidInput(spec.IMAGE_EMBEDDINGS_NAME, "has a NaN or infinite value")
        return embeddings, boxes

    def execute(self, requests):
        responses = [None] * len(requests)
        embeddings, boxes, index, members = [], [], [], []
        image_offset = 0
        for i, request in enumerate(requests):
            try:
                emb, req_boxes = self._gather(request)
            except Exception as e:
                responses[i] = self.error(e)
                continue
            images, per_image = req_boxes.shape[0], req_boxes.shape[1]
            # Every box points at its own image among all stacked embeddings.
            index.append(np.repeat(np.arange(image_offset, image_offset + images, dtype=np.int32), per_image))
            image_offset += images
            embeddings.append(emb)
            boxes.append(req_boxes.reshape(-1, 4))
            members.append((i, images, per_image))
        if members:
            try:
                low_res, iou = decode(self.session, stack(embeddings), stack(boxes), stack(index))
            except Exception as e:
                for i, _, _ in members:
                    responses[i] = self.error(e)
                return responses
            start = 0
            for i, images, per_image in members:
                n = images * per_image
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[
                        tensor(
                            spec.LOW_RES_MASKS_NAME,
                            low_res[start : start + n].reshape(images, per_image, *low_res.shape[1:]),
                        ),
                        tensor(spec.IOU_PREDICTIONS_NAME, iou[start : start + n].reshape(images, per_image)),
                    ]
                )
                start += n
        return responses
