"""Triton python model: encoded image + prompts -> image geometry, decoder tokens.

The image's size comes from its header (EXIF orientation applied): its
pixels are decoded by `image_embedding`, and only when its embedding is not
cached.  Each request is validated on its own: a bad image or bad prompts fail that
request with INVALID_ARG naming the field, and its batch-mates go on.  While
the server drains for shutdown, new requests are refused here (UNAVAILABLE),
the first step of every ensemble, so the ones in flight can finish.

Both ensembles call it: `sam` maps the prompt outputs and needs prompts;
`sam_encode` maps only the geometry, and its requests carry none.  Triton asks a step only for the outputs its ensemble maps,
which tells them apart.
"""

import os

import numpy as np

from samtriton import spec
from samtriton.serving.errors import InvalidInput, ShuttingDown
from samtriton.serving.preprocessing import PreprocessSettings, prepare_prompts
from samtriton.serving.prompts import PromptInputs
from samtriton.serving.request_parameters import multimask_output, requested_outputs
from samtriton.serving.triton_helpers import (
    ErrorResponses, input_array, model_parameters, optional_array, respond_each, tensor)


class TritonPythonModel:
    def initialize(self, args):
        self.error = ErrorResponses(args)
        # Set by `samtriton serve`: while the file exists, new requests are refused.
        self.drain_file = os.environ.get(spec.DRAIN_FILE_ENV)
        self.settings = PreprocessSettings.from_parameters(model_parameters(args))

    def _one(self, request):
        if self.drain_file and os.path.exists(self.drain_file):
            raise ShuttingDown("the server is shutting down; send the request to another replica or retry")
        # Fail bad parameters here, before the encoder spends time.
        requested_outputs(request.parameters())
        multimask_output(request.parameters())
        images = input_array(request, spec.IMAGE.name).reshape(-1)
        if images.size != 1:
            raise InvalidInput(spec.IMAGE.name, f"expected exactly one encoded image, got {images.size}")
        inputs = PromptInputs(*(optional_array(request, t.name) for t in spec.PROMPT_INPUTS))
        wants_prompts = spec.PROMPT_LABELS_NAME in request.requested_output_names()
        geometry, p = prepare_prompts(images[0], inputs if wants_prompts else None, self.settings)
        outputs = [tensor(spec.IMAGE_GEOMETRY.name, geometry.as_array())]
        if p is not None:
            outputs += [
                tensor(spec.PROMPT_COORDS_NAME, p.coords[np.newaxis]),
                tensor(spec.PROMPT_LABELS_NAME, p.labels[np.newaxis]),
                tensor(spec.MODEL_MASK_INPUTS_NAME, p.mask_inputs[np.newaxis]),
                tensor(spec.HAS_MASK_INPUT_NAME, p.has_mask_input[np.newaxis]),
            ]
        return outputs

    def execute(self, requests):
        return respond_each(requests, self._one, self.error)
