"""Task routes: upload, list, get, delete deltas."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from taskdelta.client.types import Deleted, TaskInfo, TaskList
from taskdelta.deltas import DeltaRejected

from .deps import StateDep, TaskName, TenantDep
from .engine import BASE_TASK
from .errors import BadTaskRequest, Forbidden, PayloadTooLarge, VersionConflict
from .http_errors import error_responses
from .store import StoredTask

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], responses=error_responses(401, 422, 503))
OCTET = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def task_info(stored: StoredTask, with_tenant: bool = False) -> TaskInfo:
    i = stored.info
    return TaskInfo(name=stored.name, kind=i["kind"], version=stored.version,
                    labels=json.loads(i.get("labels", "[]")), nnz=int(i["nnz"]),
                    density=float(i["density"]), bytes=int(i["bytes"]), sha256=i["sha256"],
                    base_fingerprint=i["base_fingerprint"], created_at=float(i["created_at"]),
                    provenance=json.loads(i.get("provenance", "{}")),
                    tenant=stored.tenant if with_tenant else None)


def parse_if_match(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise VersionConflict(f"If-Match must be a task version number, got {value!r}")
    return int(text)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused at `limit` bytes without buffering the rest."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
    return bytes(body)


@router.put("/{task}", response_model=TaskInfo, status_code=201,
            openapi_extra={"requestBody": {"required": True, "content": OCTET}},
            responses={200: {"model": TaskInfo, "description": "Replaced an existing task"},
                       **error_responses(400, 403, 409, 413)})
async def upload_task(task: TaskName, request: Request, response: Response, state: StateDep,
                      tenant: TenantDep,
                      if_match: Annotated[str | None, Header()] = None) -> TaskInfo:
    """Upload a delta file (safetensors, format v1) as a new version of the task."""
    if task == BASE_TASK:
        raise BadTaskRequest("'base' is the base model and cannot be replaced")
    expected = parse_if_match(if_match)
    s = state.settings
    data = await read_body(request, s.max_delta_bytes)
    try:
        checked = await state.engine.check_upload(data, s.max_delta_bytes)
    except DeltaRejected:
        state.metrics.uploads.labels("rejected").inc()
        raise
    existed = await state.store.current_version(tenant.name, task) is not None
    stored = await state.store.put(tenant.name, task, data, checked.info, if_match=expected,
                                   max_tasks=s.max_tasks_per_tenant,
                                   max_bytes=s.max_bytes_per_tenant)
    state.engine.invalidate(tenant.name, task)
    state.metrics.uploads.labels("replaced" if existed else "created").inc()
    response.status_code = 200 if existed else 201
    response.headers["ETag"] = f'"{stored.version}"'
    return task_info(stored)


@router.get("", response_model=TaskList, responses=error_responses(403))
async def list_tasks(state: StateDep, tenant: TenantDep,
                     all_tenants: Annotated[bool, Query(alias="all")] = False) -> TaskList:
    """The caller's tasks; with `?all=true` (admin key only) every tenant's."""
    if all_tenants:
        if not tenant.admin:
            raise Forbidden("only the admin key may list every tenant's tasks")
        return TaskList(tasks=[task_info(t, True) for t in await state.store.list_all()])
    return TaskList(tasks=[task_info(t) for t in await state.store.list(tenant.name)])


@router.get("/{task}", response_model=TaskInfo, responses=error_responses(404))
async def get_task(task: TaskName, state: StateDep, tenant: TenantDep,
                   response: Response) -> TaskInfo:
    stored = await state.store.get(tenant.name, task)
    response.headers["ETag"] = f'"{stored.version}"'
    return task_info(stored)


@router.delete("/{task}", response_model=Deleted, responses=error_responses(404, 409))
async def delete_task(task: TaskName, state: StateDep, tenant: TenantDep,
                      if_match: Annotated[str | None, Header()] = None) -> Deleted:
    await state.store.delete(tenant.name, task, if_match=parse_if_match(if_match))
    state.engine.invalidate(tenant.name, task)
    return Deleted(name=task)
