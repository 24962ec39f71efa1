"""Errors that belong to one request and become Triton INVALID_ARG for it."""


class InvalidInput(ValueError):
    """A request's input is unusable; the message starts with the field's name."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")
