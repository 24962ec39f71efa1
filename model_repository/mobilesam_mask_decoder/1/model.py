"""Triton python model: the ONNX prompt mask decoder in ONNX Runtime or OpenVINO (CPU target).

Triton's dynamic batcher, with ragged batching on the prompt tensors, hands
requests with different prompt counts, token counts, prompt kinds and mask
inputs to one `execute()`.  They are decoded in one session call
(`samtriton.serving.decoder_batch`): prompts are padded to the longest with
filler tokens the graph leaves out of attention, each prompt points at its
image (and mask input), and the outputs are split back per request with the
candidates it asked for (request parameter `multimask_output`).  A request
that is unusable (possible when the model is called directly rather than
through the ensemble) gets INVALID_ARG on its own and leaves the rest of the
batch alone.
"""

import triton_python_backend_utils as pb_utils

from samtriton import spec
from samtriton.serving import decoder_batch
from samtriton.serving.onnx_runtime import decode
from samtriton.serving.request_parameters import multimask_output
from samtriton.serving.triton_helpers import ErrorResponses, input_array, model_parameters, step_session, tensor


class TritonPythonModel:
    def initialize(self, args):
        self.error = ErrorResponses(args)
        self.session = step_session(args)
        self.max_prompts = int(model_parameters(args)["max_boxes"])

    def _gather(self, request) -> tuple[decoder_batch.DecoderRequest, bool]:
        inputs = decoder_batch.DecoderRequest(*(input_array(request, name) for name in (
            spec.IMAGE_EMBEDDINGS_NAME, spec.PROMPT_COORDS_NAME, spec.PROMPT_LABELS_NAME,
            spec.MODEL_MASK_INPUTS_NAME, spec.HAS_MASK_INPUT_NAME)))
        return inputs.check(self.max_prompts), multimask_output(request.parameters())

    def execute(self, requests):
        responses = [None] * len(requests)
        members, batch, multimask = [], [], []
        for i, request in enumerate(requests):
            try:
                inputs, multi = self._gather(request)
            except Exception as e:
                responses[i] = self.error(e)
                continue
            members.append(i)
            batch.append(inputs)
            multimask.append(multi)
        if not members:
            return responses
        try:
            call = decoder_batch.stack(batch, multimask)
            low_res, iou = decode(self.session, call.feeds)
            answers = decoder_batch.split(low_res, iou, call, batch, multimask)
        except Exception as e:
            for i in members:
                responses[i] = self.error(e)
            return responses
        for i, (masks, scores) in zip(members, answers):
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                tensor(spec.LOW_RES_MASKS_NAME, masks), tensor(spec.IOU_PREDICTIONS_NAME, scores)])
        return responses
