"""The one place where domain errors become HTTP statuses and JSON error bodies.

The project's own routes answer {"error": {"type": ..., "message": ..., "request_id": ...}}.
Routes that stand in for another server speak its dialect, chosen by path (DIALECT_PATHS), so
that client's own error classes work: OpenAI's {"error": {"message", "type", "param", "code"}}
with 400 for an invalid body, and LoRAX/TGI's {"error": ..., "error_type": ...}.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from taskdelta.client.lorax_types import LoraxError
from taskdelta.client.openai_types import OpenAIErrorBody
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
              503: "The task store (Redis) is unavailable (or, where replicas are required, an upload "
                   "was committed but not confirmed by them: the message says which version)",
              504: "The request missed its deadline"}


Dialect = Literal["native", "openai", "lorax"]
# path (exact, or a prefix ending in "/") -> dialect; every other path is native
DIALECT_PATHS: dict[str, Dialect] = {
    "/v1/chat/completions": "openai", "/v1/completions": "openai", "/v1/embeddings": "openai",
    "/v1/models": "openai", "/v1/models/": "openai",
    "/": "lorax", "/generate": "lorax", "/generate_stream": "lorax",
}
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 409: "invalid_request_error",
                413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}
LORAX_TYPES = {400: "validation", 422: "validation", 429: "overloaded"}
ERROR_MODELS = {"native": ErrorBody, "openai": OpenAIErrorBody, "lorax": LoraxError}


def error_responses(*statuses: int, dialect: Dialect = "native") -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the errors a route can answer, in its dialect's error shape."""
    model = ERROR_MODELS[dialect]
    return {status: {"model": model, "description": ERROR_DOCS[status]} for status in statuses}


def dialect_of(path: str) -> Dialect:
    if path in DIALECT_PATHS:
        return DIALECT_PATHS[path]
    prefix = path[: path.rfind("/") + 1]
    return DIALECT_PATHS.get(prefix, "native") if prefix != "/" else "native"


def _native(status: int, type_: str, message: str, rid: str | None, param: str | None) -> dict:
    return {"error": {"type": type_, "message": message, "request_id": rid}}


def _openai(status: int, type_: str, message: str, rid: str | None, param: str | None) -> dict:
    kind = OPENAI_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": type_}}


def _lorax(status: int, type_: str, message: str, rid: str | None, param: str | None) -> dict:
    return {"error": message, "error_type": LORAX_TYPES.get(status, type_)}


BODIES: dict[Dialect, Callable[[int, str, str, str | None, str | None], dict]] = {
    "native": _native, "openai": _openai, "lorax": _lorax}
VALIDATION_STATUS: dict[Dialect, int] = {"native": 422, "openai": 400, "lorax": 422}


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def error_response(status: int, type_: str, message: str, rid: str | None,
                   headers: dict[str, str] | None = None, dialect: Dialect = "native",
                   param: str | None = None) -> JSONResponse:
    body = BODIES[dialect](status, type_, message, rid, param)
    return JSONResponse(body, status_code=status, headers=headers)


def error_body(exc: Exception, rid: str | None, dialect: Dialect = "native") -> dict:
    """The body for an error that happens after a stream started (sent as an event)."""
    status, type_ = status_of(exc)
    message = str(exc) if status != 500 else "internal error"
    return BODIES[dialect](status, type_, message, rid, getattr(exc, "param", None))


def status_of(exc: Exception) -> tuple[int, str]:
    for cls, status, type_ in STATUS:
        if isinstance(exc, cls):
            return status, type_
    return 500, "internal_error"


def to_response(exc: Exception, rid: str | None, dialect: Dialect = "native") -> JSONResponse:
    status, type_ = status_of(exc)
    headers = {}
    if isinstance(exc, errors.Overloaded):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    elif isinstance(exc, errors.StoreUnavailable):
        headers["Retry-After"] = "1"
    elif isinstance(exc, errors.PayloadTooLarge):
        headers["Connection"] = "close"  # the rest of the body is never read: drop it with the connection
    message = str(exc) if status != 500 else "internal error; see the server log for this request id"
    return error_response(status, type_, message, rid, headers, dialect, getattr(exc, "param", None))


def _param(loc: tuple) -> str | None:
    """`body.messages.0.content` -> `messages.0.content`; None for the body as a whole."""
    parts = [str(x) for x in loc[1:]] if loc and loc[0] in ("body", "query", "path") else []
    return ".".join(parts) or None


def validation_response(exc: RequestValidationError, rid: str | None,
                        dialect: Dialect) -> JSONResponse:
    parts, params = [], []
    for e in exc.errors()[:10]:
        param = _param(tuple(e.get("loc", ())))
        params.append(param)
        msg = ("not supported by this server" if e.get("type") == "extra_forbidden"
               else e.get("msg"))
        parts.append(f"{param or 'body'}: {msg}")
    return error_response(VALIDATION_STATUS[dialect], "invalid_request",
                          "; ".join(parts) or "invalid request", rid, dialect=dialect,
                          param=next((p for p in params if p), None))


def install(app: FastAPI) -> None:
    async def domain(request: Request, exc: Exception) -> JSONResponse:
        return to_response(exc, request_id(request), dialect_of(request.url.path))

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc, request_id(request), dialect_of(request.url.path))

    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, HTTP_TYPES.get(exc.status_code, "error"),
                              str(exc.detail), request_id(request), getattr(exc, "headers", None),
                              dialect_of(request.url.path))

    for cls in (errors.ServerError, DeltaRejected):
        app.add_exception_handler(cls, domain)
    app.add_exception_handler(RequestValidationError, validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http)  # type: ignore[arg-type]
