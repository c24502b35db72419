"""Domain errors of the server. They know nothing of HTTP; `http_errors.py` maps them."""

from __future__ import annotations


class ServerError(Exception):
    """Base of the server's expected errors; `message` is safe to show a client."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class TaskNotFound(ServerError):
    pass


class VersionConflict(ServerError):
    pass


class Overloaded(ServerError):
    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServerError):
    pass


class Unauthorized(ServerError):
    pass


class Forbidden(ServerError):
    pass


class QuotaExceeded(ServerError):
    pass


class BadTaskRequest(ServerError):
    """The task exists but cannot do what was asked (wrong kind, base cannot generate, ...)."""


class StoreUnavailable(ServerError):
    pass


class PayloadTooLarge(ServerError):
    pass


class NotReplicated(StoreUnavailable):
    """An upload committed on the Redis primary that fewer replicas than required confirmed in
    time (TASKDELTA_REDIS_WAIT_REPLICAS): stored, but not acknowledged as replicated."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version
