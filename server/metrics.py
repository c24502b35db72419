"""Prometheus metrics, one registry per app (so several apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Label values come from a fixed set: a client choosing them (any method name, any path) could
# otherwise grow the registry, and /metrics, without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
UNMATCHED = "unmatched"


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else "other"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_seconds = Histogram("taskdelta_http_request_seconds", "HTTP latency by route",
                                      ["method", "route", "status"], registry=r,
                                      buckets=LATENCY_BUCKETS)
        self.queue_depth = Gauge("taskdelta_queue_depth", "Requests queued, all tasks", registry=r)
        self.queued_tasks = Gauge("taskdelta_queued_tasks", "Tasks with queued requests", registry=r)
        self.batch_size = Histogram("taskdelta_batch_size", "Requests per batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_wait = Histogram("taskdelta_queue_wait_seconds", "Time queued before running",
                                    registry=r, buckets=LATENCY_BUCKETS)
        self.mixed_batches = Counter("taskdelta_mixed_batches", "Batches serving several tasks "
                                     "in one forward (mixed_batches on)", registry=r)
        self.mixed_tasks = Histogram("taskdelta_mixed_batch_tasks", "Tasks per mixed batch",
                                     registry=r, buckets=(2, 3, 4, 6, 8, 12, 16, 32, 64, 128))
        self.swaps = Counter("taskdelta_swaps", "Delta swaps (task changes)", registry=r)
        self.swap_seconds = Histogram("taskdelta_swap_seconds", "Restore + apply time", registry=r,
                                      buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1))
        self.cache_bytes = Gauge("taskdelta_cache_bytes", "Bytes of decoded deltas cached", registry=r)
        self.cache_entries = Gauge("taskdelta_cache_entries", "Decoded deltas cached", registry=r)
        self.uploads = Counter("taskdelta_uploads", "Delta uploads by outcome", ["outcome"],
                               registry=r)

    def follow_cache(self, stats) -> None:
        """Expose a cache's hit/miss counters (kept by the cache itself) as Prometheus counters."""
        self.registry.register(_CacheCounters(stats))

    def observe_swap(self, seconds: float) -> None:
        self.swaps.inc()
        self.swap_seconds.observe(seconds)

    def observe_batch(self, task: str, size: int, waits: list[float], run_s: float) -> None:
        self.batch_size.observe(size)
        for w in waits:
            self.queue_wait.observe(w)

    def observe_mixed(self, tasks: int, size: int) -> None:
        self.mixed_batches.inc()
        self.mixed_tasks.observe(tasks)

    def render(self, refresh: Callable[[], None] | None = None) -> bytes:
        if refresh is not None:
            refresh()
        return generate_latest(self.registry)


class _CacheCounters(Collector):
    def __init__(self, stats) -> None:
        self.stats = stats

    def collect(self):
        yield CounterMetricFamily("taskdelta_cache_hits", "Delta cache hits", value=self.stats.hits)
        yield CounterMetricFamily("taskdelta_cache_misses", "Delta cache misses",
                                  value=self.stats.misses)
