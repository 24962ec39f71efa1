"""Helpers for the python-backend models; importable only inside Triton's python stub."""

from __future__ import annotations

import json
import os
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from samtriton import spec
from samtriton.serving.errors import EmbeddingGone, InvalidInput, ShuttingDown
from samtriton.serving.cpu_runtime import make_session, resolve_configured


def model_parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def step_session(args: dict):
    """The session of a model whose version folder holds model.onnx, in the
    runtime and precision its config names (`samtriton.serving.cpu_runtime`)."""
    path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
    params = model_parameters(args)
    # A repository built on a bf16 CPU and served on one without: fp32, said in the log.
    step, why = resolve_configured(params, spec.role_of(args["model_name"]))
    if why:
        pb_utils.Logger.log_warn(f"{args['model_name']}: {why}")
    return make_session(path, step, threads=int(params.get("intra_op_threads", "0")))


class StepFailed(RuntimeError):
    """A BLS request to another model came back with an error (`code`: its Triton error code)."""

    def __init__(self, model: str, error):
        super().__init__(f"{model}: {error.message()}")
        self.code = error.code() if hasattr(error, "code") else None


def bls_output(response, model: str, name: str) -> np.ndarray:
    """Output `name` of a BLS response from `model`, or StepFailed."""
    if response.has_error():
        raise StepFailed(model, response.error())
    return pb_utils.get_output_tensor_by_name(response, name).as_numpy()


def input_array(request, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InvalidInput(name, "missing")
    return tensor.as_numpy()


def optional_array(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def error_response(exc: BaseException, model_name: str):
    if isinstance(exc, InvalidInput):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
    if isinstance(exc, (ShuttingDown, EmbeddingGone)):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE))
    pb_utils.Logger.log_error(f"{model_name}: {traceback.format_exc()}")
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(f"{model_name}: internal error: {exc}", pb_utils.TritonError.INTERNAL)
    )


def tensor(name: str, array: np.ndarray):
    return pb_utils.Tensor(name, array)


def respond_each(requests, one, error):
    """One response per request, in order: `one(request)`'s output tensors, or
    `error(exc)` for a request whose `one` raised; its batch-mates go on."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=one(request)))
        except Exception as e:  # one response per request, whatever happens
            responses.append(error(e))
    return responses


class ErrorResponses:
    """Builds a request's error response and counts it in REQUEST_ERRORS_METRIC
    (Triton 2.51 records a python model's per-request errors as successes)."""

    def __init__(self, args: dict):
        self.model_name = args["model_name"]
        # The family must outlive its metric: both are kept.
        self._family = pb_utils.MetricFamily(
            name=spec.REQUEST_ERRORS_METRIC,
            description="error responses sent by samtriton's python models",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._metric = self._family.Metric(labels={"model": self.model_name})

    def __call__(self, exc: BaseException):
        self._metric.increment(1)
        return error_response(exc, self.model_name)
