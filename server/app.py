"""`create_app(settings)`: builds everything in a lifespan and keeps it on `app.state`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from taskdelta.deltas import Base, load_base

from . import docs, http_errors
from .auth import KeyRing
from .deps import AppState
from .embedded import EmbeddedRedis
from .engine import Engine
from .metrics import Metrics
from .middleware import RequestContext
from .registry import TaskRegistry
from .routes_infer import router as infer_router
from .routes_lorax import router as lorax_router
from .routes_openai import router as openai_router
from .routes_ops import router as ops_router
from .routes_tasks import router as tasks_router
from .settings import Settings, get_settings
from .store import DeltaStore, RedisStore

log = logging.getLogger("taskdelta.server")


def create_app(settings: Settings | None = None, base: Base | None = None,
               store: DeltaStore | None = None) -> FastAPI:
    """The app. Tests may pass a preloaded `base` and a `store`; otherwise settings decide."""
    settings = settings or get_settings()
    keys = KeyRing.from_settings(settings)  # fail at build time on a bad keys setup
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            state = await _start(settings, base, store, keys, metrics, stack)
            app.state.taskdelta = state
            yield

    app = FastAPI(title="taskdelta", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # docs.install: offline pages, no CDN
                  description="Many fine-tuned tasks served from one base model as sparse deltas.")
    http_errors.install(app)
    docs.install(app)
    for router in (tasks_router, infer_router, openai_router, lorax_router, ops_router):
        app.include_router(router)
    app.add_middleware(RequestContext, metrics=metrics)
    return app


async def _start(settings: Settings, base: Base | None, store: DeltaStore | None, keys: KeyRing,
                 metrics: Metrics, stack: contextlib.AsyncExitStack) -> AppState:
    if not keys.enabled:
        log.warning("AUTH IS OFF: every caller is tenant 'default'. Use this only on a laptop; "
                    "set TASKDELTA_API_KEYS or TASKDELTA_KEYS_FILE for anything shared.")
    if store is None:
        url = settings.redis_url
        if url is None:
            if settings.redis_wait_replicas:
                raise ValueError("TASKDELTA_REDIS_WAIT_REPLICAS needs TASKDELTA_REDIS_URL: the "
                                 "embedded Redis has no replicas")
            embedded = EmbeddedRedis(settings.data_dir)
            stack.callback(embedded.close)
            url = embedded.url
            log.info("no TASKDELTA_REDIS_URL: embedded Redis under %s", settings.data_dir)
        store = RedisStore(url, chunk_bytes=settings.chunk_bytes,
                           wait_replicas=settings.redis_wait_replicas,
                           wait_timeout_s=settings.redis_wait_timeout_s)
        stack.push_async_callback(store.close)
    if settings.torch_threads is not None:  # before any forward: a fixed, comparable compute
        torch.set_num_threads(settings.torch_threads)
    if base is None:
        log.info("loading base %s", settings.base)
        base = await asyncio.to_thread(load_base, settings.base, settings.device, settings.dtype)
    engine = Engine(base, store, settings, on_swap=metrics.observe_swap,
                    on_batch=metrics.observe_batch, on_mixed=metrics.observe_mixed)
    metrics.follow_cache(engine.cache.stats)
    engine.scheduler.start()
    stack.callback(engine.close)  # the exact base back and the mixer's hooks off, last
    stack.push_async_callback(engine.scheduler.stop)
    listener = asyncio.create_task(_follow_changes(store, engine.registry))
    stack.callback(listener.cancel)
    log.info("serving base %s (%s) on %s", base.name, base.fingerprint, base.device)
    return AppState(settings=settings, base=base, store=store, engine=engine,
                    registry=engine.registry, scheduler=engine.scheduler, keys=keys,
                    metrics=metrics)


async def _follow_changes(store: DeltaStore, registry: TaskRegistry) -> None:
    """Drop cache entries other replicas changed; reconnect after a lost subscription."""
    while True:
        try:
            async for change in store.changes():
                registry.invalidate(change.tenant, change.name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis away: the version re-check bounds staleness meanwhile
            log.warning("change feed lost (%s); retrying", exc)
        await asyncio.sleep(1.0)
