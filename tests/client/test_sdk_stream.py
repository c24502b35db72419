"""Streamed generation, sync and async: SSE parsing, [DONE], error events, cut-off streams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from support import STORY, USAGE, sse

from taskdelta.client import (
    APIConnectionError,
    AsyncClient,
    Client,
    GatewayTimeoutError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    StreamChunk,
)
from taskdelta.client._streaming import ServerSentEvent, SSEDecoder


def pieces_of(body: bytes, size: int) -> Iterator[bytes]:
    """The body cut into `size`-byte network reads, splitting lines and events anywhere."""
    for i in range(0, len(body), size):
        yield body[i:i + size]


async def apieces_of(body: bytes, size: int) -> AsyncIterator[bytes]:
    for piece in pieces_of(body, size):
        yield piece


def stream_response(body: bytes, size: int = 7, is_async: bool = False) -> httpx.Response:
    content = apieces_of(body, size) if is_async else pieces_of(body, size)
    return httpx.Response(200, content=content, headers={"content-type": "text/event-stream",
                                                         "x-request-id": "req-s"})


class Script:
    def __init__(self, *responses: httpx.Response) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.responses[len(self.requests) - 1]


def sync_client(script: Script, **kwargs) -> tuple[Client, list[float]]:
    sleeps: list[float] = []
    client = Client("http://td.test", http_client=httpx.Client(
        transport=httpx.MockTransport(script)), **kwargs)
    client._sleep = sleeps.append
    client._random = lambda: 0.0
    return client, sleeps


def async_client(script: Script, **kwargs) -> tuple[AsyncClient, list[float]]:
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    client = AsyncClient("http://td.test", http_client=httpx.AsyncClient(
        transport=httpx.MockTransport(script)), **kwargs)
    client._sleep = record
    client._random = lambda: 0.0
    return client, sleeps


# --- the decoder ---------------------------------------------------------------------------------

def test_sse_decoder_joins_data_lines_and_skips_comments():
    dec = SSEDecoder()
    lines = [": keep-alive", "", "event: error", "data: {\"a\":", "data: 1}", "id: 4", "",
             "data:no-space", ""]
    events = [e for e in map(dec.feed, lines) if e is not None]
    assert events == [ServerSentEvent("error", "{\"a\":\n1}"), ServerSentEvent(None, "no-space")]


# --- sync ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 5, 64, 10_000])
def test_stream_yields_text_pieces_then_the_summary(size):
    script = Script(stream_response(STORY, size))
    client, _ = sync_client(script)
    with client.generate_stream("poet", "Tell me") as stream:
        assert list(stream) == ["Once", " upon", " a", " time"]
    assert stream.text == "Once upon a time"
    assert stream.finish_reason == "length" and stream.usage.total_tokens == 7
    assert stream.final == StreamChunk(text=" time", finish_reason="length", usage=USAGE)
    assert stream.request_id == "req-s"
    sent = json.loads(script.requests[0].content)
    assert sent["stream"] is True and sent["prompt"] == "Tell me"
    assert script.requests[0].headers["accept"] == "text/event-stream"


def test_stream_chunks_gives_every_chunk():
    client, _ = sync_client(Script(stream_response(STORY)))
    chunks = list(client.generate_stream("poet", "x").chunks())
    assert [c.text for c in chunks] == ["Once", " upon", " a", " time"]
    assert chunks[-1].usage is not None and chunks[0].usage is None


def test_an_error_event_raises_the_class_of_its_type_after_the_text_before_it():
    body = sse({"text": "Once"}, error={"type": "timeout", "message": "deadline passed",
                                        "request_id": "rid-9"}, done=False)
    client, _ = sync_client(Script(stream_response(body)))
    got: list[str] = []
    with pytest.raises(GatewayTimeoutError) as info:
        for piece in client.generate_stream("poet", "x"):
            got.append(piece)
    assert got == ["Once"]
    assert (info.value.status_code, info.value.type, info.value.message,
            info.value.request_id) == (504, "timeout", "deadline passed", "rid-9")


def test_an_unknown_error_event_is_an_internal_error_with_the_stream_request_id():
    body = sse(error={"type": "mystery", "message": "boom"}, done=False)
    client, _ = sync_client(Script(stream_response(body)))
    with pytest.raises(InternalServerError) as info:
        list(client.generate_stream("poet", "x"))
    assert info.value.request_id == "req-s" and info.value.type == "mystery"


def test_a_stream_cut_before_done_is_a_connection_error():
    client, _ = sync_client(Script(stream_response(sse({"text": "Once"}, done=False))))
    stream = client.generate_stream("poet", "x")
    it = iter(stream)
    assert next(it) == "Once"
    with pytest.raises(APIConnectionError, match=r"\[DONE\]"):
        next(it)


def test_a_last_event_without_its_blank_line_still_counts():
    body = STORY.rstrip(b"\n")  # "data: [DONE]" with no terminating blank line
    client, _ = sync_client(Script(stream_response(body)))
    assert "".join(client.generate_stream("poet", "x")) == "Once upon a time"


def test_an_error_status_before_the_stream_raises_at_the_call_and_is_retried():
    limited = httpx.Response(429, json={"error": {"type": "rate_limited", "message": "busy"}},
                             headers={"Retry-After": "2"})
    script = Script(limited, stream_response(STORY))
    client, sleeps = sync_client(script)
    assert "".join(client.generate_stream("poet", "x")) == "Once upon a time"
    assert sleeps == [2.0] and len(script.requests) == 2

    missing = httpx.Response(404, json={"error": {"type": "not_found", "message": "no poet",
                                                  "request_id": "r404"}})
    client2, _ = sync_client(Script(missing), max_retries=0)
    with pytest.raises(NotFoundError, match="no poet"):
        client2.generate_stream("poet", "x")


def test_a_read_error_mid_stream_is_a_connection_error():
    def broken() -> Iterator[bytes]:
        yield b'data: {"text": "Once"}\n\n'
        raise httpx.ReadError("connection reset")

    client, _ = sync_client(Script(httpx.Response(200, content=broken())))
    got: list[str] = []
    with pytest.raises(APIConnectionError, match="reset"):
        for piece in client.generate_stream("poet", "x"):
            got.append(piece)
    assert got == ["Once"]


# --- async ---------------------------------------------------------------------------------------

async def test_async_stream_yields_text_pieces_then_the_summary():
    script = Script(stream_response(STORY, 3, is_async=True))
    client, _ = async_client(script)
    async with client:
        stream = await client.generate_stream("poet", messages=[{"role": "user",
                                                                 "content": "hi"}])
        got = [piece async for piece in stream]
    assert got == ["Once", " upon", " a", " time"]
    assert stream.usage.completion_tokens == 4 and stream.finish_reason == "length"
    assert json.loads(script.requests[0].content)["messages"] == [{"role": "user",
                                                                   "content": "hi"}]


async def test_async_stream_error_event_raises():
    body = sse({"text": "a"}, error={"type": "rate_limited", "message": "queue full"},
               done=False)
    client, _ = async_client(Script(stream_response(body, is_async=True)))
    stream = await client.generate_stream("poet", "x")
    got: list[str] = []
    with pytest.raises(RateLimitError, match="queue full"):
        async for piece in stream:
            got.append(piece)
    assert got == ["a"]


async def test_async_stream_cut_before_done_is_a_connection_error():
    client, _ = async_client(Script(stream_response(sse({"text": "a"}, done=False),
                                                    is_async=True)))
    stream = await client.generate_stream("poet", "x")
    with pytest.raises(APIConnectionError):
        [p async for p in stream]


async def test_async_stream_retries_a_503_before_the_stream():
    unavailable = httpx.Response(503, json={"error": {"type": "unavailable", "message": "x"}})
    script = Script(unavailable, stream_response(STORY, is_async=True))
    client, sleeps = async_client(script)
    stream = await client.generate_stream("poet", "x")
    assert "".join([p async for p in stream]) == "Once upon a time"
    assert sleeps == [0.5]
