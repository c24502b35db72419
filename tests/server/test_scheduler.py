"""The task-aware scheduler: batching by task, fair hand-over, oldest-first, bounded queues,
deadlines, cancellation, per-item errors, the single worker thread, prefetch and stop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskdelta.server.errors import DeadlineExceeded, Overloaded
from taskdelta.server.scheduler import Scheduler
from taskdelta.server.settings import get_settings


class FakeModel:
    """execute/load doubles: record what ran, on which thread and with which handle; a payload
    with a gate blocks the worker thread until the test opens it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any]]] = []  # (task, payloads) in execution order
        self.handles: list[Any] = []
        self.threads: list[int] = []
        self.loads: list[str] = []
        self.gates: dict[Any, threading.Event] = {}
        self.failing_loads: set[str] = set()
        self.load_gates: dict[str, asyncio.Event] = {}

    def gate(self, payload: Any) -> threading.Event:
        self.gates[payload] = threading.Event()
        return self.gates[payload]

    def hold_load(self, task: str) -> asyncio.Event:
        self.load_gates[task] = asyncio.Event()
        return self.load_gates[task]

    def execute(self, task: str, handle: Any, payloads: list[Any]) -> list[Any]:
        self.calls.append((task, list(payloads)))
        self.handles.append(handle)
        self.threads.append(threading.get_ident())
        for p in payloads:
            if p in self.gates:
                assert self.gates[p].wait(10), "a test forgot to open a gate"
        if "boom" in payloads:
            raise RuntimeError("the batch blew up")
        return [ValueError(p) if str(p).startswith("bad") else f"{task}:{p}" for p in payloads]

    async def load(self, task: str) -> str:
        self.loads.append(task)
        await asyncio.sleep(0)
        if task in self.load_gates:
            await self.load_gates[task].wait()
        if task in self.failing_loads:
            raise LookupError(f"no delta for {task}")
        return f"handle:{task}"

    @property
    def tasks(self) -> list[str]:
        return [task for task, _ in self.calls]

    @property
    def executed(self) -> list[Any]:
        return [p for _, payloads in self.calls for p in payloads]

    def started(self, payload: Any) -> bool:
        return payload in self.executed


async def until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    """Poll the loop until `condition` holds; the bound only turns a hang into a failure."""
    end = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < end, "condition never became true"
        await asyncio.sleep(0.001)


DEFAULTS: dict[str, Any] = dict(max_batch=4, max_wait_ms=1, max_queue=100, max_queued_total=1000,
                                max_consecutive_batches=100, max_hold_ms=60_000, retry_after_s=2,
                                request_timeout_s=30)


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
async def make(model: FakeModel) -> AsyncIterator[Callable[..., Scheduler]]:
    made: list[Scheduler] = []

    def _make(start: bool = True, load: bool = True, **overrides: Any) -> Scheduler:
        s = Scheduler(model.execute, model.load if load else None, **{**DEFAULTS, **overrides})
        if start:
            s.start()
        made.append(s)
        return s

    yield _make
    for gate in [*model.gates.values(), *model.load_gates.values()]:
        gate.set()
    for s in made:
        await s.stop()


async def hold_worker(s: Scheduler, model: FakeModel, task: str = "A", payload: Any = "A1"):
    """Start a batch that blocks the worker until the returned gate opens."""
    gate = model.gate(payload)
    running = asyncio.create_task(s.submit(task, payload))
    await until(lambda: model.started(payload))
    return gate, running


def submit_all(s: Scheduler, items: list[tuple[str, Any]]) -> list[asyncio.Task[Any]]:
    return [asyncio.create_task(s.submit(task, payload)) for task, payload in items]


# -- batching ---------------------------------------------------------------------------------


async def test_one_task_is_batched_up_to_max_batch_in_arrival_order(make, model):
    s = make(max_batch=4, max_wait_ms=20)
    results = await asyncio.gather(*(s.submit("A", i) for i in range(10)))
    assert results == [f"A:{i}" for i in range(10)]
    assert [len(p) for _, p in model.calls] == [4, 4, 2]
    assert model.executed == list(range(10))
    assert (s.batches, s.swaps, s.current_task) == (3, 0, "A")


async def test_waits_up_to_max_wait_ms_to_fill_a_batch(make, model):
    s = make(max_batch=2, max_wait_ms=5_000)  # the batch fills long before the wait ends
    first = asyncio.create_task(s.submit("A", 1))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(s.submit("A", 2))
    assert await asyncio.gather(first, second) == ["A:1", "A:2"]
    assert model.calls == [("A", [1, 2])]


async def test_does_not_wait_to_fill_while_another_task_has_work(make, model):
    s = make(max_batch=8, max_wait_ms=60_000)  # waiting it out would hit the 10 s bound
    a = asyncio.create_task(s.submit("A", 1))
    await asyncio.sleep(0.01)  # the worker is now waiting for more A
    b = asyncio.create_task(s.submit("B", 1))
    async with asyncio.timeout(10):
        assert await a == "A:1"
    assert model.tasks == ["A"] and s.depth("B") == 1  # B, alone now, waits for company
    await s.stop(drain=True)  # stopping ends that wait
    assert await b == "B:1"


# -- which task runs next --------------------------------------------------------------------


async def test_keeps_the_swapped_in_task_while_it_has_work(make, model):
    s = make(max_batch=1)
    gate, first = await hold_worker(s, model)
    rest = submit_all(s, [("B", 1), ("A", 2), ("A", 3), ("A", 4)])  # B waited longest
    await until(lambda: s.total_depth == 4)
    gate.set()
    await asyncio.gather(first, *rest)
    assert model.tasks == ["A", "A", "A", "A", "B"]
    assert s.swaps == 1


async def test_hot_task_hands_over_after_max_consecutive_batches(make, model):
    s = make(max_batch=1, max_consecutive_batches=2)
    gate, first = await hold_worker(s, model)
    rest = submit_all(s, [(t, i) for i in range(6) for t in "AB"])
    await until(lambda: s.total_depth == 12)
    gate.set()
    await asyncio.gather(first, *rest)
    assert "".join(model.tasks) == "AABBAABBAABBA"
    assert s.swaps == 6


async def test_hot_task_hands_over_after_max_hold_ms(make, model):
    s = make(max_batch=1, max_hold_ms=1)
    gate, first = await hold_worker(s, model)
    rest = submit_all(s, [("A", 2), ("A", 3), ("B", 1), ("A", 4)])
    await until(lambda: s.total_depth == 4)
    await asyncio.sleep(0.005)  # A has now held the model for longer than max_hold_ms
    gate.set()
    await asyncio.gather(first, *rest)
    assert model.tasks == ["A", "B", "A", "A", "A"]


async def test_a_turn_restarts_after_the_worker_went_idle(make, model):
    s = make(max_batch=1, max_consecutive_batches=1)
    assert await s.submit("A", 1) == "A:1"  # A's turn is used up, then the worker idles
    both = submit_all(s, [("B", 1), ("A", 2)])
    await asyncio.gather(*both)
    # A is still swapped in and starts a new turn rather than handing over to older B at once
    assert model.tasks == ["A", "A", "B"]


async def test_picks_the_task_whose_oldest_request_waited_longest(make, model):
    s = make(max_batch=1, max_consecutive_batches=1)
    gate, first = await hold_worker(s, model)
    rest = submit_all(s, [("X", 1), ("Y", 1), ("Z", 1), ("X", 2)])
    await until(lambda: s.total_depth == 4)
    assert s.queued_tasks() == ["X", "Y", "Z"]
    assert (s.depth("X"), s.depth("Y"), s.depth("nothing")) == (2, 1, 0)
    gate.set()
    await asyncio.gather(first, *rest)
    # after X hands over, Z (queued before X's second request) goes before X again
    assert model.tasks == ["A", "X", "Y", "Z", "X"]


# -- bounded queues ----------------------------------------------------------------------------


async def test_overloaded_when_the_task_queue_is_full(make, model):
    s = make(max_queue=3)
    gate, first = await hold_worker(s, model)
    queued = submit_all(s, [("A", i) for i in range(3)])
    await until(lambda: s.depth("A") == 3)
    with pytest.raises(Overloaded) as refused:
        await s.submit("A", "extra")
    assert refused.value.retry_after_s == 2
    assert s.depth("A") == 3
    other = asyncio.create_task(s.submit("B", 1))  # other tasks still get in
    await until(lambda: s.depth("B") == 1)
    gate.set()
    assert await asyncio.gather(*queued, other) == ["A:0", "A:1", "A:2", "B:1"]
    await first
    assert "extra" not in model.executed


async def test_overloaded_when_all_queues_together_are_full(make, model):
    s = make(max_queue=10, max_queued_total=3)
    gate, first = await hold_worker(s, model)
    queued = submit_all(s, [("A", 1), ("A", 2), ("B", 1)])
    await until(lambda: s.total_depth == 3)
    with pytest.raises(Overloaded):
        await s.submit("C", "extra")
    assert s.total_depth == 3 and s.depth("C") == 0
    gate.set()
    await asyncio.gather(first, *queued)
    assert "C" not in model.tasks


# -- deadlines and cancellation ----------------------------------------------------------------


async def test_request_past_its_deadline_fails_and_never_runs(make, model):
    s = make()
    gate, first = await hold_worker(s, model)
    with pytest.raises(DeadlineExceeded):
        await s.submit("A", "late", timeout_s=0.05)
    assert s.depth("A") == 0
    gate.set()
    assert await first == "A:A1"
    assert await s.submit("A", "after") == "A:after"
    assert "late" not in model.executed


async def test_worker_never_runs_a_request_already_past_its_deadline(make, model):
    # no fill wait and no load to await: the worker takes it before the submit's timer fires
    s = make(max_batch=1, load=False)
    with pytest.raises(DeadlineExceeded):
        await s.submit("A", "late", timeout_s=0)
    assert await s.submit("A", "ok") == "A:ok"
    assert model.executed == ["ok"]


async def test_cancelled_request_is_dropped_from_its_queue_and_never_runs(make, model):
    s = make()
    gate, first = await hold_worker(s, model)
    gone = asyncio.create_task(s.submit("A", "gone"))
    await until(lambda: s.depth("A") == 1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert s.depth("A") == 0 and s.total_depth == 0
    gate.set()
    await first
    assert await s.submit("A", "next") == "A:next"
    assert "gone" not in model.executed


async def test_cancelled_while_running_drops_the_result_and_the_worker_goes_on(make, model):
    s = make()
    gate, running = await hold_worker(s, model)
    running.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert await s.submit("A", "next") == "A:next"
    assert s.batches == 2


# -- failures ----------------------------------------------------------------------------------


async def test_an_exception_item_fails_only_its_request(make, model):
    s = make(max_batch=4, max_wait_ms=20)
    results = await asyncio.gather(*(s.submit("A", p) for p in ["ok1", "bad", "ok2"]),
                                   return_exceptions=True)
    assert model.calls == [("A", ["ok1", "bad", "ok2"])]  # one batch
    assert results[0] == "A:ok1" and results[2] == "A:ok2"
    assert isinstance(results[1], ValueError)


async def test_execute_raising_fails_every_request_of_the_batch(make, model):
    s = make(max_batch=4, max_wait_ms=20)
    results = await asyncio.gather(*(s.submit("A", p) for p in ["x", "boom", "y"]),
                                   return_exceptions=True)
    assert len(model.calls) == 1
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await s.submit("A", "after") == "A:after"


async def test_load_failure_fails_that_batch_without_running_it(make, model):
    s = make()
    model.failing_loads.add("broken")
    with pytest.raises(LookupError):
        await s.submit("broken", 1)
    assert await s.submit("A", 1) == "A:1"
    assert model.tasks == ["A"]
    assert s.current_task == "A" and s.swaps == 0


# -- threads and prefetch ----------------------------------------------------------------------


async def test_execute_runs_in_one_worker_thread_off_the_event_loop(make, model):
    s = make(max_batch=2)
    await asyncio.gather(*(s.submit(t, i) for i in range(5) for t in "ABC"))
    assert len(model.threads) >= 3
    assert len(set(model.threads)) == 1
    assert model.threads[0] != threading.get_ident()


async def test_prefetch_loads_the_next_queued_tasks_when_a_batch_starts(make, model):
    s = make(start=False, max_batch=1, prefetch_depth=2)
    gate = model.gate("A1")
    queued = submit_all(s, [("A", "A1"), ("B", 1), ("C", 1), ("D", 1)])
    await until(lambda: s.total_depth == 4)
    s.start()
    await until(lambda: model.started("A1"))  # held open
    await until(lambda: {"B", "C"} <= set(model.loads))
    assert "D" not in model.loads  # only the next prefetch_depth tasks
    assert model.tasks == ["A"]
    gate.set()
    await asyncio.gather(*queued)
    assert model.tasks == ["A", "B", "C", "D"]
    assert model.handles == ["handle:A", "handle:B", "handle:C", "handle:D"]


async def test_prefetch_loads_tasks_that_arrive_while_a_batch_runs(make, model):
    s = make(max_batch=1, prefetch_depth=2)
    gate, first = await hold_worker(s, model)  # "A" is in the worker thread, held open
    rest = submit_all(s, [("A", "A2"), ("B", 1), ("C", 1), ("D", 1)])
    await until(lambda: {"B", "C"} <= set(model.loads))
    assert model.loads.count("A") == 1  # A's own load, for the batch now running
    assert "D" not in model.loads  # two tasks are ahead of it: not among the next two
    assert model.tasks == ["A"]
    gate.set()
    await asyncio.gather(first, *rest)
    assert model.tasks == ["A", "A", "B", "C", "D"]
    assert model.handles == ["handle:A", "handle:A", "handle:B", "handle:C", "handle:D"]


async def test_a_batch_reuses_its_tasks_prefetch_still_in_flight(make, model):
    s = make(max_batch=1)
    slow_load = model.hold_load("B")
    gate, first = await hold_worker(s, model)
    second = asyncio.create_task(s.submit("B", 1))
    await until(lambda: "B" in model.loads)  # the prefetch, now stuck in load
    gate.set()
    await first
    await asyncio.sleep(0.01)  # the B batch now waits for that same load
    slow_load.set()
    assert await second == "B:1"
    assert model.loads.count("B") == 1
    assert model.handles == ["handle:A", "handle:B"]


async def test_on_batch_reports_size_waits_and_run_time(model):
    seen: list[tuple[str, int, list[float], float]] = []
    s = Scheduler(model.execute, None, **{**DEFAULTS, "max_wait_ms": 20},
                  on_batch=lambda *args: seen.append(args))
    s.start()
    await asyncio.gather(*(s.submit("A", i) for i in range(3)))
    await s.stop()
    assert [(task, size, len(waits)) for task, size, waits, _ in seen] == [("A", 3, 3)]
    assert all(w >= 0 for w in seen[0][2]) and seen[0][3] >= 0
    assert model.handles == [None]  # no load: execute gets no handle


# -- stop --------------------------------------------------------------------------------------


async def test_stop_fails_queued_requests_and_finishes_the_running_batch(make, model):
    s = make()
    gate, first = await hold_worker(s, model)
    queued = submit_all(s, [("A", "A2"), ("B", 1)])
    await until(lambda: s.total_depth == 2)
    stopping = asyncio.create_task(s.stop())
    for request in queued:
        with pytest.raises(Overloaded, match="shutting down"):
            await request
    gate.set()
    assert await first == "A:A1"
    await stopping
    with pytest.raises(Overloaded):
        await s.submit("A", "late")
    assert model.executed == ["A1"]


async def test_stop_with_drain_runs_what_is_queued(make, model):
    s = make()
    gate, first = await hold_worker(s, model)
    queued = submit_all(s, [("A", 2), ("B", 1)])
    await until(lambda: s.total_depth == 2)
    stopping = asyncio.create_task(s.stop(drain=True))
    gate.set()
    assert await asyncio.gather(first, *queued) == ["A:A1", "A:2", "B:1"]
    await stopping


def test_from_settings_takes_the_scheduler_settings(model):
    cfg = get_settings(max_batch=3, max_wait_ms=7, max_queue=11, max_queued_total=13,
                       max_consecutive_batches=5, max_hold_ms=17, request_timeout_s=19,
                       retry_after_s=23)
    s = Scheduler.from_settings(cfg, model.execute, model.load)
    assert (s.max_batch, s.max_wait_ms, s.max_queue, s.max_queued_total) == (3, 7, 11, 13)
    assert (s.max_consecutive_batches, s.max_hold_ms) == (5, 17)
    assert (s.request_timeout_s, s.retry_after_s) == (19, 23)


# -- properties over random workloads ----------------------------------------------------------


workloads = st.lists(st.tuples(st.sampled_from("ABC"), st.booleans()), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None)
@given(items=workloads, max_batch=st.integers(1, 4), turn=st.integers(1, 3))
def test_every_request_is_answered_once_and_no_task_holds_on_while_others_wait(
        items, max_batch, turn):
    asyncio.run(_run_workload(items, max_batch, turn))


async def _run_workload(items: list[tuple[str, bool]], max_batch: int, turn: int) -> None:
    model = FakeModel()
    s = Scheduler(model.execute, model.load, **{**DEFAULTS, "max_batch": max_batch,
                                                "max_consecutive_batches": turn})
    requests = submit_all(s, [(task, i) for i, (task, _) in enumerate(items)])
    await asyncio.sleep(0)  # all queued before the worker starts
    for request, (_, cancel) in zip(requests, items, strict=True):
        if cancel:
            request.cancel()
    s.start()
    results = await asyncio.gather(*requests, return_exceptions=True)
    await s.stop()

    for i, ((task, cancel), result) in enumerate(zip(items, results, strict=True)):
        if cancel:
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert result == f"{task}:{i}"
    ran = [i for i, (_, cancel) in enumerate(items) if not cancel]
    assert sorted(model.executed) == ran  # each live request exactly once, no cancelled one
    assert all(0 < len(payloads) <= max_batch for _, payloads in model.calls)
    changes = sum(a != b for a, b in zip(model.tasks, model.tasks[1:], strict=False))
    assert s.swaps == changes and s.batches == len(model.calls)
    # a run longer than `turn` batches only happens once no other task has work left
    streak = 0
    for pos, task in enumerate(model.tasks):
        streak = streak + 1 if pos and model.tasks[pos - 1] == task else 1
        if streak > turn:
            assert set(model.tasks[pos:]) == {task}
