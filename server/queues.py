"""Requests waiting for the engine: bounded queues, admission (429) and withdrawal.

Every request is counted against its task's bound and the server's from the moment it is
admitted until it leaves (answered, failed, expired or withdrawn); a full queue answers 429 with
Retry-After. A request becomes *ready* once its task's delta is loaded; only ready requests are
planned. Classify/embed requests wait per task (served in micro-batches, possibly over several
steps); generations wait in one arrival-ordered line until a decode slot and KV room free up.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .errors import Overloaded
from .jobs import GenerateJob, Job
from .registry import Loaded, TaskKey, TaskRef
from .sequences import Sequence


@dataclass(eq=False)
class Request:
    ref: TaskRef
    job: Job
    future: asyncio.Future[Any]
    seq: int  # arrival order
    enqueued_at: float  # loop.time()
    deadline: float  # loop.time()
    loaded: Loaded | None = None  # set once its delta is in: the request is ready
    counted: bool = False  # in the queue bounds (from admission until it leaves)
    # classify / embed: texts served over one or more micro-batches
    lengths: list[int] = field(default_factory=list)  # tokens per text
    order: list[int] = field(default_factory=list)  # text indices not yet taken, shortest first
    answers: dict[int, Any] = field(default_factory=dict)  # text index -> its result
    # generate
    sequence: Sequence | None = None

    @property
    def key(self) -> TaskKey:
        return self.ref.key

    @property
    def is_generate(self) -> bool:
        return isinstance(self.job, GenerateJob)

    @property
    def gone(self) -> bool:
        """Answered, failed, timed out or cancelled: nothing more to do for it."""
        return self.future.done()


class Queues:
    def __init__(self, max_queue: int, max_queued_total: int, retry_after_s: float) -> None:
        self.max_queue = max_queue
        self.max_queued_total = max_queued_total
        self.retry_after_s = retry_after_s
        self.encode: dict[TaskKey, deque[Request]] = {}  # requests with texts not yet taken
        self.generate: deque[Request] = deque()  # generations not yet admitted to decode
        self._counts: dict[TaskKey, int] = {}  # admitted and not yet left, per task
        self.total = 0

    def depth(self, key: TaskKey) -> int:
        return self._counts.get(key, 0)

    def tasks(self) -> list[TaskKey]:
        return list(self._counts)

    def admit(self, req: Request) -> None:
        """Count the request in, or refuse it (429) when its task's or the server's bound is full."""
        queued = self.depth(req.key)
        if queued >= self.max_queue:
            raise Overloaded(f"task {req.ref.name!r} has {queued} requests queued "
                             f"(limit {self.max_queue})", self.retry_after_s)
        if self.total >= self.max_queued_total:
            raise Overloaded(f"{self.total} requests queued on this server "
                             f"(limit {self.max_queued_total})", self.retry_after_s)
        self._counts[req.key] = queued + 1
        self.total += 1
        req.counted = True

    def line_up(self, req: Request) -> None:
        """Put an admitted request in its line."""
        if req.is_generate:
            self.generate.append(req)
        else:
            self.encode.setdefault(req.key, deque()).append(req)

    def leave(self, req: Request) -> None:
        """The request is done with: out of its line and its counts (idempotent)."""
        line = self.generate if req.is_generate else self.encode.get(req.key)
        if line is not None and req in line:
            line.remove(req)
            if not line and not req.is_generate:
                del self.encode[req.key]
        if not req.counted:
            return
        req.counted = False
        self.total -= 1
        n = self._counts[req.key]
        if n == 1:
            del self._counts[req.key]
        else:
            self._counts[req.key] = n - 1

    def drop_taken(self, key: TaskKey) -> None:
        """Requests of `key` whose every text is taken leave the line (their counts stay)."""
        line = self.encode.get(key)
        while line and not line[0].order:
            line.popleft()
        if line is not None and not line:
            del self.encode[key]

    def ready_encode_tasks(self) -> list[TaskKey]:
        return [k for k, line in self.encode.items() if any(r.loaded is not None for r in line)]

    def all_waiting(self) -> list[Request]:
        return [r for line in self.encode.values() for r in line] + list(self.generate)
