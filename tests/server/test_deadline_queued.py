"""A request whose deadline passes while it waits in its queue never starts (issue 14, item 7):
it is answered 504 and withdrawn, and no later step runs its texts. (A generation already
decoding stops at the next step: tests/server/test_scheduler.py.)"""

from __future__ import annotations

import asyncio
import threading

import pytest
from support import HANG_GUARD_S, MemoryStore

from taskdelta.server.engine import Engine
from taskdelta.server.errors import DeadlineExceeded
from taskdelta.server.jobs import EmbedJob
from taskdelta.server.settings import get_settings


async def test_a_request_that_expires_in_its_queue_never_runs(tiny_bert):
    engine = Engine(tiny_bert, MemoryStore(tiny_bert),
                    get_settings(cache_bytes=64 * 1024**2, request_timeout_s=HANG_GUARD_S))
    ran: list[str] = []
    held = threading.Event()
    step = engine.executor.step

    def recorded(plan):  # the worker thread: every text a step runs, held while `held` is clear
        ran.extend(t for p in plan.encode for j in p.jobs for t in j.texts)
        assert held.wait(HANG_GUARD_S), "the test never released the worker"
        return step(plan)

    engine.executor.step = recorded  # type: ignore[method-assign]
    sched = engine.scheduler
    ref = engine.registry.base_ref("acme")
    late = EmbedJob(texts=("queued past its deadline",))
    sched.start()
    try:
        first = asyncio.ensure_future(sched.submit(ref, EmbedJob(texts=("runs first",))))
        while "runs first" not in ran:  # the worker is inside the first request's step
            await asyncio.sleep(0.01)
        expired = asyncio.ensure_future(sched.submit(ref, late, timeout_s=2.0))
        for _ in range(300):  # lined up behind the held step (before its 2 s deadline)
            if any(r.job is late for r in sched.queues.all_waiting()):
                break
            await asyncio.sleep(0.005)
        assert any(r.job is late for r in sched.queues.all_waiting()), "never queued"
        with pytest.raises(DeadlineExceeded):
            await expired
        assert not any(r.job is late for r in sched.queues.all_waiting()), "still queued"
        held.set()
        assert len((await first).rows) == 1
        after = await sched.submit(ref, EmbedJob(texts=("after",)))  # the worker went on
        assert len(after.rows) == 1
    finally:
        held.set()
        await sched.stop()
    assert "after" in ran and "queued past its deadline" not in ran, ran
