"""Triton python model: low-res logits -> masks at the original size, RLE, scores.

Only the outputs named in the request parameter `outputs` are computed (see
samtriton.serving.outputs): a scores-only request skips the resize, and
`masks` (N x H x W bytes) is built only when asked for.  It has no weights
and every variant's logits live in the same 1024 frame, so all the
variants' ensembles share this one model.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from samtriton import spec
from samtriton.serving.outputs import requested_outputs
from samtriton.serving.postprocessing import encode_rle, masks_from_logits
from samtriton.serving.preprocessing import Geometry
from samtriton.serving.triton_helpers import ErrorResponses, input_array, tensor


class TritonPythonModel:
    def initialize(self, args):
        self.error = ErrorResponses(args)

    def _one(self, request):
        wanted = requested_outputs(request.parameters())
        low_res = input_array(request, spec.LOW_RES_MASKS_NAME)
        low_res = low_res.reshape(-1, *low_res.shape[-2:])
        scores = input_array(request, spec.IOU_PREDICTIONS_NAME).reshape(-1).astype(np.float32, copy=False)
        geometry = Geometry.from_array(input_array(request, spec.IMAGE_GEOMETRY.name))
        outputs = []
        if spec.SCORES.name in wanted:
            outputs.append(tensor(spec.SCORES.name, scores))
        if wanted & {spec.MASKS.name, spec.MASKS_RLE.name}:
            masks = masks_from_logits(low_res, geometry)
            if spec.MASKS_RLE.name in wanted:
                outputs.append(tensor(spec.MASKS_RLE.name, np.array(encode_rle(masks), dtype=np.object_)))
            if spec.MASKS.name in wanted:
                outputs.append(tensor(spec.MASKS.name, masks.view(np.uint8)))
        return outputs

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._one(request)))
            except Exception as e:
                responses.append(self.error(e))
        return responses
