"""Triton python model: the ONNX image encoder in ONNX Runtime or OpenVINO (CPU target).

Triton's dynamic batcher hands several requests to one `execute()`; their
images go through the encoder in one session call (the graph has a dynamic
batch axis) and the embeddings are split back per request.
"""

import triton_python_backend_utils as pb_utils

from samtriton import spec
from samtriton.serving.onnx_runtime import concat, encode
from samtriton.serving.triton_helpers import ErrorResponses, input_array, step_session, tensor


class TritonPythonModel:
    def initialize(self, args):
        self.error = ErrorResponses(args)
        self.session = step_session(args)

    def execute(self, requests):
        try:
            batches = [input_array(request, spec.PIXEL_VALUES_NAME) for request in requests]
            embeddings = encode(self.session, concat(batches))
        except Exception as e:
            return [self.error(e) for _ in requests]
        responses = []
        start = 0
        for batch in batches:
            part = embeddings[start : start + batch.shape[0]]
            start += batch.shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor(spec.IMAGE_EMBEDDINGS_NAME, part)]))
        return responses
