"""Decoded deltas in an LRU bounded in bytes, on the model's device, shared fairly by tenants.

Entries remember the version they hold and when it was last confirmed against the store, so a hit
older than `version_check_s` is re-checked: a missed pub/sub message cannot serve a stale delta for
longer than that bound.

Fairness: when the cache is full, the entry evicted is the least recently used one of a tenant
holding more than its fair share (the capacity divided by the tenants that hold entries). A
tenant alone may fill the cache; as soon as others need room, its entries go first, and one
tenant's large deltas never evict another tenant that stays within its share.

A delta larger than the whole cache is never counted in it, but the last one is held for
`oversize_hold_s` outside the bound, so that the few lookups one request makes (resolving the
task, then running it) find it instead of fetching and decoding it again each time.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, str]  # (tenant, task)


@dataclass(eq=False)
class CacheEntry:
    version: int
    value: Any  # a PreparedDelta
    nbytes: int
    checked_at: float = field(default_factory=time.monotonic)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class DeltaCache:
    """Thread-safe LRU keyed by (tenant, task). `capacity_bytes=0` keeps nothing (but the one
    oversized entry, for its hold)."""

    def __init__(self, capacity_bytes: int, oversize_hold_s: float = 60.0) -> None:
        self.capacity_bytes = capacity_bytes
        self.oversize_hold_s = oversize_hold_s
        self._entries: OrderedDict[Key, CacheEntry] = OrderedDict()
        self._bytes = 0
        self._by_tenant: Counter[str] = Counter()  # bytes held per tenant
        self._oversized: tuple[Key, CacheEntry, float] | None = None  # (key, entry, expires)
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def tenant_bytes(self, tenant: str) -> int:
        return self._by_tenant[tenant]

    def get(self, key: Key) -> CacheEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            return self._held(key)

    def put(self, key: Key, entry: CacheEntry) -> None:
        with self._lock:
            self._drop(key)
            if entry.nbytes > self.capacity_bytes:  # served, never counted: held a moment only
                self._oversized = (key, entry, time.monotonic() + self.oversize_hold_s)
                return
            self._entries[key] = entry
            self._account(key, entry.nbytes)
            self._evict(protect=key)

    def grow(self, key: Key, value: Any, extra: int) -> None:
        """Count `extra` more bytes for the entry that holds `value` (a form built from it later,
        such as a delta's mixed-batch corrections); nothing if the key now holds something else."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.value is not value:
                return
            entry.nbytes += extra
            self._account(key, extra)
            self._evict(protect=None)

    def invalidate(self, key: Key) -> None:
        with self._lock:
            self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_tenant.clear()
            self._bytes = 0
            self._oversized = None

    # -- under the lock ---------------------------------------------------------------------

    def _held(self, key: Key) -> CacheEntry | None:
        if self._oversized is None or self._oversized[0] != key:
            return None
        _, entry, expires = self._oversized
        if time.monotonic() >= expires:
            self._oversized = None
            return None
        return entry

    def _account(self, key: Key, nbytes: int) -> None:
        self._bytes += nbytes
        self._by_tenant[key[0]] += nbytes

    def _evict(self, protect: Key | None) -> None:
        """Evict until within capacity, tenants over their fair share first. `protect`, the
        entry just put, goes last: if it must go, it is held like an oversized one."""
        while self._bytes > self.capacity_bytes and self._entries:
            victim = self._victim(protect)
            entry = self._entries[victim]
            self._drop(victim)
            self.stats.evictions += 1
            if victim == protect:
                self._oversized = (victim, entry, time.monotonic() + self.oversize_hold_s)

    def _victim(self, protect: Key | None) -> Key:
        """The least recently used entry of a tenant over its share (the protected one only if
        no other is); with no tenant over (not reached: over capacity, some tenant is over its
        share), the least recently used entry."""
        share = self.capacity_bytes / max(1, len(self._by_tenant))
        over = {t for t, n in self._by_tenant.items() if n > share}
        for key in self._entries:  # oldest first
            if key[0] in over and key != protect:
                return key
        return protect if protect in self._entries else next(iter(self._entries))

    def _drop(self, key: Key) -> None:
        if self._oversized is not None and self._oversized[0] == key:
            self._oversized = None
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes
            self._by_tenant[key[0]] -= entry.nbytes
            if self._by_tenant[key[0]] <= 0:
                del self._by_tenant[key[0]]
