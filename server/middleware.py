"""Pure-ASGI middleware: a request id on every response (and every error), route latency metrics,
and a last-resort 500 in the one error shape for anything unexpected."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from .metrics import Metrics

log = logging.getLogger("taskdelta.http")
RID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestContext:
    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if RID_RE.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = {"code": 500, "sent": False}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
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
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_seconds.labels(scope["method"], route, str(status["code"])).observe(
                time.perf_counter() - started)
