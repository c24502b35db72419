"""Admitting uploads: a bounded number at a time, their bytes counted against the tenant's quota
while they are still arriving, and the body read into one buffer of its declared size.

A delta upload may be hundreds of MB and is checked (decoded, validated) before it is stored, so
the server bounds how many are in memory at once (`max_concurrent_uploads`, and per tenant
`max_uploads_per_tenant`; beyond: 429 with Retry-After) and refuses, before reading it, a body
that would take the tenant past its byte quota together with what is stored and what its other
uploads in progress have declared. The store's commit checks the quota again, atomically; the
in-progress count is this process's (replicas each count their own).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from fastapi import Request

from .errors import Overloaded, PayloadTooLarge, QuotaExceeded
from .settings import Settings
from .store import DeltaStore


@dataclass
class Reservation:
    """One upload in progress: its tenant and the bytes counted for it so far."""

    tenant: str
    nbytes: int = 0


class UploadGate:
    """Slots for uploads in progress, and the bytes they hold per tenant (one event loop)."""

    def __init__(self, max_total: int, max_per_tenant: int, retry_after_s: float = 1.0) -> None:
        self.max_total = max_total
        self.max_per_tenant = max_per_tenant
        self.retry_after_s = retry_after_s
        self._open: list[Reservation] = []

    @classmethod
    def of(cls, request: Request, settings: Settings) -> UploadGate:
        """The app's gate, made on first use (routes share it through `app.state`)."""
        gate = getattr(request.app.state, "upload_gate", None)
        if gate is None:
            gate = cls(settings.max_concurrent_uploads, settings.max_uploads_per_tenant,
                       settings.retry_after_s)
            request.app.state.upload_gate = gate
        return gate

    @property
    def in_progress(self) -> int:
        return len(self._open)

    def reserved(self, tenant: str) -> int:
        """Bytes the tenant's uploads in progress hold."""
        return sum(r.nbytes for r in self._open if r.tenant == tenant)

    @contextlib.contextmanager
    def slot(self, tenant: str) -> Iterator[Reservation]:
        per_tenant = Counter(r.tenant for r in self._open)
        if len(self._open) >= self.max_total:
            raise Overloaded(f"{len(self._open)} uploads are in progress, the limit is "
                             f"{self.max_total}; retry later", self.retry_after_s)
        if per_tenant[tenant] >= self.max_per_tenant:
            raise Overloaded(f"tenant {tenant!r} has {per_tenant[tenant]} uploads in progress, "
                             f"the limit is {self.max_per_tenant}; retry later", self.retry_after_s)
        reservation = Reservation(tenant)
        self._open.append(reservation)
        try:
            yield reservation
        finally:
            self._open.remove(reservation)


async def quota_left(store: DeltaStore, gate: UploadGate, tenant: str, task: str,
                     max_bytes: int) -> int:
    """Bytes this upload may have: the quota less what is stored (but the version it would
    replace) and what the tenant's other uploads in progress hold."""
    _, used = await store.usage(tenant)
    replaced = 0
    if await store.current_version(tenant, task) is not None:
        with contextlib.suppress(Exception):  # deleted meanwhile: nothing is replaced
            replaced = int((await store.get(tenant, task)).info.get("bytes", 0))
    return max_bytes - (used - replaced) - gate.reserved(tenant)


async def read_upload(request: Request, limit: int, allowance: int,
                      reservation: Reservation) -> bytearray:
    """The body, refused at `limit` bytes (413) or past the tenant's `allowance` (403) without
    reading the rest. A declared length is reserved (and checked) before anything is read and
    the buffer allocated once at that size; a streamed body is counted as it arrives."""
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    _charge(reservation, declared or 0, allowance)
    body = bytearray(declared or 0)
    size = 0
    async for chunk in request.stream():
        if size + len(chunk) > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
        if size + len(chunk) > len(body):  # streamed, or longer than declared (the server
            body.extend(bytes(size + len(chunk) - len(body)))  # refuses that; never overrun)
        body[size:size + len(chunk)] = chunk
        size += len(chunk)
        _charge(reservation, size, allowance)
    del body[size:]  # shorter than declared: the client stopped early
    return body


def _declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    return int(declared) if declared and declared.isascii() and declared.isdigit() else None


def _charge(reservation: Reservation, nbytes: int, allowance: int) -> None:
    if nbytes > allowance:
        raise QuotaExceeded(f"storing {nbytes} more bytes would take tenant "
                            f"{reservation.tenant!r} past its quota (counting the uploads it has "
                            f"in progress): {max(0, allowance)} bytes are left")
    reservation.nbytes = max(reservation.nbytes, nbytes)
