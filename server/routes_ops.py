"""Health, readiness and metrics."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security.utils import get_authorization_scheme_param

from taskdelta.client.types import Health, Ready

from .deps import StateDep
from .errors import Unauthorized
from .http_errors import error_responses

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up."""
    return Health()


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
async def readyz(state: StateDep):
    """The model is loaded and Redis answers; 503 otherwise."""
    redis_ok = await state.store.ping()
    ready = Ready(ready=redis_ok, model_loaded=True, redis=redis_ok, base=state.base.name,
                  base_fingerprint=state.base.fingerprint)
    return JSONResponse(ready.model_dump(), status_code=200 if redis_ok else 503)


def check_metrics_key(request: Request, expected: str | None) -> None:
    """With `metrics_key` set, /metrics answers only `Authorization: Bearer <metrics_key>`."""
    if expected is None:
        return
    scheme, key = get_authorization_scheme_param(request.headers.get("authorization"))
    given = hashlib.sha256(key.encode()).digest() if scheme.lower() == "bearer" else b""
    if not hmac.compare_digest(given, hashlib.sha256(expected.encode()).digest()):
        raise Unauthorized("/metrics needs the metrics key: `Authorization: Bearer <key>`")


@router.get("/metrics", response_class=Response, responses=error_responses(401))
async def metrics(state: StateDep, request: Request) -> Response:
    """Prometheus text format (behind a key when `TASKDELTA_METRICS_KEY` is set)."""
    check_metrics_key(request, state.settings.metrics_key)
    m, cache, sched = state.metrics, state.registry.cache, state.scheduler

    def refresh() -> None:
        m.queue_depth.set(sched.total_depth)
        m.queued_tasks.set(len(sched.queued_tasks()))
        m.cache_bytes.set(cache.nbytes)
        m.cache_entries.set(len(cache))

    return Response(m.render(refresh), media_type="text/plain; version=0.0.4")
