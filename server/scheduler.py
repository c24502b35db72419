"""Task-aware scheduler: one queue per task, one worker thread that owns the model.

Running a batch means swapping the task's delta into the base weights, so the scheduler batches
requests by task, keeps the swapped-in task while it has work (bounded by
`max_consecutive_batches` and `max_hold_ms` once another task waits, so none starves) and
otherwise picks the task whose oldest request has waited longest. Model work runs in one
dedicated thread; queues, deadlines, cancellation and delta prefetch live on the event loop.

With `mixing` (opt-in, settings.mixed_batches) a batch that its task leaves short of max_batch is
filled with other tasks' queued requests, oldest first, where the engine can run them together in
one forward: their deltas already loaded (a batch never waits on a cold load) and their requests
of a mixable kind.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from taskdelta.server.errors import DeadlineExceeded, Overloaded

if TYPE_CHECKING:
    from taskdelta.server.settings import Settings

log = logging.getLogger(__name__)

Execute = Callable[[str, Any, list[Any]], list[Any]]
Load = Callable[[str], Awaitable[Any]]
OnBatch = Callable[[str, int, list[float], float], None]


@dataclass(frozen=True)
class Mixing:
    """How to run requests of several tasks in one batch (the engine's side of it)."""

    peek: Callable[[str], Any]  # task -> its loaded handle now, without waiting; else None
    accepts: Callable[[Any, Any], bool]  # (handle, payload) -> may run in a mixed batch
    execute: Callable[[list[tuple[str, Any, list[Any]]]], list[Any]]  # results flat, in order
    on_batch: Callable[[int, int], None] | None = None  # (tasks, requests) of each mixed batch


@dataclass(eq=False)
class _Request:
    task: str
    payload: Any
    future: asyncio.Future[Any]
    seq: int  # arrival order: the smallest queued seq is the oldest request
    enqueued_at: float  # loop.time()
    deadline: float  # loop.time()
    queued: bool = True


class Scheduler:
    """Queues requests per task and runs them in task batches on one worker thread."""

    def __init__(
        self,
        execute: Execute,
        load: Load | None = None,
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        max_queued_total: int,
        max_consecutive_batches: int,
        max_hold_ms: float,
        retry_after_s: float,
        request_timeout_s: float = 60.0,
        prefetch_depth: int = 2,
        on_batch: OnBatch | None = None,
        mixing: Mixing | None = None,
    ) -> None:
        if min(max_batch, max_queue, max_queued_total, max_consecutive_batches) < 1:
            raise ValueError("max_batch, max_queue, max_queued_total and "
                             "max_consecutive_batches must be at least 1")
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.max_queue = max_queue
        self.max_queued_total = max_queued_total
        self.max_consecutive_batches = max_consecutive_batches
        self.max_hold_ms = max_hold_ms
        self.retry_after_s = retry_after_s
        self.request_timeout_s = request_timeout_s
        self.prefetch_depth = prefetch_depth
        self._execute = execute
        self._load = load
        self._on_batch = on_batch
        self._mixing = mixing

        self._queues: dict[str, deque[_Request]] = {}  # only non-empty queues
        self._total = 0
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()  # set on every arrival, withdrawal and on stop
        self._accepting = True
        self._stopping = False
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskdelta-engine")
        self._prefetches: dict[str, asyncio.Future[Any]] = {}

        self._current: str | None = None  # the task whose delta the engine has swapped in
        self._executing: str | None = None  # the task of the batch in the worker thread
        self._streak_batches = 0  # batches of the current task in a row
        self._streak_started = 0.0
        self._batches = 0
        self._swaps = 0
        self._mixed_batches = 0

    @classmethod
    def from_settings(cls, settings: Settings, execute: Execute, load: Load | None = None,
                      on_batch: OnBatch | None = None, mixing: Mixing | None = None) -> Scheduler:
        return cls(execute, load, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                   max_queue=settings.max_queue, max_queued_total=settings.max_queued_total,
                   max_consecutive_batches=settings.max_consecutive_batches,
                   max_hold_ms=settings.max_hold_ms, retry_after_s=settings.retry_after_s,
                   request_timeout_s=settings.request_timeout_s, on_batch=on_batch,
                   mixing=mixing if settings.mixed_batches else None)

    # -- what the rest of the server reads ------------------------------------------------------

    @property
    def current_task(self) -> str | None:
        return self._current

    @property
    def batches(self) -> int:
        return self._batches

    @property
    def swaps(self) -> int:
        """How often the task changed between consecutive batches."""
        return self._swaps

    @property
    def mixed_batches(self) -> int:
        """Batches that served several tasks in one forward."""
        return self._mixed_batches

    @property
    def total_depth(self) -> int:
        return self._total

    def depth(self, task: str) -> int:
        queue = self._queues.get(task)
        return len(queue) if queue else 0

    def queued_tasks(self) -> list[str]:
        """Tasks with queued requests, the one whose oldest request waited longest first."""
        return sorted(self._queues, key=self._head_seq)

    # -- submitting -------------------------------------------------------------------------------

    async def submit(self, task: str, payload: Any, timeout_s: float | None = None) -> Any:
        """Queue one request and wait for its result (or its exception)."""
        req = self._enqueue(task, payload, timeout_s)
        expiry = asyncio.timeout_at(req.deadline)
        try:
            async with expiry:
                return await req.future
        except TimeoutError:
            if not expiry.expired():
                raise  # a TimeoutError that the model work itself raised
            raise DeadlineExceeded(self._late(req)) from None
        finally:
            self._withdraw(req)  # timed out or cancelled: never runs, or its result is dropped

    def _enqueue(self, task: str, payload: Any, timeout_s: float | None) -> _Request:
        if not self._accepting:
            raise Overloaded("the server is shutting down", self.retry_after_s)
        queued = self.depth(task)
        if queued >= self.max_queue:
            raise Overloaded(f"task {task!r} has {queued} requests queued "
                             f"(limit {self.max_queue})", self.retry_after_s)
        if self._total >= self.max_queued_total:
            raise Overloaded(f"{self._total} requests queued on this server "
                             f"(limit {self.max_queued_total})", self.retry_after_s)
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        req = _Request(task, payload, loop.create_future(), next(self._seq), now, now + timeout)
        self._queues.setdefault(task, deque()).append(req)
        self._total += 1
        self._wakeup.set()
        if queued == 0:
            self._prefetch_if_next(task)
        return req

    def _withdraw(self, req: _Request) -> None:
        if not req.future.done():
            req.future.cancel()
        if req.queued:
            queue = self._queues[req.task]
            queue.remove(req)
            req.queued = False
            self._total -= 1
            if not queue:
                del self._queues[req.task]
            self._wakeup.set()

    def _late(self, req: _Request) -> str:
        waited = req.deadline - req.enqueued_at
        return f"request for task {req.task!r} did not finish within {waited:g} s"

    # -- the worker loop --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker loop on the running event loop (idempotent)."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(
                self._run(), name="taskdelta-scheduler")

    async def _run(self) -> None:
        while await self._wait_for_work():
            task = self._next_task()
            batch = await self._fill_batch(task)
            if batch:
                await self._run_batch(task, batch)

    async def _wait_for_work(self) -> bool:
        """Until some task has queued requests; False once stopping with nothing left."""
        while not self._queues:
            if self._stopping:
                return False
            self._streak_batches = 0  # idle: the current task stops "holding" the model
            self._wakeup.clear()
            await self._wakeup.wait()
        return True

    def _next_task(self) -> str:
        """The task to run next (there must be queued work): keep the swapped-in task while it
        has work and has not used up its turn; otherwise the task whose oldest request waited
        longest."""
        current = self._current
        if current in self._queues and not self._turn_over():
            return current
        others = [t for t in self._queues if t != current]  # non-empty: there is queued work
        return min(others, key=self._head_seq)

    def _turn_over(self) -> bool:
        """Whether the current task must hand over: another task waits and it had its turn."""
        if len(self._queues) < 2 or self._streak_batches == 0:
            return False
        held_ms = (asyncio.get_running_loop().time() - self._streak_started) * 1000
        return self._streak_batches >= self.max_consecutive_batches or held_ms >= self.max_hold_ms

    async def _fill_batch(self, task: str) -> list[_Request]:
        """Up to max_batch of the task's requests. While fewer are queued, wait for more until
        the oldest has waited max_wait_ms, but only while no other task has work (waiting then
        would idle the model)."""
        loop = asyncio.get_running_loop()
        while (0 < self.depth(task) < self.max_batch and len(self._queues) == 1
               and not self._stopping):
            oldest = self._queues[task][0]
            remaining = oldest.enqueued_at + self.max_wait_ms / 1000 - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            with suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
        return self._take(task)

    def _take(self, task: str) -> list[_Request]:
        queue = self._queues.get(task)
        batch: list[_Request] = []
        while queue and len(batch) < self.max_batch:
            req = queue.popleft()
            req.queued = False
            self._total -= 1
            batch.append(req)
        if queue is not None and not queue:
            del self._queues[task]
        return self._still_wanted(batch)

    def _still_wanted(self, batch: list[_Request]) -> list[_Request]:
        """Drop requests cancelled meanwhile; fail those past their deadline, unrun."""
        now = asyncio.get_running_loop().time()
        wanted = []
        for req in batch:
            if req.future.done():
                continue
            if now >= req.deadline:
                req.future.set_exception(DeadlineExceeded(self._late(req)))
                continue
            wanted.append(req)
        return wanted

    async def _run_batch(self, task: str, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        try:
            handle = await self._load_for_batch(task)
            batch = self._still_wanted(batch)  # loading took time: some may have gone
            if not batch:
                return
            groups = self._mix_in(task, handle, batch)
            if groups is not None:
                await self._run_mixed(groups)
                return
            self._count_batch(task)
            self._prefetch_next(task)
            started = loop.time()
            waits = [started - req.enqueued_at for req in batch]
            results = await self._in_worker(task, len(batch), self._execute, task, handle,
                                            [r.payload for r in batch])
            run_s = loop.time() - started
        except asyncio.CancelledError:
            _fail(batch, Overloaded("the server is shutting down", self.retry_after_s))
            raise
        except Exception as exc:  # load or execute failed: the whole batch fails with it
            _fail(batch, exc)
            return
        for req, result in zip(batch, results, strict=True):
            _settle(req, result)
        self._report(task, len(batch), waits, run_s)

    # -- mixed batches ----------------------------------------------------------------------------

    def _mix_in(self, task: str, handle: Any,
                batch: list[_Request]) -> list[tuple[str, Any, list[_Request]]] | None:
        """The batch of `task` filled up to max_batch with queued requests of tasks whose deltas
        are loaded, oldest first, as (task, handle, requests) groups; None when nothing joins
        (the batch then runs as it would without mixing: one task, swapped in, exact)."""
        mixing = self._mixing
        room = self.max_batch - len(batch)
        if mixing is None or room <= 0 or not self._queues:
            return None
        if not all(mixing.accepts(handle, req.payload) for req in batch):
            return None
        handles: dict[str, Any] = {}
        taken: dict[str, list[_Request]] = {}
        others = [q for t, q in self._queues.items() if t != task]
        for req in heapq.merge(*others, key=attrgetter("seq")):  # oldest first
            if req.task not in handles:
                handles[req.task] = mixing.peek(req.task)
            if handles[req.task] is None or not mixing.accepts(handles[req.task], req.payload):
                continue
            taken.setdefault(req.task, []).append(req)
            room -= 1
            if room == 0:
                break
        for t, reqs in taken.items():
            self._dequeue(t, reqs)
        mixed = [(task, handle, batch)]
        mixed += [(t, handles[t], live) for t, reqs in taken.items() if (live := self._still_wanted(reqs))]
        return mixed if len(mixed) > 1 else None  # the others went meanwhile: one task, exact

    def _dequeue(self, task: str, reqs: list[_Request]) -> None:
        queue = self._queues[task]
        gone = set(map(id, reqs))
        kept = deque(r for r in queue if id(r) not in gone)
        for req in reqs:
            req.queued = False
        self._total -= len(queue) - len(kept)
        if kept:
            self._queues[task] = kept
        else:
            del self._queues[task]

    async def _in_worker(self, running: str, n: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """`fn(*args)` in the engine's worker thread, which must answer each of the n requests."""
        self._executing = running
        try:
            results = list(await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args))
        finally:
            self._executing = None
        if len(results) != n:
            raise RuntimeError(f"{getattr(fn, '__name__', 'execute')} returned {len(results)} "
                               f"results for {n} requests of task {running!r}")
        return results

    async def _run_mixed(self, groups: list[tuple[str, Any, list[_Request]]]) -> None:
        assert self._mixing is not None
        loop = asyncio.get_running_loop()
        first = groups[0][0]
        batch = [req for _, _, reqs in groups for req in reqs]
        try:
            self._count_mixed()
            self._prefetch_next(first)
            started = loop.time()
            waits = [started - req.enqueued_at for req in batch]
            parts = [(t, h, [r.payload for r in reqs]) for t, h, reqs in groups]
            results = await self._in_worker(first, len(batch), self._mixing.execute, parts)
            run_s = loop.time() - started
        except asyncio.CancelledError:
            _fail(batch, Overloaded("the server is shutting down", self.retry_after_s))
            raise
        except Exception as exc:  # the whole mixed batch fails with it
            _fail(batch, exc)
            return
        for req, result in zip(batch, results, strict=True):
            _settle(req, result)
        self._report(first, len(batch), waits, run_s)
        if self._mixing.on_batch is not None:
            try:
                self._mixing.on_batch(len(groups), len(batch))
            except Exception:
                log.exception("mixing.on_batch hook failed")

    def _count_mixed(self) -> None:
        """A mixed batch runs on the exact base: no task stays swapped in after it."""
        if self._current is not None:
            self._swaps += 1
        self._current = None
        self._streak_batches = 0
        self._batches += 1
        self._mixed_batches += 1

    def _count_batch(self, task: str) -> None:
        if task != self._current:
            if self._current is not None:
                self._swaps += 1
            self._current = task
            self._streak_batches = 0
        if self._streak_batches == 0:
            self._streak_started = asyncio.get_running_loop().time()
        self._streak_batches += 1
        self._batches += 1

    def _report(self, task: str, size: int, waits: list[float], run_s: float) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(task, size, waits, run_s)
        except Exception:
            log.exception("on_batch hook failed")

    # -- loading and prefetching deltas -----------------------------------------------------------

    async def _load_for_batch(self, task: str) -> Any:
        if self._load is None:
            return None
        pending = self._prefetches.get(task)
        if pending is not None:  # its delta is on the way already: reuse that load
            with suppress(Exception):
                return await asyncio.shield(pending)
        return await self._load(task)

    def _prefetch_next(self, running: str) -> None:
        """Warm the deltas of the tasks expected to run after `running`."""
        waiting = (t for t in self._queues if t != running)
        for task in heapq.nsmallest(self.prefetch_depth, waiting, key=self._head_seq):
            self._prefetch(task)

    def _prefetch_if_next(self, task: str) -> None:
        """A task that just got its first request while a batch runs: warm it if it is among
        the next `prefetch_depth` tasks (it is the youngest, so it ranks after the others)."""
        if self._executing is None or task == self._executing:
            return
        ahead = len(self._queues) - 1 - (self._executing in self._queues)
        if ahead < self.prefetch_depth:
            self._prefetch(task)

    def _prefetch(self, task: str) -> None:
        if self._load is None or task in self._prefetches:
            return
        future = asyncio.ensure_future(self._load(task))
        self._prefetches[task] = future
        future.add_done_callback(partial(self._prefetched, task))

    def _prefetched(self, task: str, future: asyncio.Future[Any]) -> None:
        if self._prefetches.get(task) is future:
            del self._prefetches[task]
        if not future.cancelled() and future.exception() is not None:
            log.warning("prefetching task %r failed: %r", task, future.exception())

    def _head_seq(self, task: str) -> int:
        return self._queues[task][0].seq

    # -- stopping ---------------------------------------------------------------------------------

    async def stop(self, *, drain: bool = False) -> None:
        """Stop accepting; fail the queued requests (or, with `drain`, run them first); let the
        batch in flight finish; join the worker thread."""
        self._accepting = False
        if not drain or self._worker is None:
            self._fail_queued()
        self._stopping = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        for future in list(self._prefetches.values()):
            future.cancel()
        await asyncio.to_thread(self._executor.shutdown, True)

    def _fail_queued(self) -> None:
        error = Overloaded("the server is shutting down", self.retry_after_s)
        for queue in self._queues.values():
            for req in queue:
                req.queued = False
            _fail(list(queue), error)
        self._queues.clear()
        self._total = 0


def _settle(req: _Request, outcome: Any) -> None:
    """Hand one result to its request; an exception instance fails only that request."""
    if req.future.done():  # cancelled or timed out while running: the result is dropped
        return
    if isinstance(outcome, BaseException):
        req.future.set_exception(outcome)
    else:
        req.future.set_result(outcome)


def _fail(batch: list[_Request], error: BaseException) -> None:
    for req in batch:
        _settle(req, error)
