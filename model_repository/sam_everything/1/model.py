"""Triton python model: segment everything, as the upstream automatic mask generator does it.

It drives this variant's own models through Triton's BLS API: the whole image
goes to `image_embedding`, so the embedding cache `sam` requests fill applies
(a second request for the same image runs no encoder), each crop to the
`image_encoder`, where Triton's dynamic batching batches them;
the prompts go to the `mask_decoder` in small requests (8 prompts, one in
flight: the model's parameters), batched with other clients' requests.
Between decoder requests it checks whether the client cancelled (gRPC
cancellation or deadline) and stops.
The filtering is numpy (`samtriton.serving.automatic_masks`): no torch here.

Request parameters: the upstream generator's (points_per_side, pred_iou_thresh,
...), validated with INVALID_ARG naming the parameter; any other name is
refused, so a misspelt knob cannot silently fall back to its default.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from samtriton import spec
from samtriton.serving import automatic_masks as am
from samtriton.serving.errors import InvalidInput, ShuttingDown
from samtriton.serving.everything import (
    STAGES,
    Cancelled,
    EverythingSettings,
    Timings,
    output_arrays,
    segment_everything,
)
from samtriton.serving.postprocessing import candidates
from samtriton.serving.request_parameters import MULTIMASK_PARAMETER
from samtriton.serving.triton_helpers import (
    ErrorResponses,
    StepFailed,
    bls_output,
    input_array,
    model_parameters,
    optional_array,
    tensor,
)


class TritonPythonModel:
    def initialize(self, args):
        self.error = ErrorResponses(args)
        params = model_parameters(args)
        self.settings = EverythingSettings.from_parameters(params)
        self.encoder_name, self.decoder_name = params["image_encoder"], params["mask_decoder"]
        self.embedding_name = params["image_embedding"]
        self.drain_file = os.environ.get(spec.DRAIN_FILE_ENV)
        # Outputs in CPU memory whatever the step's device (a TensorRT engine answers on the GPU).
        self.cpu = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        labels = {"model": args["model_name"]}
        self._seconds = pb_utils.MetricFamily(
            name=spec.EVERYTHING_SECONDS_METRIC, kind=pb_utils.MetricFamily.COUNTER,
            description="seconds sam_everything spent per stage (image, encoder, decoder, filtering)")
        self._stage = {s: self._seconds.Metric(labels={**labels, "stage": s}) for s in STAGES}
        self._busy_family = pb_utils.MetricFamily(
            name=spec.EVERYTHING_IN_FLIGHT_METRIC, kind=pb_utils.MetricFamily.GAUGE,
            description="sam_everything requests being served, per model instance")
        self._busy = self._busy_family.Metric(labels={**labels, "instance": args["model_instance_name"]})

    async def _encode(self, pixel_values):
        request = pb_utils.InferenceRequest(
            model_name=self.encoder_name, requested_output_names=[spec.IMAGE_EMBEDDINGS_NAME],
            inputs=[pb_utils.Tensor(spec.PIXEL_VALUES_NAME, pixel_values[np.newaxis])], preferred_memory=self.cpu)
        response = await request.async_exec()
        return bls_output(response, self.encoder_name, spec.IMAGE_EMBEDDINGS_NAME)[0]

    async def _embed(self, image_bytes, geometry):
        request = pb_utils.InferenceRequest(
            model_name=self.embedding_name, requested_output_names=[spec.IMAGE_EMBEDDINGS_NAME],
            inputs=[pb_utils.Tensor(spec.IMAGE.name, np.array([image_bytes], dtype=np.object_)),
                    pb_utils.Tensor(spec.IMAGE_GEOMETRY.name, geometry.as_array())],
            preferred_memory=self.cpu)
        response = await request.async_exec()
        return bls_output(response, self.embedding_name, spec.IMAGE_EMBEDDINGS_NAME)[0]

    async def _decode(self, embedding, prompts, multimask):
        inputs = [
            pb_utils.Tensor(spec.IMAGE_EMBEDDINGS_NAME, embedding[np.newaxis]),
            pb_utils.Tensor(spec.PROMPT_COORDS_NAME, prompts.coords[np.newaxis]),
            pb_utils.Tensor(spec.PROMPT_LABELS_NAME, prompts.labels[np.newaxis]),
            pb_utils.Tensor(spec.MODEL_MASK_INPUTS_NAME, prompts.mask_inputs[np.newaxis]),
            pb_utils.Tensor(spec.HAS_MASK_INPUT_NAME, prompts.has_mask_input[np.newaxis]),
        ]
        request = pb_utils.InferenceRequest(
            model_name=self.decoder_name, inputs=inputs, preferred_memory=self.cpu,
            requested_output_names=[spec.LOW_RES_MASKS_NAME, spec.IOU_PREDICTIONS_NAME],
            parameters={MULTIMASK_PARAMETER: bool(multimask)})
        response = await request.async_exec()
        # [1, N, K, 256, 256], [1, N, K] -> the candidates asked for (a TensorRT engine sends all four)
        return candidates(bls_output(response, self.decoder_name, spec.LOW_RES_MASKS_NAME),
                          bls_output(response, self.decoder_name, spec.IOU_PREDICTIONS_NAME), multimask)

    async def _one(self, request):
        if self.drain_file and os.path.exists(self.drain_file):
            raise ShuttingDown("the server is shutting down; send the request to another replica or retry")
        parameters = json.loads(request.parameters() or "{}")
        unknown = sorted(set(parameters) - set(am.GeneratorParameters.names()))
        if unknown:
            raise InvalidInput(am.parameter_field(unknown[0]), "unknown parameter; valid: "
                               + ", ".join(am.GeneratorParameters.names()))
        params = am.GeneratorParameters.from_request(parameters, self.settings.limits)
        images = input_array(request, spec.IMAGE.name).reshape(-1)
        if images.size != 1:
            raise InvalidInput(spec.IMAGE.name, f"expected exactly one encoded image, got {images.size}")
        timings = Timings()
        image_bytes = images[0]
        masks = await segment_everything(image_bytes, optional_array(request, spec.BOXES.name), params,
                                         self.settings, self._encode, self._decode, request.is_cancelled, timings,
                                         encode_image=lambda geometry: self._embed(image_bytes, geometry))
        for stage, seconds in timings.seconds.items():
            self._stage[stage].increment(seconds)
        return [tensor(name, array) for name, array in output_arrays(masks).items()]

    def _failure(self, exc):
        if isinstance(exc, Cancelled):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                "sam_everything: cancelled by the client", pb_utils.TritonError.CANCELLED))
        if isinstance(exc, StepFailed) and exc.code == pb_utils.TritonError.UNAVAILABLE:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE))
        return self.error(exc)

    async def execute(self, requests):
        responses = []
        for request in requests:
            self._busy.increment(1)
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=await self._one(request)))
            except Exception as e:  # one response per request, whatever happens
                responses.append(self._failure(e))
            finally:
                self._busy.increment(-1)
        return responses
