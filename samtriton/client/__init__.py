"""Python SDK for the samtriton `sam` ensemble: boxes, points, box + points, mask refinement, multimask."""

from samtriton.client.errors import (
    InferenceFailedError,
    InvalidInputError,
    ModelNotFoundError,
    SamTritonError,
    ServerBusyError,
    ServerUnavailableError,
)
from samtriton.client.async_client import AsyncSamClient
from samtriton.client.inputs import Prompt
from samtriton.client.protocol import EncodedImage
from samtriton.client.result import SegmentationResult
from samtriton.client.sync_client import SamClient

__all__ = [
    "SamClient",
    "AsyncSamClient",
    "EncodedImage",
    "Prompt",
    "SegmentationResult",
    "SamTritonError",
    "InvalidInputError",
    "ServerUnavailableError",
    "ServerBusyError",
    "ModelNotFoundError",
    "InferenceFailedError",
]
