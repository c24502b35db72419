"""Getting a job through the scheduler from a route: plain, or as a stream of chunks.

A client that disconnects while its request waits has it dropped from the queue (the submit is
cancelled); a streaming client that goes away stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from taskdelta.client.types import StreamChunk

from .deps import AppState
from .jobs import GenerateJob, Job
from .registry import TaskRef


async def run_job(request: Request, state: AppState, ref: TaskRef, job: Job) -> Any:
    work = asyncio.ensure_future(state.scheduler.submit(ref, job,
                                                        state.settings.request_timeout_s))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()  # the client left: drop the request from its queue
    if isinstance(job, GenerateJob) and work.cancelled():
        job.cancelled.set()
    result = await work
    if isinstance(result, BaseException):
        raise result
    return result


async def start_stream(state: AppState, ref: TaskRef, job_args: dict) -> AsyncIterator[StreamChunk]:
    """Enqueue a streaming generate; errors that happen before any output (429, ...) raise here,
    so they reach the client as a normal HTTP error rather than inside the event stream."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[StreamChunk] = asyncio.Queue()
    job = GenerateJob(emit=lambda c: loop.call_soon_threadsafe(queue.put_nowait, c), **job_args)
    work = asyncio.ensure_future(state.scheduler.submit(ref, job,
                                                        state.settings.request_timeout_s))
    await asyncio.sleep(0)  # let submit refuse (overload) before the response starts
    if work.done() and work.exception() is not None:
        raise work.exception()  # type: ignore[misc]
    return _chunks(work, queue, job)


async def _chunks(work: asyncio.Future, queue: asyncio.Queue, job: GenerateJob
                  ) -> AsyncIterator[StreamChunk]:
    getter: asyncio.Future | None = None
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                chunk = getter.result()
                yield chunk
                if chunk.finish_reason is not None:
                    return
                continue
            getter.cancel()
            while not queue.empty():  # the worker finished: deliver what it emitted
                chunk = queue.get_nowait()
                yield chunk
                if chunk.finish_reason is not None:
                    return
            result = work.result()  # raises the job's error, if any
            if isinstance(result, BaseException):
                raise result
            return
    finally:
        if getter is not None and not getter.done():
            getter.cancel()  # the client left mid-wait: no task left pending
        job.cancelled.set()
        if not work.done():
            work.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
