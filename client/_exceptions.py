"""The SDK's errors. `_base.status_error` is the one place that picks a class for a response.

    TaskDeltaError
    └── APIError
        ├── APIStatusError            the server answered with an error status
        │   ├── BadRequestError           400
        │   ├── AuthenticationError       401
        │   ├── PermissionDeniedError     403
        │   ├── NotFoundError             404
        │   ├── ConflictError             409 (stale If-Match version)
        │   ├── PayloadTooLargeError      413
        │   ├── UnprocessableEntityError  422
        │   │   └── DeltaRejectedError        422 with type `delta_rejected`
        │   ├── RateLimitError            429 (retry_after)
        │   └── InternalServerError       5xx
        │       ├── ServiceUnavailableError   503 (retry_after)
        │       └── GatewayTimeoutError       504
        ├── APIConnectionError        no answer: refused, reset, DNS, stream cut short
        │   └── APITimeoutError
        └── APIResponseValidationError  an answer that does not fit the wire contract
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "APIConnectionError", "APIError", "APIResponseValidationError", "APIStatusError",
    "APITimeoutError", "AuthenticationError", "BadRequestError", "ConflictError",
    "DeltaRejectedError", "GatewayTimeoutError", "InternalServerError", "NotFoundError",
    "PayloadTooLargeError", "PermissionDeniedError", "RateLimitError", "ServiceUnavailableError",
    "TaskDeltaError", "UnprocessableEntityError",
]


class TaskDeltaError(Exception):
    """Base of every error the SDK raises on purpose."""


class APIError(TaskDeltaError):
    """A request gave no usable answer. `request` is the httpx request, when there was one."""

    def __init__(self, message: str, *, request: httpx.Request | None = None,
                 body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body


class APIStatusError(APIError):
    """The server answered with an error status and (usually) an ErrorBody.

    `type` is the body's error type (`not_found`, `rate_limited`, ...), `request_id` the server's
    id for the request (quote it in bug reports), `body` the decoded JSON body (or raw text).
    """

    def __init__(self, message: str, *, status_code: int, type: str | None = None,
                 request_id: str | None = None, body: Any = None,
                 response: httpx.Response | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, request=_request_of(response), body=body)
        self.status_code = status_code
        self.type = type
        self.request_id = request_id
        self.response = response
        self.retry_after = retry_after  # seconds the server asked us to wait, if it said

    def __str__(self) -> str:
        kind = f" {self.type}" if self.type else ""
        rid = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.status_code}{kind}: {self.message}{rid}"


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class ConflictError(APIStatusError):
    pass


class PayloadTooLargeError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


class DeltaRejectedError(UnprocessableEntityError):
    """The server refused a delta file (wrong base fingerprint, bad indices, ...)."""


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


class ServiceUnavailableError(InternalServerError):
    pass


class GatewayTimeoutError(InternalServerError):
    pass


class APIConnectionError(APIError):
    def __init__(self, message: str = "connection error", *,
                 request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APITimeoutError(APIConnectionError):
    def __init__(self, message: str = "request timed out", *,
                 request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APIResponseValidationError(APIError):
    """A success status whose body is not what the wire contract says (wrong server? proxy?)."""

    def __init__(self, message: str, *, response: httpx.Response, body: Any = None) -> None:
        super().__init__(message, request=_request_of(response), body=body)
        self.response = response
        self.status_code = response.status_code
        self.request_id = response.headers.get("x-request-id")


def _request_of(response: httpx.Response | None) -> httpx.Request | None:
    try:
        return response.request if response is not None else None
    except RuntimeError:  # a Response built by hand has no request
        return None
