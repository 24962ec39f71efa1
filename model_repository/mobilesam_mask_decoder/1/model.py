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

A request's image embedding comes as the tensor `image_embeddings` or, from
the `sam` ensemble, as an `embedding_handle` to the slot of the embedding
arena where `image_embedding` keeps it (`samtriton.serving.embedding_arena`),
read in place.  Every slot read is reported back once the call is over,
whatever its outcome, so that `image_embedding` may reuse it; a slot reused
before then fails its request with UNAVAILABLE rather than answering it with
another image's masks.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from samtriton import spec
from samtriton.serving import decoder_batch
from samtriton.serving.embedding_arena import ArenaReader
from samtriton.serving.errors import EmbeddingGone, InvalidInput
from samtriton.serving.onnx_runtime import decode
from samtriton.serving.request_parameters import multimask_output
from samtriton.serving.triton_helpers import (ErrorResponses, input_array, model_parameters, optional_array,
                                              step_session, tensor)


class TritonPythonModel:
    def initialize(self, args):
        self.error = ErrorResponses(args)
        self.session = step_session(args)
        self.max_prompts = int(model_parameters(args)["max_boxes"])
        self.arena = ArenaReader()

    def _embeddings(self, request, readings: list):
        """The request's embeddings (b, 256, 64, 64); the arena slots they are read
        from are appended to `readings`."""
        handles = optional_array(request, spec.EMBEDDING_HANDLE.name)
        if handles is None:
            return input_array(request, spec.IMAGE_EMBEDDINGS_NAME)
        if pb_utils.get_input_tensor_by_name(request, spec.IMAGE_EMBEDDINGS_NAME) is not None:
            raise InvalidInput(spec.EMBEDDING_HANDLE.name, f"give {spec.IMAGE_EMBEDDINGS_NAME} or "
                               f"{spec.EMBEDDING_HANDLE.name}, not both")
        if handles.ndim != 2 or handles.shape[1:] != (3,):
            raise InvalidInput(spec.EMBEDDING_HANDLE.name, f"expected INT64 [b, 3], got {list(handles.shape)}")
        for h in handles:
            readings.append(self.arena.read(h))
        embeddings = [r.embedding for r in readings]
        return embeddings[0] if len(embeddings) == 1 else np.concatenate(embeddings)

    def _gather(self, request, readings: list):
        embeddings = self._embeddings(request, readings)
        inputs = decoder_batch.DecoderRequest(embeddings, *(input_array(request, name) for name in (
            spec.PROMPT_COORDS_NAME, spec.PROMPT_LABELS_NAME, spec.MODEL_MASK_INPUTS_NAME,
            spec.HAS_MASK_INPUT_NAME)))
        return inputs.check(self.max_prompts, embeddings_from_arena=bool(readings)), multimask_output(
            request.parameters())

    def execute(self, requests):
        responses = [None] * len(requests)
        members, batch, multimask, readings = [], [], [], []
        try:
            for i, request in enumerate(requests):
                read = []
                readings.append(read)
                try:
                    inputs, multi = self._gather(request, read)
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
                if not all([r.finish() for r in readings[i]]):
                    responses[i] = self.error(EmbeddingGone(
                        "the image's embedding was evicted while the decoder read it; retry"))
                    continue
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    tensor(spec.LOW_RES_MASKS_NAME, masks), tensor(spec.IOU_PREDICTIONS_NAME, scores)])
            return responses
        finally:  # every slot read is given back, whatever happened (finish() counts once)
            for read in readings:
                for r in read:
                    r.finish()
