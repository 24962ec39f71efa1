"""Python SDK for samtriton: `sam` (boxes, points, box + points, mask refinement, multimask) and
`sam_everything` (automatic mask generation)."""

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
from samtriton.client.result import EverythingResult, SegmentationResult
from samtriton.client.sync_client import SamClient

__all__ = [
    "SamClient",
    "AsyncSamClient",
    "EncodedImage",
    "Prompt",
    "SegmentationResult",
    "EverythingResult",
    "SamTritonError",
    "InvalidInputError",
    "ServerUnavailableError",
    "ServerBusyError",
    "ModelNotFoundError",
    "InferenceFailedError",
]
