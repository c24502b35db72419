"""Pure-ASGI middleware: a request id on every response (and every error), route latency metrics,
the API key checked before any body is read, a request body size limit, and a last-resort 500 in
the one error shape for anything unexpected."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from fastapi.security.utils import get_authorization_scheme_param
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .errors import Unauthorized
from .http_errors import dialect_of, error_response
from .metrics import UNMATCHED, Metrics, method_label, status_label

log = logging.getLogger("taskdelta.http")
RID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
CLIENT_CLOSED = 499  # the metrics' status for a request whose client left mid-body (nginx's code)
AUTHENTICATED_PREFIX = "/v1/"  # tenant routes; health, readiness, metrics and docs are not


def is_tenant_route(path: str) -> bool:
    """Every path under /v1/ and the LoRAX routes (`/`, `/generate`, `/generate_stream`)."""
    return path.startswith(AUTHENTICATED_PREFIX) or dialect_of(path) == "lorax"


class RequestContext:
    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if RID_RE.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = {"code": 500, "sent": False}
        limit = _body_limit(scope)
        if limit is not None:
            receive = _limited(receive, limit, headers.get(b"content-length"))

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", rid.encode())]
            await send(message)

        try:
            if refusal := _unauthenticated(scope, headers, rid):
                await refusal(scope, receive, send_with_id)  # the body is never read
                return
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # the client left before its body was read: nothing to answer, and not a server
            # error (counted as nginx's 499 "client closed request", logged without a traceback)
            log.info("client left before sending its whole body, request id %s", rid)
            status["code"] = CLIENT_CLOSED
        except Exception:
            log.exception("unhandled error, request id %s", rid)
            if not status["sent"]:
                body = json.dumps({"error": {"type": "internal_error", "request_id": rid,
                                             "message": "internal error; see the server log "
                                                        "for this request id"}}).encode()
                await send_with_id({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED)  # the template, not the path
            self.metrics.http_seconds.labels(method_label(scope["method"]), route,
                                             status_label(status["code"])).observe(
                time.perf_counter() - started)


def _unauthenticated(scope, headers: dict[bytes, bytes], rid: str):
    """A 401 response for a tenant route called without a valid key, else None. Checked here,
    before routing, because FastAPI reads and parses a JSON body before it resolves the route's
    dependencies (where the tenant is checked again): an anonymous caller must not make the server
    buffer or parse anything."""
    state = getattr(getattr(scope.get("app"), "state", None), "taskdelta", None)
    if state is None or not state.keys.enabled or not is_tenant_route(scope["path"]):
        return None
    scheme, key = get_authorization_scheme_param(
        headers.get(b"authorization", b"").decode("latin-1"))
    try:
        state.keys.authenticate(key if scheme.lower() == "bearer" else None)
    except Unauthorized as exc:
        # the unread body is dropped with the connection rather than drained
        return error_response(401, "unauthorized", str(exc), rid,
                              {"WWW-Authenticate": "Bearer", "Connection": "close"},
                              dialect_of(scope["path"]))  # the route's client reads its own shape
    return None


def _body_limit(scope) -> int | None:
    """Uploads (PUT) may be up to max_delta_bytes, any other body up to max_request_bytes."""
    state = getattr(getattr(scope.get("app"), "state", None), "taskdelta", None)
    if state is None:
        return None
    s = state.settings
    return s.max_delta_bytes if scope["method"] == "PUT" else s.max_request_bytes


def _limited(receive, limit: int, declared: bytes | None):
    """`receive` that refuses (413) a body over `limit` bytes as soon as it is declared or read, so
    no route ever buffers more; the connection is closed rather than the rest of the body read."""
    seen = 0

    def too_large(size: str) -> HTTPException:
        return HTTPException(413, f"body of {size} bytes is over the limit of {limit} bytes",
                             headers={"Connection": "close"})

    async def receive_limited():
        nonlocal seen
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large(declared.decode())
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large(f"more than {limit}")
        return message

    return receive_limited
