"""Domain errors of the delta layer. They know nothing of HTTP; the server maps them to status codes."""

from __future__ import annotations


class DeltaRejected(ValueError):
    """A delta file or object that must not be stored or applied.

    `tensor` names the offending tensor (or metadata key) where there is one, so a user can find it.
    """

    def __init__(self, problem: str, tensor: str | None = None) -> None:
        self.problem = problem
        self.tensor = tensor
        super().__init__(f"tensor {tensor!r}: {problem}" if tensor else problem)


class SwapError(RuntimeError):
    """A swap that would corrupt the base (e.g. applying a second delta before restoring)."""


class BaseModelError(RuntimeError):
    """A base model that cannot be found, converted or loaded."""
