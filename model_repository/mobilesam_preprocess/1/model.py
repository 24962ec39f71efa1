"""Triton python model: encoded image + boxes -> encoder input, boxes in its frame, geometry.

Each request is validated on its own: a bad image or bad boxes fail that
request with INVALID_ARG naming the field, and its batch-mates go on.  While
the server drains for shutdown, new requests are refused here (UNAVAILABLE),
the first step of every ensemble, so the ones in flight can finish.
"""

import os

import numpy as np
import triton_python_backend_utils as pb_utils

from samtriton import spec
from samtriton.serving.errors import InvalidInput, ShuttingDown
from samtriton.serving.outputs import requested_outputs
from samtriton.serving.preprocessing import PreprocessSettings, preprocess
from samtriton.serving.triton_helpers import ErrorResponses, input_array, model_parameters, tensor


class TritonPythonModel:
    def initialize(self, args):
        self.error = ErrorResponses(args)
        # Set by `samtriton serve`: while the file exists, new requests are refused.
        self.drain_file = os.environ.get(spec.DRAIN_FILE_ENV)
        self.settings = PreprocessSettings.from_parameters(model_parameters(args))

    def _one(self, request):
        if self.drain_file and os.path.exists(self.drain_file):
            raise ShuttingDown("the server is shutting down; send the request to another replica or retry")
        # Fail a bad `outputs` parameter here, before the encoder spends seconds.
        requested_outputs(request.parameters())
        images = input_array(request, spec.IMAGE.name).reshape(-1)
        if images.size != 1:
            raise InvalidInput(spec.IMAGE.name, f"expected exactly one encoded image, got {images.size}")
        # Absent for `sam_encode` requests (the `sam` ensemble requires it).
        box_tensor = pb_utils.get_input_tensor_by_name(request, spec.BOXES.name)
        boxes = None if box_tensor is None else box_tensor.as_numpy()
        out = preprocess(images[0], boxes, self.settings)
        return [
            tensor(spec.PIXEL_VALUES_NAME, out.pixel_values[np.newaxis]),
            tensor(spec.MODEL_BOXES_NAME, out.model_boxes[np.newaxis]),
            tensor(spec.IMAGE_GEOMETRY.name, out.geometry.as_array()),
        ]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._one(request)))
            except Exception as e:  # one response per request, whatever happens
                responses.append(self.error(e))
        return responses
