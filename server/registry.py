"""The task registry: resolve a task once, load exactly the version resolved, cache, invalidate.

A route resolves `(tenant, name)` to a `TaskRef` pinned to the version current at that moment
(from the cache when it is fresh, else from the store's metadata: no delta is fetched in the
route). The scheduler loads that version (`load`) under the request's deadline; if the task was
replaced meanwhile, the newer version runs and the answer names it (`Loaded.version`).
Everything here runs on the event loop; decoding runs in a helper thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass

from taskdelta.deltas import Base, PreparedDelta, TaskDelta, loads, prepare, validate
from taskdelta.deltas.validate import stamp as validation_stamp

from .cache import CacheEntry, DeltaCache
from .errors import BadTaskRequest, StoreUnavailable, TaskNotFound, VersionConflict
from .store import DeltaStore, StoredTask

BASE_TASK = "base"
# What a task of each kind does, which is also the name of its inference route
# (POST /v1/tasks/{name}/{verb}): a request of the wrong kind is told where to go.
VERB = {"classify": "classify", "regress": "score", "embed": "embed", "generate": "generate"}


@dataclass(frozen=True)
class TaskKey:
    tenant: str
    name: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}"


@dataclass(frozen=True)
class TaskRef:
    """A task resolved for one request: who, which version, what it can do."""

    tenant: str
    name: str
    kind: str
    version: int | None  # None for the base
    labels: tuple[str, ...] = ()

    @property
    def key(self) -> TaskKey:
        return TaskKey(self.tenant, self.name)

    @property
    def is_base(self) -> bool:
        return self.version is None


@dataclass(frozen=True)
class Loaded:
    """A task's delta as it will run: the version actually loaded (None: the base)."""

    version: int | None
    prepared: PreparedDelta | None
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Checked:
    """An uploaded delta that passed validation, with the metadata the store keeps."""

    delta: TaskDelta
    info: dict[str, str]


class TaskRegistry:
    def __init__(self, base: Base, store: DeltaStore, cache: DeltaCache,
                 version_check_s: float = 5.0) -> None:
        self.base = base
        self.store = store
        self.cache = cache
        self.version_check_s = version_check_s
        self._inflight: dict[tuple[str, str, int], asyncio.Future[Loaded]] = {}
        self._reading: dict[tuple[str, str], asyncio.Future[StoredTask]] = {}

    # -- uploads ----------------------------------------------------------------------------------

    async def check_upload(self, data: bytes, max_bytes: int) -> Checked:
        return await asyncio.to_thread(self._check_upload, data, max_bytes)

    def _check_upload(self, data: bytes, max_bytes: int) -> Checked:
        delta = loads(data, max_bytes=max_bytes)
        validate(delta, self.base)
        meta = delta.meta
        info = {
            "kind": meta.kind, "labels": json.dumps(meta.labels), "nnz": str(delta.nnz),
            "density": repr(delta.nnz / self.base.numel), "bytes": str(len(data)),
            "sha256": hashlib.sha256(data).hexdigest(), "base_fingerprint": meta.base_fingerprint,
            "created_at": repr(time.time()), "provenance": meta.provenance.model_dump_json(),
            "validated_for": validation_stamp(self.base),  # these exact bytes (sha256) passed
        }
        return Checked(delta=delta, info=info)

    # -- resolving --------------------------------------------------------------------------------

    def base_ref(self, tenant: str) -> TaskRef:
        kind = "generate" if self.base.is_causal_lm else "embed"
        return TaskRef(tenant=tenant, name=BASE_TASK, kind=kind, version=None)

    async def resolve(self, tenant: str, name: str, want: str) -> TaskRef:
        """The task pinned to its current version, refusing (400) what its kind cannot do."""
        if name == BASE_TASK:
            self._check_base_can(want)
            return self.base_ref(tenant)
        entry = self._fresh_entry(tenant, name)
        if entry is not None:
            ref = _ref_of_cached(tenant, name, entry)
        else:
            try:
                ref = await self._read_ref(tenant, name)
            except StoreUnavailable:  # Redis away: a cached task keeps serving (nobody can
                entry = self.cache.get((tenant, name))  # commit a newer version meanwhile)
                if entry is None:
                    raise
                ref = _ref_of_cached(tenant, name, entry)
        if ref.kind != want:
            raise BadTaskRequest(f"task {name!r} is a {ref.kind!r} task; it cannot {VERB[want]}"
                                 + (f" (use POST /v1/tasks/{name}/{VERB[ref.kind]})"
                                    if ref.kind in VERB else ""))
        return ref

    async def _read_ref(self, tenant: str, name: str) -> TaskRef:
        """The task's current metadata: one store read per task, however many requests ask."""
        key = (tenant, name)
        pending = self._reading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self.store.get(tenant, name))
            self._reading[key] = pending
            pending.add_done_callback(lambda _f: self._reading.pop(key, None))
        return _ref_of(await asyncio.shield(pending))

    def _check_base_can(self, want: str) -> None:
        if want == "classify":
            raise BadTaskRequest("the task 'base' has no classifier head: upload a classify "
                                 "delta and classify with it")
        if want == "regress":
            raise BadTaskRequest("the task 'base' has no regression head: upload a regress "
                                 "delta and score with it")
        if want == "generate" and not self.base.is_causal_lm:
            raise BadTaskRequest(f"the base {self.base.name!r} is an encoder and cannot "
                                 "generate text")

    def _fresh_entry(self, tenant: str, name: str) -> CacheEntry | None:
        entry = self.cache.get((tenant, name))
        if entry is None or time.monotonic() - entry.checked_at >= self.version_check_s:
            return None
        return entry

    # -- loading ----------------------------------------------------------------------------------

    def peek(self, ref: TaskRef) -> Loaded | None:
        """The pinned version if it is cached and fresh, without waiting (else None)."""
        if ref.is_base:
            return Loaded(None, None)
        entry = self._fresh_entry(ref.tenant, ref.name)
        if entry is None or entry.version != ref.version:
            return None
        self.cache.stats.hits += 1
        return entry.value

    async def load(self, ref: TaskRef) -> Loaded:
        """The delta of the version `ref` pinned; the current one if that was replaced since."""
        if ref.is_base:
            return Loaded(None, None)
        got = self.peek(ref)
        if got is not None:
            return got
        entry = self.cache.get((ref.tenant, ref.name))
        if entry is not None and entry.version == ref.version and await self._still_current(ref):
            entry.checked_at = time.monotonic()
            self.cache.stats.hits += 1
            return entry.value
        self.cache.stats.misses += 1
        return await self._fetch_once(ref)

    async def _still_current(self, ref: TaskRef) -> bool:
        try:
            return await self.store.current_version(ref.tenant, ref.name) == ref.version
        except StoreUnavailable:  # Redis away: nobody can commit a newer version meanwhile
            return True

    async def _fetch_once(self, ref: TaskRef) -> Loaded:
        """One fetch per (task, version), however many requests wait for it."""
        key = (ref.tenant, ref.name, ref.version or 0)
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(ref))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(pending)

    async def _fetch(self, ref: TaskRef) -> Loaded:
        # confirmed as of the read, not of the end of decoding (a change message that arrives
        # while decoding finds nothing to drop, and the re-check must still come in time)
        read_at = time.monotonic()
        try:
            stored, blob = await self.store.get_blob(ref.tenant, ref.name, version=ref.version)
        except VersionConflict:  # replaced since the route resolved it: run the current one
            stored, blob = await self.store.get_blob(ref.tenant, ref.name)
            if stored.info.get("kind") != ref.kind:
                raise TaskNotFound(f"task {ref.name!r} changed kind while the request waited; "
                                   "retry") from None
        checked = stored.info.get("validated_for") == validation_stamp(self.base)
        prepared = await asyncio.to_thread(self._decode, blob, str(ref.key), checked)
        loaded = Loaded(stored.version, prepared, tuple(prepared.labels))
        self.cache.put((ref.tenant, ref.name), CacheEntry(version=stored.version, value=loaded,
                                                          nbytes=prepared.nbytes, checked_at=read_at))
        return loaded

    def _decode(self, blob: bytes, name: str, checked: bool = False) -> PreparedDelta:
        """Stored bytes -> the swap's form. `checked`: the store's record says these exact bytes
        (sha256, verified by `get_blob`) passed the full check against this base's weights, in
        its serving dtypes, under these rules (`validate.stamp`); then only the content checksum
        and the scan of the increments for NaN / inf / overflow are skipped. Every other check
        runs on every load, the indices' range and order included, and the kernels check every
        index again as they write (SECURITY.md, docs/delta-format.md *Trust on load*)."""
        delta = loads(blob, verify_checksum=not checked)
        # unstamped bytes (another base, dtype or rules, an older server) get the full check
        validate(delta, self.base, contents=not checked)
        return prepare(delta, self.base, name=name)

    def grow(self, key: str, prepared: PreparedDelta, extra: int) -> None:
        """Count a delta's mixed form (built later, in the worker) in its cache entry."""
        tenant, name = key.split("/", 1)
        entry = self.cache.get((tenant, name))
        if entry is not None and entry.value.prepared is prepared:
            self.cache.grow((tenant, name), entry.value, extra)

    def invalidate(self, tenant: str, name: str) -> None:
        self.cache.invalidate((tenant, name))


def _ref_of_cached(tenant: str, name: str, entry: CacheEntry) -> TaskRef:
    loaded: Loaded = entry.value
    return TaskRef(tenant, name, loaded.prepared.kind, loaded.version, loaded.labels)  # type: ignore[union-attr]


def _ref_of(stored: StoredTask) -> TaskRef:
    labels = tuple(json.loads(stored.info.get("labels") or "[]"))
    return TaskRef(stored.tenant, stored.name, stored.info.get("kind", ""), stored.version, labels)
