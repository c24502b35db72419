"""The engine: owns the base model and its swapper, loads and caches deltas, runs batches.

`execute` runs in the scheduler's single worker thread and is the only code that touches the live
weights. A task stays swapped in after its batch (the next batch of the same task swaps nothing);
a batch of another task restores the base first. `load` runs on the event loop: it returns the
task's decoded delta from the cache, fetching and decoding it (in a helper thread) on a miss.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskdelta.deltas import Base, PreparedDelta, Swapper, TaskDelta, loads, prepare, validate
from taskdelta.deltas.mixed import MixedDelta, Mixer
from taskdelta.deltas.validate import stamp as validation_stamp

from .cache import CacheEntry, DeltaCache
from .errors import BadTaskRequest, StoreUnavailable
from .inference import MixedPart, classify, classify_mixed, embed, embed_mixed, generate
from .jobs import ClassifyJob, EmbedJob, GenerateJob, Job
from .store import DeltaStore

log = logging.getLogger("taskdelta.engine")
BASE_TASK = "base"


@dataclass(frozen=True)
class TaskRef:
    """What the engine needs to know about a task to accept a request for it."""

    tenant: str
    name: str
    kind: str
    version: int | None  # None for the base
    labels: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.name}"


@dataclass(frozen=True)
class Checked:
    """An uploaded delta that passed validation, with the metadata the store keeps."""

    delta: TaskDelta
    info: dict[str, str]


class Engine:
    def __init__(self, base: Base, store: DeltaStore, cache: DeltaCache,
                 version_check_s: float = 5.0,
                 on_swap: Callable[[float], None] | None = None, mixed: bool = False) -> None:
        self.base = base
        self.store = store
        self.cache = cache
        self.version_check_s = version_check_s
        self.swapper = Swapper(base)
        self.on_swap = on_swap
        self.mixer = Mixer(base) if mixed else None  # mixed batches (opt-in): execute_mixed
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}

    # --- accepting uploads (event loop; heavy work in a thread) --------------------------------

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

    # --- resolving tasks (event loop) ------------------------------------------------------------

    def base_ref(self, tenant: str) -> TaskRef:
        kind = "generate" if self.base.is_causal_lm else "embed"
        return TaskRef(tenant=tenant, name=BASE_TASK, kind=kind, version=None)

    async def resolve(self, tenant: str, name: str, want: str) -> TaskRef:
        """The task's ref, refusing (400) a request its kind or base cannot serve."""
        if name == BASE_TASK:
            if want == "classify":
                raise BadTaskRequest("the task 'base' has no classifier head: upload a classify "
                                     "delta and classify with it")
            if want == "generate" and not self.base.is_causal_lm:
                raise BadTaskRequest(f"the base {self.base.name!r} is an encoder and cannot "
                                     "generate text")
            return self.base_ref(tenant)
        prepared, version = await self.load_prepared(tenant, name)
        ref = TaskRef(tenant=tenant, name=name, kind=prepared.kind, version=version,
                      labels=prepared.labels)
        if ref.kind != want:
            raise BadTaskRequest(f"task {name!r} is a {ref.kind!r} task; it cannot {want}")
        return ref

    async def load(self, key: str) -> PreparedDelta | None:
        """The scheduler's loader: task key `tenant/name` -> decoded delta (None for the base)."""
        tenant, name = key.split("/", 1)
        if name == BASE_TASK:
            return None
        prepared, _ = await self.load_prepared(tenant, name)
        return prepared

    async def load_prepared(self, tenant: str, name: str) -> tuple[PreparedDelta, int]:
        key = (tenant, name)
        entry = self.cache.get(key)
        if entry is not None:
            now = time.monotonic()
            if now - entry.checked_at < self.version_check_s:
                self.cache.stats.hits += 1
                return entry.value, entry.version
            try:
                current = await self.store.current_version(tenant, name)
            except StoreUnavailable:  # Redis away: keep serving what is cached (nobody can
                self.cache.stats.hits += 1  # commit a newer version meanwhile); re-check later
                return entry.value, entry.version
            if current == entry.version:
                entry.checked_at = now  # as of the read
                self.cache.stats.hits += 1
                return entry.value, entry.version
            self.cache.invalidate(key)
        self.cache.stats.misses += 1
        pending = self._inflight.get(key)
        if pending is None:  # one fetch per task, however many requests wait for it
            pending = asyncio.ensure_future(self._fetch(tenant, name))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(pending)

    async def _fetch(self, tenant: str, name: str) -> tuple[PreparedDelta, int]:
        # Confirmed as of the read, not of the end of decoding: a change message that arrives
        # while decoding finds nothing to drop, and the re-check must still come in time.
        read_at = time.monotonic()
        stored, blob = await self.store.get_blob(tenant, name)
        checked = stored.info.get("validated_for") == validation_stamp(self.base)
        prepared = await asyncio.to_thread(self._decode, blob, f"{tenant}/{name}", checked)
        self.cache.put((tenant, name), CacheEntry(version=stored.version, value=prepared,
                                                  nbytes=prepared.nbytes, checked_at=read_at))
        return prepared, stored.version

    def _decode(self, blob: bytes, name: str, checked: bool = False) -> PreparedDelta:
        """Stored bytes -> the swap's form. `checked`: the store's record says these bytes passed
        the full check against this base under these rules (`_check_upload`), and `get_blob`
        verified that the bytes read back are those (their sha256, against that record). Then
        the content checksum and the per-entry checks (index range and order, finite values)
        are not repeated: they cost a cold task ~10 ms and cannot find anything new. The form
        is still checked, and the swap checks every index again as it writes (the kernel, or
        `global_idx` on the torch path), so even a Redis that holds matching but wrong bytes
        (it is trusted: SECURITY.md) cannot corrupt the base. Anything else (a record without
        the stamp, another base, older rules) is checked in full."""
        delta = loads(blob, verify_checksum=not checked)
        validate(delta, self.base, contents=not checked)  # the base may have changed since upload
        return prepare(delta, self.base, name=name)

    def invalidate(self, tenant: str, name: str) -> None:
        self.cache.invalidate((tenant, name))

    # --- running batches (the worker thread) -----------------------------------------------------

    def execute(self, key: str, prepared: PreparedDelta | None, jobs: list[Job]) -> list[Any]:
        self._swap_to(prepared)
        model = self.swapper.task_model
        tokenizer = self.base.tokenizer
        results: list[Any] = [None] * len(jobs)
        by_type: dict[type, list[int]] = {}
        for i, job in enumerate(jobs):
            by_type.setdefault(type(job), []).append(i)
        if ClassifyJob in by_type:
            idx = by_type[ClassifyJob]
            labels = prepared.labels if prepared is not None else ()
            for i, r in zip(idx, classify(model, tokenizer, labels, [jobs[i] for i in idx]),
                            strict=True):
                results[i] = r
        if EmbedJob in by_type:
            idx = by_type[EmbedJob]
            for i, r in zip(idx, embed(self.base.backbone, tokenizer, [jobs[i] for i in idx]),
                            strict=True):
                results[i] = r
        for i in by_type.get(GenerateJob, []):
            try:
                results[i] = generate(model, tokenizer, jobs[i])  # type: ignore[arg-type]
            except Exception as exc:  # one bad generation fails only its request
                results[i] = exc
        return results

    def _swap_to(self, prepared: PreparedDelta | None) -> None:
        if self.swapper.active is prepared:
            return
        started = time.perf_counter()
        if self.swapper.active is not None:
            self.swapper.restore()
        if prepared is not None:
            self.swapper.apply(prepared)
        if self.on_swap is not None:
            self.on_swap(time.perf_counter() - started)

    # --- mixed batches (opt-in): several tasks in one forward, the base untouched --------------

    def peek(self, key: str) -> PreparedDelta | None:
        """The scheduler's look without waiting (event loop): the task's delta if it is cached and
        confirmed recently enough, else None (a base, a cold task, one due for a version check)."""
        tenant, name = key.split("/", 1)
        entry = self.cache.get((tenant, name)) if name != BASE_TASK else None
        if entry is None or time.monotonic() - entry.checked_at >= self.version_check_s:
            return None
        self.cache.stats.hits += 1
        return entry.value

    def mixable(self, prepared: PreparedDelta | None, job: Job) -> bool:
        """Whether this request of this task may run in a mixed batch."""
        if self.mixer is None or prepared is None or not isinstance(job, ClassifyJob | EmbedJob):
            return False
        return self.mixer.why_not(prepared) is None

    def execute_mixed(self, parts: list[tuple[str, PreparedDelta | None, list[Job]]]) -> list[Any]:
        """One forward (per input shape) for several tasks' classify/embed jobs: the base weights
        stay as they are and each task's delta corrects its own rows. Results in the order of the
        parts and their jobs. Within rounding of the merged model's outputs, not bit-identical."""
        assert self.mixer is not None, "the engine was not built for mixed batches"
        self._swap_to(None)  # the base, exactly: no task swapped in
        tokenizer, backbone = self.base.tokenizer, self.base.backbone
        by_kind: dict[type, list[tuple[int, MixedPart]]] = {}
        for n, (key, prepared, jobs) in enumerate(parts):
            mixed = self._mixed_form(key, prepared) if prepared is not None else None
            for kind in (ClassifyJob, EmbedJob):
                mine = [j for j in jobs if isinstance(j, kind)]
                if mine:
                    part = MixedPart(mixed, prepared.head if prepared else None,
                                     prepared.labels if prepared else (), mine)
                    by_kind.setdefault(kind, []).append((n, part))
        answers: dict[tuple[int, type], list[Any]] = {}
        for kind, run in ((ClassifyJob, classify_mixed), (EmbedJob, embed_mixed)):
            group = by_kind.get(kind, [])
            if group:
                got = run(self.mixer, backbone, tokenizer, [part for _, part in group])
                answers.update({(n, kind): list(r) for (n, _), r in zip(group, got, strict=True)})
        results = []
        for n, (_, _, jobs) in enumerate(parts):
            for job in jobs:
                results.append(answers[(n, type(job))].pop(0))
        return results

    def _mixed_form(self, key: str, prepared: PreparedDelta) -> MixedDelta:
        """The delta's corrections, built on its first mixed batch and counted in its cache
        entry's bytes from then on."""
        assert self.mixer is not None
        mixed = self.mixer.cached(prepared)
        if mixed is None:
            mixed = self.mixer.build(prepared)
            tenant, name = key.split("/", 1)
            self.cache.grow((tenant, name), prepared, mixed.nbytes)
        return mixed

    def restore_base(self) -> None:
        """Put the exact base back (shutdown, tests)."""
        if self.swapper.active is not None:
            self.swapper.restore()
