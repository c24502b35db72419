"""Several sequences for one request (OpenAI's `n`, a list of prompts): one job each, all submitted
at once so that they share the continuous batch; their answers, or their streams merged."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from taskdelta.client.types import SamplingParams, StreamChunk

from .deps import AppState
from .jobs import GenerateJob
from .registry import TaskRef
from .submit import run_job, start_stream

SEED_SPAN = 2**31  # SamplingParams.seed's range


def fan_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies; with a seed, sequence i gets seed + i, so that sampled choices differ but a
    request repeated with the same seed gets the same choices."""
    if params.seed is None:
        return [params] * n
    return [params.model_copy(update={"seed": (params.seed + i) % SEED_SPAN}) for i in range(n)]


async def run_many(request: Request, state: AppState, ref: TaskRef,
                   jobs: list[tuple[str, SamplingParams]]) -> list[Any]:
    """Each (prompt, params) as one job, all in flight together; answers in the given order."""
    return list(await asyncio.gather(*(
        run_job(request, state, ref, GenerateJob(prompt=prompt, params=params))
        for prompt, params in jobs)))


async def stream_many(state: AppState, ref: TaskRef, jobs: list[tuple[str, SamplingParams]]
                      ) -> AsyncIterator[tuple[int, StreamChunk]]:
    """Start every stream (a refusal such as 429 raises here, before any output), then merge
    them: (job index, chunk) as each chunk arrives."""
    streams = [await start_stream(state, ref, {"prompt": prompt, "params": params})
               for prompt, params in jobs]
    return _merged(streams)


async def _merged(streams: list[AsyncIterator[StreamChunk]]
                  ) -> AsyncIterator[tuple[int, StreamChunk]]:
    queue: asyncio.Queue[tuple[int, StreamChunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[StreamChunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((i, chunk))
            await queue.put((i, None))
        except Exception as exc:  # delivered in order, raised by the consumer
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    live = len(streams)
    try:
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:  # the client left or one stream failed: stop every sequence
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()  # type: ignore[attr-defined]
