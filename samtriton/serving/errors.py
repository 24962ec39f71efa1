"""Errors that belong to one request: INVALID_ARG (bad input) or UNAVAILABLE (shutting down, or retry)."""


class InvalidInput(ValueError):
    """A request's input is unusable; the message starts with the field's name."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class ShuttingDown(RuntimeError):
    """The server is draining: a new request is refused (UNAVAILABLE) so that the
    ones in flight can finish before Triton stops."""


class EmbeddingGone(RuntimeError):
    """The image's embedding left shared memory (its slot reused, or its arena
    removed) before the decoder read it: UNAVAILABLE, the client may retry."""
