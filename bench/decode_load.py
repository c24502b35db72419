"""Streaming decode load for bench/decode.py: C closed-loop clients over SSE, and what they saw.

Every client sends its own prompt to `/v1/tasks/{task}/generate` with `"stream": true`, reads the
events as they arrive and sends again, until the measured window closes. Each text event's
arrival time is kept: time to first token, the gaps between tokens, and the tokens that arrived
inside the window all come from those times.

Tokens inside the window: a streamed event usually carries one token, but the server may hold a
piece back (an incomplete UTF-8 character) and send it with the next one, so an answer's
`usage.completion_tokens` is spread evenly over its text events. Counting arrivals inside the
window, rather than whole answers that finish inside it, matters here: equal-length generations
admitted together finish together, so whole-answer counts jump by C answers at a time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx


@dataclass
class Stream:
    """One streamed generation as the client saw it (perf_counter seconds)."""

    sent: float
    events: list[float] = field(default_factory=list)  # arrival of each text event
    completion_tokens: int | None = None  # from the final event's usage (None: cut off)
    finished: float | None = None  # arrival of the final event
    error: str | None = None

    def token_weight(self) -> float:
        """Tokens one text event stands for."""
        if self.completion_tokens is None or not self.events:
            return 1.0  # cut off by the window's end: one token an event, the usual case
        return self.completion_tokens / len(self.events)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(streams: list[Stream], start: float, end: float) -> dict:
    """Window figures: tokens/s, TTFT and inter-token latency p50/p99 (ms), answers, errors."""
    inside = lambda t: start <= t <= end  # noqa: E731
    tokens = sum(s.token_weight() for s in streams for t in s.events if inside(t))
    # answers with no text at all (special tokens only): their tokens count when they end
    tokens += sum(s.completion_tokens or 0 for s in streams
                  if not s.events and s.finished is not None and inside(s.finished))
    ttft = [(s.events[0] - s.sent) * 1e3 for s in streams
            if s.events and s.sent >= start and inside(s.events[0])]
    itl = [(b - a) * 1e3 for s in streams for a, b in zip(s.events, s.events[1:], strict=False)
           if inside(a) and inside(b)]
    done = [s for s in streams if s.finished is not None and inside(s.finished)]
    return {"tokens_per_s": tokens / (end - start), "tokens": tokens, "seconds": end - start,
            "answers": len(done), "errors": sum(s.error is not None for s in streams),
            "tokens_per_answer": (sum(s.completion_tokens or 0 for s in done) / len(done)
                                  if done else None),
            "ttft_p50_ms": percentile(ttft, 0.50), "ttft_p99_ms": percentile(ttft, 0.99),
            "itl_p50_ms": percentile(itl, 0.50), "itl_p99_ms": percentile(itl, 0.99),
            "ttft_samples": len(ttft), "itl_samples": len(itl)}


async def stream_one(http: httpx.AsyncClient, task: str, body: dict, record: Stream) -> None:
    """One streamed generate; fills `record` as its events arrive."""
    async with http.stream("POST", f"/v1/tasks/{task}/generate", json=body) as r:
        if r.status_code != 200:
            record.error = f"{r.status_code}"
            await r.aread()
            return
        async for line in r.aiter_lines():
            if line.startswith("event: error"):
                record.error = "stream error"
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("text"):
                record.events.append(time.perf_counter())
            if chunk.get("usage"):
                record.finished = time.perf_counter()
                record.completion_tokens = int(chunk["usage"]["completion_tokens"])


# which task client n asks for its next request (one fixed task, or a draw per request)
TaskPicker = Callable[[int], str]


async def decode_clients(http: httpx.AsyncClient, task: str | TaskPicker, prompts: list[str],
                         tokens: int, end: float, streams: list[Stream]) -> None:
    """Client n asks prompts[n] again and again (greedy, `tokens` new tokens) until `end`, each
    time of `task` (or of `task(n)`, picked afresh per request)."""
    pick = task if callable(task) else (lambda _n: task)
    body = lambda p: {"prompt": p, "max_new_tokens": tokens, "temperature": 0.0,  # noqa: E731
                      "stream": True}

    async def client(n: int, prompt: str) -> None:
        while time.perf_counter() < end:
            record = Stream(sent=time.perf_counter())
            streams.append(record)
            try:
                await stream_one(http, pick(n), body(prompt), record)
            except httpx.HTTPError as exc:
                record.error = type(exc).__name__

    await _until(end, [client(n, p) for n, p in enumerate(prompts)])


async def embed_client(http: httpx.AsyncClient, texts: list[str], start: float, end: float,
                       out: dict) -> None:
    """One client embedding `texts` with `base`, back to back, until `end`: answers inside the
    window and their latencies (ms)."""
    latencies: list[float] = out.setdefault("latencies_ms", [])
    errors = 0
    while (t0 := time.perf_counter()) < end:
        try:
            r = await http.post("/v1/tasks/base/embed", json={"texts": texts})
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        t1 = time.perf_counter()
        if not ok:
            errors += 1
        elif t0 >= start and t1 <= end:
            latencies.append((t1 - t0) * 1e3)
    out["errors"] = errors


async def _until(end: float, work: list) -> None:
    """Run the coroutines until `end`; whatever is still in flight then is cancelled (its
    stream closed: the server frees the slot at its next step)."""
    tasks = [asyncio.ensure_future(w) for w in work]
    await asyncio.wait(tasks, timeout=max(0.0, end - time.perf_counter()))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def run_load(url: str, task: str | TaskPicker, prompts: list[str], tokens: int, warmup_s: float,
                   duration_s: float, embed_texts: list[str] | None = None) -> dict:
    """len(prompts) streaming clients of `task` (a name, or a picker: client -> name) (and,
    with `embed_texts`, one embedding client beside them) for warmup + duration; the window's figures."""
    start = time.perf_counter() + warmup_s
    end = start + duration_s
    streams: list[Stream] = []
    embeds: dict = {}
    limits = httpx.Limits(max_connections=len(prompts) + 2, max_keepalive_connections=len(prompts) + 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        work = [decode_clients(http, task, prompts, tokens, end, streams)]
        if embed_texts:
            work.append(embed_client(http, embed_texts, start, end, embeds))
        await asyncio.gather(*work)
    out = summarise(streams, start, end)
    if embed_texts:
        lat = embeds.get("latencies_ms", [])
        out["embed"] = {"texts_per_request": len(embed_texts), "answered": len(lat),
                        "errors": embeds.get("errors", 0), "p50_ms": percentile(lat, 0.50),
                        "p99_ms": percentile(lat, 0.99)}
    return out
