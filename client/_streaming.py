"""Streamed generation: a server-sent-events decoder and the stream objects that hand out text.

The server sends `data: <StreamChunk JSON>` events, then `data: [DONE]`. An error after the
stream started (the status line is already 200) arrives as `event: error` with an ErrorBody;
it is raised as the same exception class the status would have given (`timeout` ->
GatewayTimeoutError, ...). A stream that ends without `[DONE]` was cut short: APIConnectionError.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import TracebackType

import httpx
import pydantic

from ._base import TYPE_STATUS, connection_error, status_error
from ._exceptions import APIConnectionError, APIResponseValidationError
from .types import StreamChunk, Usage

DONE = "[DONE]"


@dataclass(frozen=True)
class ServerSentEvent:
    event: str | None
    data: str


class SSEDecoder:
    """Feed it lines (without line endings); it returns an event at each blank line."""

    def __init__(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data and self._event is None:
                return None
            sse = ServerSentEvent(self._event, "\n".join(self._data))
            self._event, self._data = None, []
            return sse
        if line.startswith(":"):  # a comment (keep-alive)
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None  # id, retry and unknown fields mean nothing here


class _StreamState:
    """What both stream classes do with an event; I/O stays in the classes."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.request_id: str | None = response.headers.get("x-request-id")
        self.decoder = SSEDecoder()
        self.final: StreamChunk | None = None
        self.pieces: list[str] = []
        self.done = False

    def on_line(self, line: str) -> StreamChunk | None:
        sse = self.decoder.feed(line)
        if sse is None or self.done:
            return None
        if sse.event == "error":
            raise self._error(sse.data)
        if sse.data == DONE:
            self.done = True
            return None
        try:
            chunk = StreamChunk.model_validate_json(sse.data)
        except pydantic.ValidationError:
            raise APIResponseValidationError(f"a stream event is not a StreamChunk: "
                                             f"{sse.data[:200]!r}", response=self.response,
                                             body=sse.data) from None
        if chunk.text:
            self.pieces.append(chunk.text)
        if chunk.finish_reason is not None or chunk.usage is not None:
            self.final = chunk
        return chunk

    def on_end(self) -> StreamChunk | None:
        """The body ended: flush an event the server did not close with a blank line."""
        chunk = self.on_line("")
        if not self.done:
            raise APIConnectionError("the stream ended before [DONE]",
                                     request=self.response.request)
        return chunk

    def _error(self, data: str) -> Exception:
        try:
            body = json.loads(data)
        except ValueError:
            body = data
        detail = body.get("error") if isinstance(body, dict) else None
        err_type = detail.get("type") if isinstance(detail, dict) else None
        exc = status_error(TYPE_STATUS.get(str(err_type), 500), body)
        exc.request_id = exc.request_id or self.request_id
        exc.response = self.response
        return exc


class _StreamBase:
    _state: _StreamState

    @property
    def response(self) -> httpx.Response:
        return self._state.response

    @property
    def request_id(self) -> str | None:
        return self._state.request_id

    @property
    def final(self) -> StreamChunk | None:
        """The last chunk, with finish_reason and usage (None until the stream has ended)."""
        return self._state.final

    @property
    def text(self) -> str:
        """All the text received so far."""
        return "".join(self._state.pieces)

    @property
    def finish_reason(self) -> str | None:
        return self._state.final.finish_reason if self._state.final else None

    @property
    def usage(self) -> Usage | None:
        return self._state.final.usage if self._state.final else None


class GenerateStream(_StreamBase):
    """Iterate for text pieces; afterwards `final`, `text`, `usage` hold the summary.

        with client.generate_stream("poet", "Roses are") as stream:
            for piece in stream:
                print(piece, end="", flush=True)
        print(stream.usage)
    """

    def __init__(self, response: httpx.Response) -> None:
        self._state = _StreamState(response)

    def chunks(self) -> Iterator[StreamChunk]:
        """Every StreamChunk as it arrives (the text-only iteration is `iter(stream)`)."""
        try:
            for line in self.response.iter_lines():
                chunk = self._state.on_line(line)
                if chunk is not None:
                    yield chunk
            if (chunk := self._state.on_end()) is not None:
                yield chunk
        except httpx.TransportError as exc:
            raise connection_error(exc, self.response.request) from exc
        finally:
            self.close()

    def __iter__(self) -> Iterator[str]:
        for chunk in self.chunks():
            if chunk.text:
                yield chunk.text

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncGenerateStream(_StreamBase):
    """The async twin of GenerateStream: `async for piece in stream`."""

    def __init__(self, response: httpx.Response) -> None:
        self._state = _StreamState(response)

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        try:
            async for line in self.response.aiter_lines():
                chunk = self._state.on_line(line)
                if chunk is not None:
                    yield chunk
            if (chunk := self._state.on_end()) is not None:
                yield chunk
        except httpx.TransportError as exc:
            raise connection_error(exc, self.response.request) from exc
        finally:
            await self.close()

    async def __aiter__(self) -> AsyncIterator[str]:
        async for chunk in self.chunks():
            if chunk.text:
                yield chunk.text

    async def close(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
