"""Typed errors of the SDK; each wraps (`from`) the tritonclient or socket error behind it."""

from __future__ import annotations

import re


class SamTritonError(Exception):
    """Base class of every error the SDK raises."""


class InvalidInputError(SamTritonError, ValueError):
    """The server (or the SDK, before sending) rejected an input; `field` names it."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ServerUnavailableError(SamTritonError, ConnectionError):
    """No server answered, or it answered UNAVAILABLE (overloaded, shutting down)."""


class ServerBusyError(ServerUnavailableError):
    """The server refused the request because a queue was full (backpressure):
    retry later, with backoff, or send to another replica."""


class ModelNotFoundError(SamTritonError, LookupError):
    """The server does not serve the model asked for."""


class InferenceFailedError(SamTritonError, RuntimeError):
    """The server failed the request for another reason (internal error, timeout ...)."""


# "in ensemble 'sam', boxes: box 2 ..." -> "boxes" (samtriton's own checks);
# "unexpected shape for input 'mask_inputs' for model 'sam'" -> "mask_inputs"
# (Triton's checks of the declared shapes and data types).
_FIELD = re.compile(r"(?:^|, )([A-Za-z_][\w.]*): ")
_TRITON_FIELD = re.compile(r"\binput '([A-Za-z_][\w.]*)'")
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")


def field_of(message: str) -> str | None:
    match = _FIELD.search(_ENSEMBLE_PREFIX.sub("", message)) or _TRITON_FIELD.search(message)
    return match.group(1) if match else None


def from_triton(exc: Exception) -> SamTritonError:
    """Map a tritonclient InferenceServerException (gRPC or HTTP) to a typed error."""
    status = str(getattr(exc, "status", lambda: "")() or "")
    message = getattr(exc, "message", lambda: str(exc))() or str(exc)
    if status in ("StatusCode.INVALID_ARGUMENT", "400"):
        return InvalidInputError(message, field_of(message))
    if "exceeds maximum queue size" in message.lower():
        return ServerBusyError(message)
    if status in ("StatusCode.UNAVAILABLE", "503") or "failed to connect" in message.lower():
        return ServerUnavailableError(message)
    if status in ("StatusCode.NOT_FOUND", "404") or "unknown model" in message.lower():
        return ModelNotFoundError(message)
    return InferenceFailedError(f"{message} (status {status or 'unknown'})")
