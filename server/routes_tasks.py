"""Task routes: upload, list, get, delete deltas."""

from __future__ import annotations

import json
import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from taskdelta.client.types import Deleted, TaskInfo, TaskList
from taskdelta.deltas import DeltaRejected

from .deps import AppState, StateDep, TaskName, TenantDep
from .errors import BadTaskRequest, Forbidden, NotReplicated
from .http_errors import error_responses
from .limits import check_labels
from .registry import BASE_TASK
from .store import StoredTask
from .uploads import UploadGate, quota_left, read_upload

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


IF_MATCH_RE = re.compile(r'(?:W/)?"?([0-9]{1,18})"?')  # a version number, quoted as an ETag or not


def parse_if_match(value: str | None) -> int | None:
    """The version an `If-Match` names; 400 for anything that is not one version number."""
    if value is None:
        return None
    found = IF_MATCH_RE.fullmatch(value.strip())
    if found is None:
        raise BadTaskRequest(f"If-Match must be one task version number (as its ETag gives it, "
                             f"e.g. '\"3\"'), got {value[:64]!r}")
    return int(found.group(1))


@router.put("/{task}", response_model=TaskInfo, status_code=201,
            openapi_extra={"requestBody": {"required": True, "content": OCTET}},
            responses={200: {"model": TaskInfo, "description": "Replaced an existing task"},
                       **error_responses(400, 403, 409, 413, 429)})
async def upload_task(task: TaskName, request: Request, response: Response, state: StateDep,
                      tenant: TenantDep,
                      if_match: Annotated[str | None, Header()] = None) -> TaskInfo:
    """Upload a delta file (safetensors, format v1) as a new version of the task."""
    if task == BASE_TASK:
        raise BadTaskRequest("'base' is the base model and cannot be replaced")
    expected = parse_if_match(if_match)
    s = state.settings
    gate = UploadGate.of(request, s)
    with gate.slot(tenant.name) as reservation:
        allowance = await quota_left(state.store, gate, tenant.name, task, s.max_bytes_per_tenant)
        data = await read_upload(request, s.max_delta_bytes, allowance, reservation)
        info = await _checked_info(state, data)
        existed = await state.store.current_version(tenant.name, task) is not None
        try:
            stored = await state.store.put(tenant.name, task, data, info, if_match=expected,
                                           max_tasks=s.max_tasks_per_tenant,
                                           max_bytes=s.max_bytes_per_tenant)
        except NotReplicated:  # committed on the primary, not acknowledged: the 503 says so
            state.registry.invalidate(tenant.name, task)
            raise
    state.registry.invalidate(tenant.name, task)
    state.metrics.uploads.labels("replaced" if existed else "created").inc()
    response.status_code = 200 if existed else 201
    response.headers["ETag"] = f'"{stored.version}"'
    return task_info(stored)


async def _checked_info(state: AppState, data: bytearray) -> dict[str, str]:
    """The metadata to store for a delta that passed every check. Only the metadata is kept:
    the decoded delta is dropped before the bytes go to the store (peak memory per upload)."""
    try:
        checked = await state.registry.check_upload(data, state.settings.max_delta_bytes)
        check_labels(checked.delta.meta.labels, state.settings)
    except DeltaRejected:
        state.metrics.uploads.labels("rejected").inc()
        raise
    return checked.info


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


@router.delete("/{task}", response_model=Deleted, responses=error_responses(400, 404, 409))
async def delete_task(task: TaskName, state: StateDep, tenant: TenantDep,
                      if_match: Annotated[str | None, Header()] = None) -> Deleted:
    await state.store.delete(tenant.name, task, if_match=parse_if_match(if_match))
    state.registry.invalidate(tenant.name, task)
    return Deleted(name=task)
