"""Triton python model: low-res logits -> masks at the original size, RLE, scores.

Only the outputs named in the request parameter `outputs` are computed (see
samtriton.serving.request_parameters): a scores-only request skips the
resize, and `masks` (N x H x W bytes) and `masks_packed` (its bits) are built
only when asked for.  With
`multimask_output` every output has one more axis, the three candidates of
each prompt.  It has no weights and every variant's logits live in the same
1024 frame, so all the variants' ensembles share this one model.
"""

import numpy as np

from samtriton import spec
from samtriton.serving.allocator import keep_freed_heap
from samtriton.serving.postprocessing import candidates, encode_rle, masks_from_logits, pack_masks, warm_up
from samtriton.serving.prompts import Geometry
from samtriton.serving.request_parameters import multimask_output, requested_outputs
from samtriton.serving.triton_helpers import ErrorResponses, input_array, respond_each, tensor


class TritonPythonModel:
    def initialize(self, args):
        self.error = ErrorResponses(args)
        # Its per-request temporaries (a few MB a mask) reuse freed heap instead of fresh pages.
        keep_freed_heap()
        # At load, not on the first clients' requests.
        warm_up()

    def _one(self, request):
        wanted = requested_outputs(request.parameters())
        multimask = multimask_output(request.parameters())
        low_res, scores = candidates(input_array(request, spec.LOW_RES_MASKS_NAME),
                                     input_array(request, spec.IOU_PREDICTIONS_NAME), multimask)
        geometry = Geometry.from_array(input_array(request, spec.IMAGE_GEOMETRY.name))
        # [N] per output for one candidate per prompt, [N, 3] for multimask.
        prompts_shape = scores.shape if multimask else scores.shape[:1]
        outputs = []
        if spec.SCORES.name in wanted:
            outputs.append(tensor(spec.SCORES.name, scores.reshape(prompts_shape)))
        if spec.LOW_RES_LOGITS.name in wanted:
            outputs.append(tensor(spec.LOW_RES_LOGITS.name, low_res))
        if spec.IMAGE_SIZE.name in wanted:
            outputs.append(tensor(spec.IMAGE_SIZE.name, np.array([geometry.original_h, geometry.original_w],
                                                                 dtype=np.int32)))
        if wanted & {spec.MASKS.name, spec.MASKS_PACKED.name, spec.MASKS_RLE.name}:
            # Column-major when RLE-encoded, row-major (the wire's layout) when only sent as arrays.
            rle = spec.MASKS_RLE.name in wanted
            masks = masks_from_logits(low_res.reshape(-1, *low_res.shape[2:]), geometry, column_major=rle)
            if rle:
                rles = np.array(encode_rle(masks), dtype=np.object_).reshape(prompts_shape)
                outputs.append(tensor(spec.MASKS_RLE.name, rles))
            if spec.MASKS_PACKED.name in wanted:
                packed = pack_masks(masks)
                outputs.append(tensor(spec.MASKS_PACKED.name, packed.reshape(*prompts_shape, *packed.shape[1:])))
            if spec.MASKS.name in wanted:
                outputs.append(tensor(spec.MASKS.name, np.ascontiguousarray(
                    masks.view(np.uint8).reshape(*prompts_shape, *masks.shape[1:]))))
        return outputs

    def execute(self, requests):
        return respond_each(requests, self._one, self.error)
