"""The one place where domain errors become HTTP statuses and one JSON error shape:
{"error": {"type": ..., "message": ..., "request_id": ...}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from taskdelta.client.types import ErrorBody
from taskdelta.deltas import DeltaRejected

from . import errors

log = logging.getLogger("taskdelta.http")

# exception type -> (status, error type); first match wins, so subclasses come first
STATUS: list[tuple[type[Exception], int, str]] = [
    (errors.TaskNotFound, 404, "not_found"),
    (errors.VersionConflict, 409, "conflict"),
    (errors.Overloaded, 429, "rate_limited"),
    (errors.DeadlineExceeded, 504, "timeout"),
    (errors.Unauthorized, 401, "unauthorized"),
    (errors.Forbidden, 403, "forbidden"),
    (errors.QuotaExceeded, 403, "quota_exceeded"),
    (errors.BadTaskRequest, 400, "bad_request"),
    (errors.PayloadTooLarge, 413, "payload_too_large"),
    (errors.StoreUnavailable, 503, "unavailable"),
    (DeltaRejected, 422, "delta_rejected"),
]
HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
              413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
              429: "rate_limited", 503: "unavailable", 504: "timeout"}


ERROR_DOCS = {400: "The task cannot do this (wrong kind, or `base`)", 401: "Missing or invalid API key",
              403: "Not allowed, or over the tenant's quota", 404: "No such task for this tenant",
              409: "If-Match is not the task's current version", 413: "Body over the size limit",
              422: "Invalid request, or a delta that was refused (the message names the problem)",
              429: "Overloaded: retry after Retry-After seconds",
              503: "The task store (Redis) is unavailable", 504: "The request missed its deadline"}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the errors a route can answer, all in the one error shape."""
    return {status: {"model": ErrorBody, "description": ERROR_DOCS[status]} for status in statuses}


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def error_response(status: int, type_: str, message: str, rid: str | None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"type": type_, "message": message, "request_id": rid}}
    return JSONResponse(body, status_code=status, headers=headers)


def status_of(exc: Exception) -> tuple[int, str]:
    for cls, status, type_ in STATUS:
        if isinstance(exc, cls):
            return status, type_
    return 500, "internal_error"


def to_response(exc: Exception, rid: str | None) -> JSONResponse:
    status, type_ = status_of(exc)
    headers = {}
    if isinstance(exc, errors.Overloaded):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    elif isinstance(exc, errors.StoreUnavailable):
        headers["Retry-After"] = "1"
    elif isinstance(exc, errors.PayloadTooLarge):
        headers["Connection"] = "close"  # the rest of the body is never read: drop it with the connection
    message = str(exc) if status != 500 else "internal error; see the server log for this request id"
    return error_response(status, type_, message, rid, headers)


def install(app: FastAPI) -> None:
    async def domain(request: Request, exc: Exception) -> JSONResponse:
        return to_response(exc, request_id(request))

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:10]:
            loc = ".".join(str(x) for x in e.get("loc", ()))
            parts.append(f"{loc}: {e.get('msg')}")
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request",
                              request_id(request))

    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, HTTP_TYPES.get(exc.status_code, "error"),
                              str(exc.detail), request_id(request), getattr(exc, "headers", None))

    for cls in (errors.ServerError, DeltaRejected):
        app.add_exception_handler(cls, domain)
    app.add_exception_handler(RequestValidationError, validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http)  # type: ignore[arg-type]
