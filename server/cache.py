"""Decoded deltas in an LRU bounded in bytes, on the model's device.

Entries remember the version they hold and when it was last confirmed against the store, so a hit
older than `version_check_s` is re-checked: a missed pub/sub message cannot serve a stale delta for
longer than that bound.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


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
    """Thread-safe LRU keyed by (tenant, task). `capacity_bytes=0` keeps nothing."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[tuple[str, str], CacheEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str]) -> CacheEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple[str, str], entry: CacheEntry) -> None:
        with self._lock:
            self._drop(key)
            if entry.nbytes > self.capacity_bytes:
                return  # larger than the whole cache: served, never kept
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.capacity_bytes:
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self.stats.evictions += 1

    def grow(self, key: tuple[str, str], value: Any, extra: int) -> None:
        """Count `extra` more bytes for the entry that holds `value` (a form built from it later,
        such as a delta's mixed-batch corrections); nothing if the key now holds something else."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.value is not value:
                return
            entry.nbytes += extra
            self._bytes += extra
            while self._bytes > self.capacity_bytes and self._entries:
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self.stats.evictions += 1

    def invalidate(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes
