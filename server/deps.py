"""Request dependencies: the app's state and the caller's tenant, as `Annotated` types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Path, Request

from taskdelta.deltas import Base

from .auth import NAME_RE, KeyRing, Tenant
from .engine import Engine
from .metrics import Metrics
from .scheduler import Scheduler
from .settings import Settings
from .store import DeltaStore


@dataclass
class AppState:
    settings: Settings
    base: Base
    store: DeltaStore
    engine: Engine
    scheduler: Scheduler
    keys: KeyRing
    metrics: Metrics


def get_state(request: Request) -> AppState:
    return request.app.state.taskdelta


StateDep = Annotated[AppState, Depends(get_state)]


def current_tenant(state: StateDep,
                   authorization: Annotated[str | None, Header()] = None) -> Tenant:
    key = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        key = value.strip() if scheme.lower() == "bearer" else None
    return state.keys.authenticate(key)


TenantDep = Annotated[Tenant, Depends(current_tenant)]
TaskName = Annotated[str, Path(pattern=NAME_RE.pattern, description="Task name, or `base`")]
