"""Health, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from taskdelta.client.types import Health, Ready

from .deps import StateDep

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


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus text format."""
    m, cache, sched = state.metrics, state.engine.cache, state.scheduler

    def refresh() -> None:
        m.queue_depth.set(sched.total_depth)
        m.queued_tasks.set(len(sched.queued_tasks()))
        m.cache_bytes.set(cache.nbytes)
        m.cache_entries.set(len(cache))

    return Response(m.render(refresh), media_type="text/plain; version=0.0.4")
