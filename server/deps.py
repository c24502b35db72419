"""Request dependencies: the app's state and the caller's tenant, as `Annotated` types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from taskdelta.deltas import Base

from .auth import NAME_PATTERN, KeyRing, Tenant
from .engine import Engine
from .metrics import Metrics
from .registry import TaskRegistry
from .scheduler import Scheduler
from .settings import Settings
from .store import DeltaStore


@dataclass
class AppState:
    settings: Settings
    base: Base
    store: DeltaStore
    engine: Engine
    registry: TaskRegistry  # resolve, load, cache, invalidate tasks
    scheduler: Scheduler
    keys: KeyRing
    metrics: Metrics


def get_state(request: Request) -> AppState:
    return request.app.state.taskdelta


StateDep = Annotated[AppState, Depends(get_state)]
# A security scheme (not a plain header parameter), so the OpenAPI schema says how to authenticate;
# no auto_error: a missing key is the KeyRing's 401 in the one error shape (or no key when auth is off).
BEARER = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")


def current_tenant(state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                           Depends(BEARER)] = None) -> Tenant:
    return state.keys.authenticate(credentials.credentials if credentials else None)


TenantDep = Annotated[Tenant, Depends(current_tenant)]
TaskName = Annotated[str, Path(pattern=NAME_PATTERN, description="Task name, or `base`")]
